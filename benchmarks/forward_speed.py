"""GLIP forward speed on this machine: seconds per image, FLOPs, GFLOP/s, and the share of time in
deformable convolution. Deterministic weights, batch 1, float32 (CPU) or AMP (CUDA, --amp); the
fused head over the caption's own tokens (``GLIP.detect``) and over all 256 padded positions.

    python benchmarks/forward_speed.py [--variant glip-t] [--sizes 512x512,800x1344] [--threads 1,2]
                                       [--device cpu] [--repeats 2] [--out benchmarks/results]

Prints a Rich table and writes ``forward_speed.md`` and ``forward_speed.json`` in ``--out``.
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
from glip_transfer.model import head as head_module
from glip_transfer.model.glip import build_glip
from glip_transfer.model.postprocess import postprocess
from glip_transfer.reference import apply_deterministic_weights


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        h, w = part.lower().split("x")
        out.append((int(h), int(w)))
    return out


class DeformTimer:
    """Accumulates the wall time spent inside the head's deformable convolutions (forward hooks on
    every ``ModulatedDeformConv``), whichever kernel they dispatch to."""

    def __init__(self, model):
        self.model = model
        self.seconds = 0.0
        self.hooks = []

    def __enter__(self):
        starts = {}

        def before(module, args):
            sync()
            starts[id(module)] = time.perf_counter()

        def after(module, args, out):
            sync()
            self.seconds += time.perf_counter() - starts.pop(id(module))

        for m in self.model.modules():
            if isinstance(m, head_module.ModulatedDeformConv):
                self.hooks += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def count_flops(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def inference(model, images, text, positive_map, padded: bool):
    """One image's detections: ``model.detect`` (the caption's own length), or with ``padded``
    the fused head over all 256 positions as the reference runs it."""
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    if not padded:
        return lambda: model.detect(images, sizes, text, positive_map)
    return lambda: postprocess(*model(images, text), positive_map, sizes, model.cfg.postprocess)


def time_run(run, model, threads: int, args) -> tuple[float, float]:
    """Best of ``args.repeats`` timings after a warm-up, and the deformable convs' time in it."""
    torch.set_num_threads(threads)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.amp else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), amp:
        run()  # warm-up
        sync()
        best, deform = float("inf"), 0.0
        for _ in range(args.repeats):
            with DeformTimer(model) as timer:
                start = time.perf_counter()
                run()
                sync()
                seconds = time.perf_counter() - start
            if seconds < best:
                best, deform = seconds, timer.seconds
    return best, deform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="glip-t")
    parser.add_argument("--sizes", default="512x512,800x1344", help="padded input sizes HxW (multiples of 32)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="CUDA autocast (bf16 where supported)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--text",
        default="caption,padded",
        help="caption: the fused head over the caption's 12 tokens (what glip predict runs); "
        "padded: over all 256 positions",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    keep_freed_memory()  # as the glip command: no page faults per forward (glip_transfer.allocator)

    device = torch.device(args.device)
    cfg = variant_config(args.variant)
    model = build_glip(cfg)
    apply_deterministic_weights(model, cfg.head.num_convs)
    model = model.eval().to(device)
    ids = torch.zeros(1, cfg.language.max_query_len, dtype=torch.long)
    ids[0, :12] = torch.tensor([101, 2711, 1012, 7596, 1012, 2137, 5210, 1012, 10412, 1012, 15913, 102])
    mask = (ids != 0).long()
    positive_map = torch.zeros(
        5, cfg.language.max_query_len, device=device
    )  # person. rocket. american flag. helmet. glove
    for row, tokens in enumerate(([1], [3], [5, 6], [8], [10])):
        positive_map[row, tokens] = 1.0
    with torch.no_grad():
        text = model.encode_text(ids.to(device), mask.to(device))

    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    rows = []
    for h, w in parse_sizes(args.sizes):
        images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
        for text_mode in args.text.split(","):
            run = inference(model, images, text, positive_map, padded=text_mode == "padded")
            flops = count_flops(run)
            for n in threads:
                best, deform = time_run(run, model, n, args)
                rows.append(
                    {
                        "variant": args.variant,
                        "size": f"{h}x{w}",
                        "text": text_mode,
                        "device": str(device),
                        "threads": n,
                        "amp": args.amp,
                        "seconds": round(best, 3),
                        "gflops": round(flops / 1e9, 1),
                        "gflop_per_s": round(flops / 1e9 / best, 1),
                        "deform_share": round(deform / best, 3),
                    }
                )

    table = Table(title=f"GLIP forward ({args.variant}, batch 1, text encoded once)")
    for col in ("size", "text", "device", "threads", "seconds", "gflops", "gflop_per_s", "deform_share"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["size"],
            r["text"],
            r["device"],
            str(r["threads"]),
            f"{r['seconds']:.2f}",
            f"{r['gflops']:.0f}",
            f"{r['gflop_per_s']:.1f}",
            f"{100 * r['deform_share']:.0f}%",
        )
    Console().print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads max, torch {torch.__version__}"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    stem = f"forward_speed_{args.variant}_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [
        f"# GLIP forward speed ({args.variant})",
        "",
        f"Machine: {machine}",
        "",
        "Detections for one image with a 5-phrase, 12-token caption (BERT run once, not timed). text: `caption` = "
        "`GLIP.detect`, the fused head over the caption's 12 positions (what `glip predict` runs); `padded` = the "
        "head over all 256 positions, as the reference runs it.",
        "",
        "| size | text | device | threads | s / image | GFLOP | GFLOP/s | deform conv share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['text']} | {r['device']} | {r['threads']} | {r['seconds']:.2f} | {r['gflops']:.0f} | "
            f"{r['gflop_per_s']:.1f} | {100 * r['deform_share']:.0f}% |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
