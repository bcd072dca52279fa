"""Bytes a finished ``glip finetune --mode full`` run leaves on disk, with and without
``--keep-checkpoints``, measured on test-tiny (a real run of the ``glip`` command on synthetic
rectangles: validation, test and the artifact included), and the same layout computed for GLIP-T
from its parameter count (the meta device: no weights built).

A finished run keeps the artifact (``weights.safetensors``: every parameter, float32) and small
text files; ``--keep-checkpoints`` adds ``checkpoints/last.safetensors`` (the trainable tensors,
AdamW's two moments, the random states). While a run trains it holds ``checkpoints/best`` (the
trainable tensors) and one ``last``, plus the next ``last`` while it is written.

    python benchmarks/disk_use.py [--tokenizer DIR] [--out benchmarks/results]

Prints a Rich table and writes ``disk_use.md`` and ``disk_use.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from glip_transfer.cli import app  # noqa: E402
from glip_transfer.config import variant_config  # noqa: E402
from glip_transfer.model.glip import build_glip  # noqa: E402
from glip_transfer.training.config import TrainConfig  # noqa: E402
from glip_transfer.training.modes import apply_mode  # noqa: E402
from synthetic import make_rectangles  # noqa: E402


def folder_bytes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def run_tiny(root: Path, tokenizer: str, keep: bool) -> dict[str, int]:
    ann, images = make_rectangles(root / "data", n_images=8, names=("red", "green", "blue"), size=(128, 96))
    out = root / ("kept" if keep else "lean")
    args = ["finetune", "--ann", ann, "--images", images, "--val-ann", ann, "--val-images", images]
    args += ["--test-ann", ann, "--test-images", images, "--variant", "test-tiny", "--mode", "full"]
    args += ["--tokenizer", tokenizer, "--device", "cpu", "--epochs", "2", "--batch-size", "4", "--out", out]
    args += ["--set", "train.min_sizes=[96]", "--set", "train.max_size=160"]
    args += ["--set", "evaluation.min_size=96", "--set", "evaluation.max_size=128"]
    args += ["--keep-checkpoints"] if keep else []
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(result.output)
    return folder_bytes(out)


def parameter_bytes(variant: str) -> tuple[int, int]:
    """(all parameters, those --mode full trains) in bytes, float32."""
    with torch.device("meta"):
        model = build_glip(variant_config(variant))
        apply_mode(model, "full", TrainConfig())
    total = sum(p.numel() for p in model.parameters()) * 4
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    return total, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=os.environ.get("GLIP_TOKENIZER"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.tokenizer is None:
        from conftest import offline_vocab_dir

        args.tokenizer = str(offline_vocab_dir())
    with tempfile.TemporaryDirectory() as tmp:
        lean = run_tiny(Path(tmp), args.tokenizer, keep=False)
        kept = run_tiny(Path(tmp), args.tokenizer, keep=True)
    small = sum(v for k, v in lean.items() if k != "weights.safetensors")
    last_ratio = kept["checkpoints/last.safetensors"] / parameter_bytes("test-tiny")[1]
    total, trained = parameter_bytes("glip-t")
    last = int(trained * last_ratio)
    glip_t = {
        "weights.safetensors": total,
        "checkpoints/last.safetensors (--keep-checkpoints)": last,
        "finished": total + small,
        "finished --keep-checkpoints": total + small + last,
        "peak while training (best + last + the last being written)": trained + 2 * last,
        "before (weights + best + last + last.prev)": 2 * total + 2 * last,
    }
    report = {
        "test_tiny": {"finished": lean, "finished --keep-checkpoints": kept},
        "test_tiny_totals": {"finished": sum(lean.values()), "finished --keep-checkpoints": sum(kept.values())},
        "glip_t_estimate_bytes": glip_t,
        "last_over_trained_bytes": last_ratio,
        "note": "GLIP-T from its parameter count (float32) and the ratio of last.safetensors to the trained "
        "tensors measured on test-tiny (weights + AdamW's two moments); small files as on test-tiny",
    }
    table = Table(title="bytes a finished glip finetune --mode full run leaves")
    table.add_column("what")
    table.add_column("test-tiny (measured)", justify="right")
    table.add_column("GLIP-T (computed)", justify="right")
    table.add_row("finished", f"{sum(lean.values()):,}", f"{glip_t['finished']:,}")
    table.add_row(
        "finished --keep-checkpoints", f"{sum(kept.values()):,}", f"{glip_t['finished --keep-checkpoints']:,}"
    )
    table.add_row(
        "peak while training", "", f"{glip_t['peak while training (best + last + the last being written)']:,}"
    )
    table.add_row("earlier versions, finished", "", f"{glip_t['before (weights + best + last + last.prev)']:,}")
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk_use.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Disk use of a finished `glip finetune --mode full` run",
        "",
        "| what | test-tiny | GLIP-T |",
        "| --- | ---: | ---: |",
    ]
    lines.append(f"| finished | {sum(lean.values()):,} | {glip_t['finished']:,} |")
    lines.append(
        f"| finished, --keep-checkpoints | {sum(kept.values()):,} | {glip_t['finished --keep-checkpoints']:,} |"
    )
    lines.append(
        f"| peak while training | | {glip_t['peak while training (best + last + the last being written)']:,} |"
    )
    lines.append(f"| earlier versions, finished | | {glip_t['before (weights + best + last + last.prev)']:,} |")
    lines += ["", report["note"] + ".", ""]
    (args.out / "disk_use.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
