"""``glip demo``: glip-nano's transfer story on the synthetic demo targets, offline, in minutes."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..runtime import progress_bar
from .common import console, err_console, fail, handle_errors


@handle_errors
def demo_command(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", "-o", help="Report folder (refused when not empty, unless --resume or --force)."
    ),
    data_root: Path = typer.Option(
        Path("DATASET"),
        "--data-root",
        "-d",
        envvar="GLIP_DATA",
        help="Where the demo targets' data are rendered on first use (under synth/).",
    ),
    weights: str = typer.Option("glip-nano", "--weights", "-w", help="The base model (a glip-nano file or name)."),
    few_shot: bool = typer.Option(
        False, "--few-shot", help="The 1/3/5/10-shot x 3-draw table (mean ± std) instead: longer."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted demo in --out (finished steps are reused)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the demo in --out."),
    epochs: int = typer.Option(
        None, "--epochs", min=1, help="Fine-tuning epochs of every mode [linear 3, prompt 3, lora 3, full 3]."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N."),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"targets", "results"} as the last line (the shifted target\'s table).'
    ),
):
    """Zero-shot on both demo targets, then linear probing, prompt tuning, LoRA and full fine-tuning
    on the shifted one: a table, and a report folder (Markdown, a plot, before/after images)."""
    from ..demo import DemoConfig, plan, run_demo

    if resume and force:
        fail("--resume and --force exclude each other")
    cfg = DemoConfig(out=out, data_root=data_root, weights=weights, device=device, few_shot=few_shot)
    if epochs is not None:
        cfg.epochs = {mode: epochs for mode in cfg.epochs}
    with progress_bar() as bar:
        task = bar.add_task("glip demo", total=len(plan(cfg)), info="")
        summary = run_demo(
            cfg,
            force=force,
            resume=resume,
            progress=lambda name, done: bar.update(task, completed=round(done * bar.tasks[task].total), info=name),
            notify=lambda text: err_console.print(escape(text), highlight=False),
        )
    console.print(results_table(summary))
    if few_shot:
        console.print(few_shot_table(summary))
    console.print(f"report: {out / 'report.md'} ({summary['seconds_this_run']:.0f} s)", highlight=False)
    if as_json:
        typer.echo(json.dumps({"targets": summary["targets"], "results": summary["results"]}))


def results_table(summary: dict) -> Table:
    table = Table(title="glip demo: glip-nano")
    for column, justify in (("target", "left"), ("mode", "left"), ("trainable", "right"), ("AP", "right"),
                            ("AP50", "right"), ("seconds", "right")):  # fmt: skip
        table.add_column(column, justify=justify)
    rows = [(t, r) for t, r in summary["targets"].items() if t != "demo/shifted"]
    rows += [("demo/shifted", r) for r in summary["results"]]
    for target, r in rows:
        table.add_row(
            target, r["mode"], f"{r['trainable']:,}", f"{r['ap']:.3f}", f"{r['ap50']:.3f}", f"{r['seconds']:.0f}"
        )
    return table


def few_shot_table(summary: dict) -> Table:
    shots = sorted({e["shots"] for e in summary["few_shot"]})
    table = Table(title="demo/shifted, K-shot: test AP (mean ± std over 3 draws)")
    table.add_column("mode")
    table.add_column("trainable", justify="right")
    for k in shots:
        table.add_column(f"{k}-shot", justify="right")
    for mode in dict.fromkeys(e["mode"] for e in summary["few_shot"]):
        cells = {e["shots"]: e for e in summary["few_shot"] if e["mode"] == mode}
        values = [f"{cells[k]['ap_mean']:.3f} ± {cells[k]['ap_std']:.3f}" if k in cells else "-" for k in shots]
        table.add_row(mode, f"{next(iter(cells.values()))['trainable']:,}", *values)
    return table
