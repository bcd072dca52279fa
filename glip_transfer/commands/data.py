"""``glip data``: the recipes' datasets by name — download the ODinW zips, list what is present —
and ``glip data synth``, the synthetic grounding corpus (glip-nano's pretraining data) and the demo targets."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..runtime import progress_bar
from .common import console, err_console, handle_errors

app = typer.Typer(
    name="data",
    help="Datasets of the recipes: download ODinW by name, list what is present, render the synthetic corpus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

DATA_ROOT_HELP = "Folder the recipes' paths are under (the official DATASET layout)."


@app.command("download")
@handle_errors
def download_command(
    target: str = typer.Argument(..., help="odinw13 | odinw35 | a recipe name or alias (glip recipes list)."),
    data_root: Path = typer.Option(Path("DATASET"), "--data-root", "-d", envvar="GLIP_DATA", help=DATA_ROOT_HELP),
    force: bool = typer.Option(False, "--force", help="Download and replace datasets that are already there."),
):
    """Fetch the ODinW zips a recipe (or all of ODinW-13 / ODinW-35) needs from the Hugging Face hub
    (GLIPModel/GLIP, odinw_35/<Name>.zip), check and extract them; skip what is already there."""
    from ..datasets import fetch_dataset, plan_downloads

    plans = plan_downloads(target)
    table = Table(title=f"datasets under {data_root}")
    table.add_column("dataset")
    table.add_column("recipes")
    table.add_column("status")
    for i, plan in enumerate(plans, 1):
        if len(plans) > 1:
            err_console.print(f"[bold]{i}/{len(plans)}[/] {plan.name}")
        status = fetch_dataset(plan, data_root, force=force)
        shown = "[green]downloaded[/]" if status == "extracted" else "present (skipped)"
        table.add_row(plan.name, ", ".join(r.name for r in plan.recipes), shown)
    console.print(table)


@app.command("list")
@handle_errors
def list_command(
    data_root: Path = typer.Option(Path("DATASET"), "--data-root", "-d", envvar="GLIP_DATA", help=DATA_ROOT_HELP),
    as_json: bool = typer.Option(
        False, "--json", help='Print [{"recipe","dataset","present","missing","download","synthetic"}].'
    ),
):
    """Each recipe's dataset and whether its files are under --data-root (no network)."""
    from ..datasets import data_table

    rows = data_table(data_root)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table(title=f"recipe datasets under {data_root}")
    for column in ("recipe", "ODinW zip", "here"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if row["present"]:
            here = "[green]present[/]"
        elif row["synthetic"]:
            here = "rendered on first use"
        else:
            here = "[red]missing[/]" if row["dataset"] else "[red]missing[/] (not on the hub)"
        table.add_row(row["recipe"], row["dataset"] or "-", here)
    console.print(table)
    present = sum(r["present"] for r in rows)
    console.print(f"{present} of {len(rows)} recipes have their files under {data_root}; "
                  "glip data download odinw13 | odinw35 | RECIPE fetches the ODinW ones")  # fmt: skip


@app.command("synth")
@handle_errors
def synth_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (refused when not empty, unless --force)."),
    split: str = typer.Option("pretrain", "--split", help="pretrain | novel | shifted (the demo targets)."),
    images: int = typer.Option(
        None, "--images", "-n", min=1, help="Training images (default: pretrain 12000, novel / shifted 200)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same arguments give the same files, byte for byte."),
    force: bool = typer.Option(False, "--force", help="Replace the synthetic data in a non-empty --out."),
):
    """Render a synthetic grounding split: images, captions with phrase spans, COCO boxes."""
    from ..synth import check_out, generate, split_spec, subset_sizes

    spec = split_spec(split)
    sizes = subset_sizes(spec, images)
    check_out(out, force)
    with progress_bar() as bar:
        task = bar.add_task(f"synth {split}", total=sum(sizes.values()), info="")
        manifest = generate(out, split, images=images, seed=seed, force=force,
                            progress=lambda done, total: bar.update(task, completed=done))  # fmt: skip
    parts = ", ".join(f"{n} {name}" for name, n in manifest["subsets"].items())
    console.print(
        f"[bold]{split}[/] ({spec.summary}): {parts} images, {len(manifest['categories'])} categories -> {out}",
        highlight=False,
        soft_wrap=True,
    )
