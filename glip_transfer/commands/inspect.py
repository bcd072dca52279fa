"""``glip inspect``: what a weights file is and how it fits the model."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import typer
from rich.table import Table

from ..checkpoint import compare_state, config_from_metadata, detect_variant, read_state_dict, resolve_weights
from ..config import variant_config
from .common import console, handle_errors

PARTS = ("backbone.body", "backbone.fpn", "language_backbone", "rpn.head", "rpn.anchor_generator")


def parameter_counts(state: dict) -> "OrderedDict[str, int]":
    counts: OrderedDict[str, int] = OrderedDict((p, 0) for p in PARTS)
    counts["other"] = 0
    for key, tensor in state.items():
        part = next((p for p in PARTS if key.startswith(p + ".")), "other")
        counts[part] += tensor.numel()
    if not counts["other"]:
        del counts["other"]
    return counts


@handle_errors
def inspect_command(
    path: str = typer.Argument(..., help="A weights name (glip weights list), an official GLIP .pth or a .safetensors."),
    variant: str = typer.Option(None, "--variant", help="Compare against this variant instead of the detected one."),
    ema: bool = typer.Option(False, "--ema", help="Inspect the 'model_ema' weights."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Show a checkpoint's variant, parameter counts per part, and how its keys fit the model."""
    from ..model.glip import build_glip  # torchvision: a second to import, not for `glip --help`

    path = resolve_weights(path, model_only=not ema)
    state, meta = read_state_dict(path, use_ema=ema)
    detected = detect_variant(state)
    cfg = config_from_metadata(meta)
    name = variant or (cfg.variant if cfg else detected)
    report = None
    if name != "unknown":
        model = build_glip(cfg if cfg and cfg.variant == name else variant_config(name))
        report = compare_state(model, state)
    counts = parameter_counts(state)
    info = {
        "path": str(path),
        "format": meta.get("format", "official .pth" if Path(path).suffix != ".safetensors" else "safetensors"),
        "detected_variant": detected,
        "compared_with": name,
        "tensors": len(state),
        "parameters": sum(counts.values()),
        "parameters_by_part": dict(counts),
        "keys": None
        if report is None
        else {
            "ok": report.ok,
            "missing": report.missing,
            "unexpected": report.unexpected,
            "wrong_shape": [[k, list(a), list(b)] for k, a, b in report.wrong_shape],
            "tolerated": report.adapted,
        },
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"{Path(path).name}: {detected}", show_footer=True)
    table.add_column("part", footer="total")
    table.add_column("parameters", justify="right", footer=f"{info['parameters']:,}")
    for part, n in counts.items():
        table.add_row(part, f"{n:,}")
    console.print(table)
    if report is None:
        console.print("[yellow]unknown variant[/]: pass --variant to compare the keys")
    elif report.ok:
        extra = f" (tolerated: {', '.join(report.adapted)})" if report.adapted else ""
        console.print(f"[green]keys:[/] all {len(state)} tensors match {name}{extra}")
    else:
        console.print(f"[red]keys:[/] {report.summary(limit=10)}")
        raise typer.Exit(1)
