"""``glip predict``: detect named categories or grounded phrases in images."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..config import check_inference_settings
from ..data import load_image
from ..files import STDOUT, is_direct, write_text
from ..runtime import progress_bar, resolve_device
from ..tokenizer import TOKENIZER_ENV
from ..visualize import draw_detections, save_png
from .common import (
    ADAPTER_HELP,
    DEVICE_HELP,
    SIZE_HELP,
    TOKENIZER_HELP,
    VARIANT_HELP,
    WEIGHTS_HELP,
    WORKERS_HELP,
    console,
    err_console,
    fail,
    handle_errors,
    note,
)

TABLE_LIMIT = 50
"""Without --out / --json: one table per image up to this many detections in all, else counts per class."""

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def collect_images(inputs: list[Path]) -> list[Path]:
    """The image files named, and those inside named folders (sorted, not recursive)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                fail(f"{item}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif item.exists():
            files.append(item)
        else:
            fail(f"{item}: no such file or folder")
    return files


def output_names(paths: list[Path]) -> list[str]:
    """PNG names for the annotated images: the image's stem, made unique when stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = p.stem
        if stem in seen:
            seen[stem] += 1
            stem = f"{stem}_{seen[stem]}"
        else:
            seen[stem] = 0
        names.append(f"{stem}.png")
    return names


def check_outputs(out: Path | None, json_path: Path | None, png_names: list[str], force: bool) -> None:
    """Refuse, before anything runs, outputs that cannot be written or would replace the user's
    files without ``--force``: ``--json`` naming a folder, ``--out`` naming a file, a parent that
    is a file, an existing JSON file or annotated PNG. Standard output (``--json -``) and devices
    or FIFOs (``/dev/null``) are written in place and never refused."""
    for path, option in ((json_path, "--json"), (out, "--out")):
        if path is None or is_direct(path):
            continue
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            fail(f"{option} {path}: {parent} is a file, not a folder")
    if json_path is not None and not is_direct(json_path):
        if json_path.is_dir():
            fail(f"--json {json_path} is a folder: give a file name, e.g. --json {json_path / 'detections.json'}")
        if json_path.exists() and not force:
            fail(f"--json {json_path} exists: pass --force to overwrite it, or choose another file")
    if out is not None:
        if out.exists() and not out.is_dir():
            fail(f"--out {out} is a file: give a folder for the annotated PNGs")
        existing = [name for name in png_names if (out / name).exists()] if out.is_dir() else []
        if existing and not force:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            fail(f"--out: {out / existing[0]} exists{more}: pass --force to overwrite, or choose another --out")


def _box(box: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in box)


def detection_tables(records: list[dict], threshold: float) -> list[Text | Table]:
    """What ``glip predict`` prints without ``--out`` / ``--json``: for each image its name and
    size, then a table of its detections (label, score, box), when there are at most
    :data:`TABLE_LIMIT` detections in all; else one table of counts per class."""
    total = sum(len(r["detections"]) for r in records)
    if total <= TABLE_LIMIT:
        shown: list[Text | Table] = []
        for r in records:
            shown.append(Text(f"{r['image']} ({r['width']}x{r['height']})", style="bold"))
            table = Table()
            table.add_column("label")
            table.add_column("score", justify="right")
            table.add_column("box (x1, y1, x2, y2)", justify="right")
            for d in r["detections"]:
                table.add_row(escape(d["label"]), f"{d['score']:.4f}", _box(d["box"]))
            if not r["detections"]:
                table.add_row(f"[dim]no detection at score >= {threshold}[/]", "", "")
            shown.append(table)
        return shown
    counts: dict[str, list] = defaultdict(lambda: [0, 0, 0.0])  # detections, images, best score
    for r in records:
        for label in {d["label"] for d in r["detections"]}:
            counts[label][1] += 1
        for d in r["detections"]:
            entry = counts[d["label"]]
            entry[0] += 1
            entry[2] = max(entry[2], d["score"])
    table = Table(title=f"{total} detections in {len(records)} images (--json FILE writes every box)")
    table.add_column("label")
    table.add_column("detections", justify="right")
    table.add_column("images", justify="right")
    table.add_column("best score", justify="right")
    for label, (n, images, best) in sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0])):
        table.add_row(escape(label), str(n), str(images), f"{best:.4f}")
    return [table]


@handle_errors
def predict_command(
    images: list[Path] = typer.Argument(..., help="Image files or folders of images (not recursive)."),
    weights: str = typer.Option("glip-t", "--weights", "-w", help=WEIGHTS_HELP),
    variant: str = typer.Option(None, "--variant", help=VARIANT_HELP),
    classes: str = typer.Option(None, "--classes", "-c", help='Category names, comma separated: "person,dog".'),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Free text whose phrases to detect; see --phrase."),
    phrase: list[str] = typer.Option(
        None, "--phrase", help="A phrase of --prompt to detect (repeatable) [default: the prompt split at periods]."
    ),
    threshold: float = typer.Option(
        0.5, "--threshold", "-t", help="Keep detections scoring at least this, in [0, 1] (0 keeps all the model gives)."
    ),
    min_size: int = typer.Option(
        None, "--min-size", help=SIZE_HELP[0] + " [default: the model's own: GLIP 800, glip-nano 160]."
    ),
    max_size: int = typer.Option(
        None, "--max-size", help=SIZE_HELP[1] + " [default: the model's own: GLIP 1333, glip-nano 160]."
    ),
    max_detections: int = typer.Option(
        100, "--max-detections", help="Detections kept per image before --threshold (>= 1)."
    ),
    tokenizer: str = typer.Option(None, "--tokenizer", envvar=TOKENIZER_ENV, help=TOKENIZER_HELP),
    adapter: Path = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: bool = typer.Option(False, "--amp", help="CUDA mixed precision (bf16/fp16); CPU stays float32."),
    batch_size: int = typer.Option(
        1, "--batch-size", "-b", min=1, help="Images per forward (same detections at any size)."
    ),
    workers: int = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for the annotated images (IMAGE.png each)."),
    json_path: Path = typer.Option(
        None,
        "--json",
        help="Write every detection to this JSON file ('-': to stdout). Elsewhere --json is a flag: print JSON.",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite the --json file and PNGs in --out that exist."),
):
    """Detect categories (--classes) or phrases of a free-text prompt (--prompt) in images.

    Without --out / --json: a table of the detections per image (counts per class when there are many).
    """
    # the model (torchvision: a second to import) loads when the command runs, not for `glip --help`
    from ..api import build_prompt, check_adapter, check_weights, load, resolve_tokenizer

    # everything cheap first: options, prompt arguments, inputs, outputs, weights name, tokenizer, prompt
    check_inference_settings(threshold=threshold, max_detections=max_detections, min_size=min_size, max_size=max_size)
    if (classes is None) == (prompt is None):
        fail('give exactly one of --classes "a,b,c" or --prompt "free text"')
    if phrase and prompt is None:
        fail("--phrase needs --prompt")
    to_stdout = json_path is not None and str(json_path) == STDOUT
    paths = collect_images(images)
    png_names = output_names(paths)
    check_outputs(out, json_path, png_names, force)
    resolve_device(device)
    check_weights(weights)
    tok = resolve_tokenizer(tokenizer, weights)
    labelled = build_prompt(tok, classes=classes, prompt=prompt, phrases=phrase or None)
    for notice in labelled.notices:
        note(notice)
    if adapter is not None:
        check_adapter(adapter, labelled.captions)

    detector = load(weights, device=device, tokenizer=tok, adapter=adapter, variant=variant, amp=amp)
    records: dict[int, dict] = {}
    skipped = 0
    found = 0
    with progress_bar() as bar:
        task = bar.add_task("predict", total=len(paths), info="", unit="img")
        settings = dict(threshold=threshold, max_detections=max_detections, min_size=min_size, max_size=max_size)
        for record in detector.detect(paths, labelled, **settings, batch_size=batch_size, workers=workers):
            index = record.pop("index")
            if "error" in record:
                err_console.print(f"[yellow]skipped:[/] {escape(record['error'])}", highlight=False, soft_wrap=True)
                skipped += 1
            else:
                records[index] = record
                found += len(record["detections"])
                if out is not None:
                    canvas = draw_detections(load_image(paths[index]), record["detections"], labelled.names)
                    save_png(canvas, out / png_names[index])
            bar.update(task, advance=1, info=f"{found} detections")
    ordered = [records[i] for i in sorted(records)]  # input order, however batched

    if json_path is not None:
        write_text(json_path, json.dumps(ordered, indent=1) + ("\n" if to_stdout else ""))
    if out is None and json_path is None:
        for shown in detection_tables(ordered, threshold):
            console.print(shown, soft_wrap=isinstance(shown, Text))
    summary = (
        f"{len(ordered)} image(s), {found} detection(s) at score >= {threshold}"
        + (f", {skipped} skipped" if skipped else "")
        + (f"; PNGs in {out}" if out else "")
        + (f"; JSON: {json_path}" if json_path and not to_stdout else "")
    )
    (err_console if to_stdout else console).print(escape(summary), highlight=False, soft_wrap=True)
    if skipped and not ordered:
        raise typer.Exit(2)
