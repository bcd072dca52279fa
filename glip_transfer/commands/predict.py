"""``glip predict``: detect named categories or grounded phrases in images."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..checkpoint import load_model
from ..data import DataError, load_image
from ..evaluation import atomic_write_text
from ..prompts import build_detection_prompt, phrase_prompt
from ..recipes import Evaluation
from ..runtime import progress_bar, resolve_device
from ..tokenizer import default_tokenizer, load_tokenizer
from ..transforms import pad_batch, test_transform
from ..visualize import draw_detections, save_png
from .common import console, err_console, fail, handle_errors

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


@handle_errors
def predict_command(
    images: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    weights: str = typer.Option("glip-t", "--weights", "-w", help="A name (glip weights list) or a file: official GLIP .pth or .safetensors."),
    variant: str = typer.Option(None, "--variant", help="glip-t | glip-t-a | glip-l (detected when omitted)."),
    classes: str = typer.Option(None, "--classes", "-c", help='Category names, comma separated: "person,dog".'),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Free text; see --phrase."),
    phrase: list[str] = typer.Option(
        None, "--phrase", help="A phrase of --prompt to detect (repeatable); default: the prompt split at periods."
    ),
    threshold: float = typer.Option(0.5, "--threshold", "-t", help="Keep detections scoring at least this."),
    min_size: int = typer.Option(800, "--min-size", help="Resize the short side to this..."),
    max_size: int = typer.Option(1333, "--max-size", help="...unless the long side would exceed this."),
    max_detections: int = typer.Option(100, "--max-detections", help="Detections per image before --threshold."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Hub id or folder with vocab.txt (env GLIP_TOKENIZER)."),
    adapter: Path = typer.Option(None, "--adapter", help="A prompt-tuning/LoRA/fine-tuning artifact."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    amp: bool = typer.Option(False, "--amp", help="CUDA mixed precision (bf16/fp16); CPU stays float32."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for annotated PNGs."),
    json_path: Path = typer.Option(None, "--json", help="Write all detections to this JSON file."),
):
    """Detect categories (--classes) or phrases of a free-text prompt (--prompt) in images."""
    # the model (torchvision: a second to import) loads when the command runs, not for `glip --help`
    from ..inference import EncodedPrompt, detect_batch, to_original_size
    from ..training.artifacts import apply_adapter

    if (classes is None) == (prompt is None):
        fail('give exactly one of --classes "a,b,c" or --prompt "free text"')
    if phrase and prompt is None:
        fail("--phrase needs --prompt")
    if out is None and json_path is None:
        err_console.print("[yellow]note:[/] neither --out nor --json given; printing a summary only")
    paths = collect_images(images)
    dev = resolve_device(device)
    overrides = Evaluation(min_size=min_size, max_size=max_size, detections_per_img=max_detections).model_overrides()
    model, _ = load_model(weights, variant=variant, tokenizer=tokenizer or None, overrides=overrides)
    tok = load_tokenizer(default_tokenizer(tokenizer, model.cfg.language.tokenizer))
    max_len = model.cfg.language.max_query_len
    if classes is not None:
        class_names = [name.strip() for name in classes.split(",") if name.strip()]
        if not class_names:
            fail(f'--classes {classes!r} names no category: give names separated by commas, e.g. "person,dog"')
        detection_prompt = build_detection_prompt(tok, list(enumerate(class_names, start=1)), max_len=max_len)
        for notice in detection_prompt.notices:
            err_console.print(f"[yellow]note:[/] {notice}")
        encoded = EncodedPrompt.from_chunks(tok, detection_prompt.chunks, max_len)
        names = [class_names[cid - 1] for cid in encoded.label_ids]
    else:
        encoded = EncodedPrompt.from_chunks(tok, [phrase_prompt(tok, prompt, phrase or None, max_len)], max_len)
        names = encoded.names
    if adapter is not None:
        model = apply_adapter(model, adapter, weights=weights, captions=encoded.captions)
    model = model.to(dev).eval()

    records: list[dict] = []
    skipped = 0
    png_names = output_names(paths)
    with progress_bar() as bar:
        task = bar.add_task("predict", total=len(paths), info="")
        for start in range(0, len(paths), batch_size):
            batch_paths = paths[start : start + batch_size]
            pils, tensors, sizes, used = [], [], [], []
            for i, p in enumerate(batch_paths):
                try:
                    pil = load_image(p)
                except DataError as e:
                    err_console.print(f"[yellow]skipped:[/] {e}")
                    skipped += 1
                    continue
                tensor, resized = test_transform(pil, model.cfg.input)
                pils.append(pil)
                tensors.append(tensor)
                sizes.append(resized)
                used.append(start + i)
            if tensors:
                batch, image_sizes = pad_batch(tensors, model.cfg.input.size_divisibility)
                dets = detect_batch(model, batch.to(dev), image_sizes, encoded, amp=amp)
                for pil, d, resized, index in zip(pils, dets, sizes, used):
                    d = to_original_size(d.to("cpu"), resized, (pil.height, pil.width))
                    detections = [
                        {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": names[label - 1]}
                        for box, score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist())
                        if score >= threshold
                    ]
                    record = {
                        "image": str(paths[index]),
                        "width": pil.width,
                        "height": pil.height,
                        "detections": detections,
                    }
                    records.append(record)
                    if out is not None:
                        save_png(draw_detections(pil, detections, names), Path(out) / png_names[index])
            bar.update(task, advance=len(batch_paths), info=f"{sum(len(r['detections']) for r in records)} detections")

    if json_path is not None:
        atomic_write_text(json_path, json.dumps(records, indent=1))
    total = sum(len(r["detections"]) for r in records)
    console.print(
        f"{len(records)} image(s), {total} detection(s) at score >= {threshold}"
        + (f", {skipped} skipped" if skipped else "")
        + (f"; PNGs in {out}" if out else "")
        + (f"; JSON: {json_path}" if json_path else "")
    )
    if skipped and not records:
        raise typer.Exit(2)
