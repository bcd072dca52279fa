"""``glip predict``: detect named categories or grounded phrases in images."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..checkpoint import load_model
from ..data import ImageFiles, default_workers, load_image, make_loader
from ..files import write_text
from ..prompts import build_detection_prompt, phrase_prompt
from ..runtime import progress_bar, resolve_device
from ..tokenizer import default_tokenizer, load_tokenizer
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
    min_size: int = typer.Option(None, "--min-size", help="Resize the short side to this... [the model's: GLIP 800, glip-nano 160]"),
    max_size: int = typer.Option(None, "--max-size", help="...unless the long side would exceed this [GLIP 1333, glip-nano 160]."),
    max_detections: int = typer.Option(100, "--max-detections", help="Detections per image before --threshold."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Hub id or folder with vocab.txt (env GLIP_TOKENIZER)."),
    adapter: Path = typer.Option(None, "--adapter", help="A prompt-tuning/LoRA/fine-tuning artifact."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    amp: bool = typer.Option(False, "--amp", help="CUDA mixed precision (bf16/fp16); CPU stays float32."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Images per forward (same detections at any size)."),
    workers: int = typer.Option(None, "--workers", min=0, help="Image loading processes [default: 1 on CPU, up to 8 on CUDA]."),
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
    overrides = [f"postprocess.detections_per_img={max_detections}"]  # the model's own input size unless given
    overrides += [f"input.{key}={value}" for key, value in (("min_size", min_size), ("max_size", max_size)) if value is not None]
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

    records: dict[int, dict] = {}
    skipped = 0
    png_names = output_names(paths)
    # decoding, resizing and normalising in loader workers; batches of one padded size
    dataset = ImageFiles(paths, model.cfg.input)
    workers = default_workers(dev) if workers is None else workers
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=dev.type == "cuda")
    with progress_bar() as bar:
        task = bar.add_task("predict", total=len(paths), info="", unit="img")
        for batch, image_sizes, batch_infos in loader:
            for info in batch_infos:
                if "error" in info:
                    err_console.print(f"[yellow]skipped:[/] {info['error']}")
                    skipped += 1
            infos = [info for info in batch_infos if "error" not in info]
            if infos:
                dets = detect_batch(model, batch.to(dev, non_blocking=True), image_sizes, encoded, amp=amp)
                for d, info in zip(dets, infos):
                    height, width = info["loaded_size"]
                    d = to_original_size(d.to("cpu"), info["resized_size"], (height, width))
                    detections = [
                        {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": names[label - 1]}
                        for box, score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist())
                        if score >= threshold
                    ]
                    index = info["index"]
                    records[index] = {
                        "image": str(paths[index]),
                        "width": width,
                        "height": height,
                        "detections": detections,
                    }
                    if out is not None:
                        save_png(draw_detections(load_image(paths[index]), detections, names), Path(out) / png_names[index])
            bar.update(task, advance=len(batch_infos), info=f"{sum(len(r['detections']) for r in records.values())} detections")
    records = [records[i] for i in sorted(records)]  # input order, however batched

    if json_path is not None:
        write_text(json_path, json.dumps(records, indent=1))
    total = sum(len(r["detections"]) for r in records)
    console.print(
        f"{len(records)} image(s), {total} detection(s) at score >= {threshold}"
        + (f", {skipped} skipped" if skipped else "")
        + (f"; PNGs in {out}" if out else "")
        + (f"; JSON: {json_path}" if json_path else "")
    )
    if skipped and not records:
        raise typer.Exit(2)
