"""``glip data``: datasets on disk. ``glip data synth`` renders the synthetic grounding corpus
(glip-nano's pretraining data) and the demo targets."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, handle_errors, progress_bar

app = typer.Typer(help="Datasets: render the synthetic grounding corpus and the demo targets.", no_args_is_help=True)


@app.command("synth")
@handle_errors
def synth_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (refused when not empty, unless --force)."),
    split: str = typer.Option("pretrain", "--split", help="pretrain | novel | shifted (the demo targets)."),
    images: int = typer.Option(None, "--images", "-n", min=1, help="Training images (default: pretrain 12000, novel / shifted 200)."),
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
    console.print(f"[bold]{split}[/] ({spec.summary}): {parts} images, {len(manifest['categories'])} categories -> {out}",
                  highlight=False, soft_wrap=True)  # fmt: skip
