"""Evaluation throughput on a dataset of mixed image sizes: images/s of ``evaluate_dataset`` through
``make_loader`` (batches of one padded size) at batch 1 and larger batches, with and without
loader workers, and whether the detections equal batch 1's.

    python benchmarks/eval_throughput.py [--variant glip-t] [--images 24] [--min-size 480] [--max-size 800]
                                         [--batches 1,4] [--workers 0,1] [--threads 2] [--rounds 2]

The dataset is written to a temporary folder: the reference's astronaut photo cropped to four
aspect ratios (4:3, 3:4, 16:9, 1:1, as JPEG), cycled. Deterministic weights, the COCO-80 prompt
(one chunk, BERT features cached). Configurations run in turn, ``--rounds`` times (best wall time
kept). Writes ``eval_throughput.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from gpu_eval import COCO_NAMES, find_vocab  # benchmarks/ is on the path when a script in it runs
from rich.console import Console
from rich.table import Table

from glip_transfer.allocator import keep_freed_memory
from glip_transfer.config import variant_config
from glip_transfer.data import DetectionDataset, make_loader
from glip_transfer.inference import EncodedPrompt, evaluate_dataset
from glip_transfer.model.glip import build_glip
from glip_transfer.prompts import build_detection_prompt
from glip_transfer.reference import apply_deterministic_weights
from glip_transfer.tokenizer import load_tokenizer

REFERENCE_DIR = Path(os.environ.get("GLIP_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1))  # (w, h)


def write_dataset(root: Path, n: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    photo = REFERENCE_DIR / "astronaut.png"
    base = Image.open(photo).convert("RGB") if photo.exists() else Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8))
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(n):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        w, h = (640, 640 * ah // aw) if aw >= ah else (640 * aw // ah, 640)
        base.resize((w, h)).save(root / "images" / f"{i}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": w, "height": h})
    ann = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    (root / "ann.json").write_text(json.dumps(ann))
    return root / "ann.json", root / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="glip-t")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--min-size", type=int, default=480)
    parser.add_argument("--max-size", type=int, default=800)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--workers", default="0,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    cfg = variant_config(args.variant)
    cfg.input.min_size, cfg.input.max_size = args.min_size, args.max_size
    model = build_glip(cfg)
    apply_deterministic_weights(model, cfg.head.num_convs)
    model.eval()
    tokenizer = load_tokenizer(find_vocab())
    coco = build_detection_prompt(tokenizer, list(enumerate(COCO_NAMES, start=1)), max_len=cfg.language.max_query_len, warn=False)
    prompt = EncodedPrompt.from_chunks(tokenizer, coco.chunks, cfg.language.max_query_len)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ann, image_dir = write_dataset(Path(tmp), args.images)
        dataset = DetectionDataset(ann, image_dir, cfg.input)
        sizes = dataset.padded_sizes()
        configs = [(b, w) for b in (int(x) for x in args.batches.split(",")) for w in (int(x) for x in args.workers.split(","))]
        evaluate_dataset(model, make_loader(dataset, batch_size=1), prompt, device=device)  # warm-up, text features cached
        best, results = {}, {}
        for _ in range(args.rounds):
            for batch_size, workers in configs:
                start = time.perf_counter()
                cpu = time.process_time()
                results[(batch_size, workers)] = evaluate_dataset(model, make_loader(dataset, batch_size, workers), prompt, device=device)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                if (batch_size, workers) not in best or wall < best[(batch_size, workers)][0]:
                    best[(batch_size, workers)] = (wall, cpu)
        n_batches = {b: len(make_loader(dataset, b).batch_sampler) for b, _ in configs}
    reference = results[configs[0]]
    rows = []
    for (batch_size, workers), (wall, cpu) in best.items():
        res = results[(batch_size, workers)]
        diff = max((abs(a["score"] - b["score"]) for a, b in zip(reference, res)), default=0.0)
        rows.append({"batch": batch_size, "workers": workers, "batches": n_batches[batch_size], "wall_s": round(wall, 2),
                     "main_process_cpu_s": round(cpu, 2), "images_per_s": round(len(dataset) / wall, 3),
                     "same_order_as_first": [r["image_id"] for r in res] == [r["image_id"] for r in reference],
                     "max_score_diff_vs_first": diff})  # fmt: skip
    load_end = os.getloadavg()
    first = rows[0]["images_per_s"]
    table = Table(title=f"{args.variant}, {len(dataset)} images of {len(set(sizes))} padded sizes, {args.threads} threads")
    for c in ("batch", "workers", "batches", "wall_s", "images_per_s", "gain", "max_score_diff_vs_first"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), str(r["workers"]), str(r["batches"]), f"{r['wall_s']:.2f}", f"{r['images_per_s']:.3f}",
                      f"{r['images_per_s'] / first:.2f}x", f"{r['max_score_diff_vs_first']:.1e}")  # fmt: skip
    Console().print(table)
    Console().print(f"load average {load_start} -> {load_end}")
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_throughput_{args.variant}"
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "args": vars(args), "padded_sizes": sorted(set(sizes)),
                                                  "loadavg_start": load_start, "loadavg_end": load_end, "rows": rows}, indent=2) + "\n")  # fmt: skip
    lines = [f"# Evaluation throughput, {args.variant}, mixed sizes", "",
             f"Machine: {machine}; {len(dataset)} images, padded sizes {sorted(set(sizes))} (short side {args.min_size}, "
             f"long side at most {args.max_size}); load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; "
             f"best wall time of {args.rounds} rounds.", "",
             "| batch | workers | batches | wall s | images/s | vs first | max score diff vs first |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['batch']} | {r['workers']} | {r['batches']} | {r['wall_s']:.2f} | {r['images_per_s']:.3f} | "
              f"{r['images_per_s'] / first:.2f}x | {r['max_score_diff_vs_first']:.1e} |" for r in rows]  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
