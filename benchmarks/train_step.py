"""Seconds per training step and peak memory of the transfer modes with GLIP-T.

Each mode runs in a fresh subprocess (peak memory = ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
of that process on CPU, ``torch.cuda.max_memory_allocated`` on CUDA): GLIP-T with the reference's
deterministic weights, a batch of synthetic images of a fixed size with two boxes each, a caption
of ``--tokens`` tokens (a typical ODinW caption: 7 categories ~ 20 tokens), and the real trainer
step (forward, GLIP loss, backward, gradient clipping, AdamW, schedule) of
:class:`glip_transfer.training.engine.Trainer`. One warm-up step, then ``--steps`` timed steps.

    python benchmarks/train_step.py [--modes full,prompt,linear,lora] [--size 320] [--batch 2]
                                    [--steps 2] [--device cpu] [--threads N] [--out benchmarks/results]

Prints a Rich table and writes ``train_step.md`` and ``train_step.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.model.loss import GroundingTarget
from glip_transfer.reference import apply_deterministic_weights
from glip_transfer.training.config import TrainConfig
from glip_transfer.training.data import Batch, FixedPrompt
from glip_transfer.training.engine import Trainer, TrainModule
from glip_transfer.training.modes import apply_mode, count_parameters, set_train_modes

TARGETS = {"time": 0.35, "memory": 0.5}  # prompt step vs full step


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = variant_config(args.variant)
    cfg.head.gradient_checkpointing = args.checkpointing
    model = build_glip(cfg)
    apply_deterministic_weights(model, cfg.head.num_convs)
    train_cfg = TrainConfig(
        batch_size=args.batch,
        amp=args.amp,
        amp_dtype=args.amp_dtype,
        lr=1e-4,
        schedule="constant",
        early_stop_patience=0,
    )
    plan = apply_mode(model, args.mode, train_cfg)
    module = TrainModule(model, plan).to(device)
    trainable, total = count_parameters(model)

    t = args.tokens
    max_len = cfg.language.max_query_len
    ids = torch.zeros(1, max_len, dtype=torch.int64)
    ids[0, 0], ids[0, t - 1] = 101, 102  # [CLS] ... [SEP]
    ids[0, 1 : t - 1] = torch.arange(2000, 2000 + t - 2)
    mask = torch.zeros(1, max_len, dtype=torch.int64)
    mask[0, :t] = 1
    pmap = torch.zeros(4, max_len)
    for row in range(4):
        pmap[row, 1 + 2 * row] = 1.0
    prompt = FixedPrompt("synthetic", ids, mask, pmap, [1, 2, 3, 4])
    trainer = Trainer(
        module,
        train_cfg,
        list(range(args.batch)),
        device=device,
        out_dir=tempfile.mkdtemp(),
        prompt=prompt,
        progress=False,
    )

    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    boxes = torch.tensor([[20.0, 30.0, 140.0, 170.0], [150.0, 120.0, 300.0, 290.0]]) * (args.size / 320)
    targets = [GroundingTarget(boxes.clone(), pmap[[i % 4, (i + 1) % 4]].clone()) for i in range(args.batch)]
    batch = Batch(images, [(args.size, args.size)] * args.batch, targets, list(range(args.batch)))
    set_train_modes(model, plan, True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train_step(batch)  # warm-up (allocations, text cache)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        out = trainer.train_step(batch)
        sync()
        times.append(time.perf_counter() - start)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # where a step's time goes: the forward (with the loss) and the backward timed alone, the rest
    # (clipping, optimiser, schedule, EMA) is the step minus both; the weights are left unchanged
    batch_on = batch.to(device)
    ids_on, mask_on = prompt.input_ids.to(device), prompt.attention_mask.to(device)
    fwd, bwd = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        with trainer.autocast():
            losses = trainer.wrapped(batch_on.images, batch_on.targets, ids_on, mask_on)
        loss = sum(losses.values())
        sync()
        middle = time.perf_counter()
        loss.backward()
        sync()
        fwd.append(middle - start)
        bwd.append(time.perf_counter() - middle)
        trainer.optimizer.zero_grad(set_to_none=True)
    result = {
        "mode": args.mode,
        "sec_per_step": sum(times) / len(times),
        "times": times,
        "forward_s": sum(fwd) / len(fwd),
        "backward_s": sum(bwd) / len(bwd),
        "trainable": trainable,
        "total": total,
        "loss": out["loss"],
        "peak_rss_mb": rss_peak / 1024.0,
        "rss_after_build_mb": rss_before / 1024.0,
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="full,prompt,linear,lora")
    parser.add_argument("--variant", default="glip-t")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=20, help="caption length in tokens ([CLS] and [SEP] included)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="CUDA autocast (bf16 / fp16)")
    parser.add_argument("--amp-dtype", default="auto", choices=("auto", "bfloat16", "float16"))
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (fused head and Swin)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.mode = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    console = Console()
    rows = []
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--variant",
            args.variant,
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--tokens",
            str(args.tokens),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--amp-dtype",
            args.amp_dtype,
        ] + (["--amp"] if args.amp else [])
        cmd += ["--checkpointing"] if args.checkpointing else []
        console.print(f"[bold]{mode}[/] ...", highlight=False)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GLIP_PROGRESS": "0"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            console.print(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"{mode}: the worker failed")
        rows.append(json.loads(line[len("RESULT ") :]))

    full = next((r for r in rows if r["mode"] == "full"), None)
    mem_key = "peak_cuda_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    table = Table(title=f"{args.variant} training step, {args.batch} x {args.size}x{args.size}, {args.device}")
    cpu = not args.device.startswith("cuda")
    for col in ("mode", "trainable", "s / step", "x full", "fwd", "bwd", "rest", "peak MB", "x full"):
        table.add_column(col, justify="right")
    for r in rows:
        rt = r["sec_per_step"] / full["sec_per_step"] if full else float("nan")
        rm = r[mem_key] / full[mem_key] if full else float("nan")
        r["time_vs_full"], r["memory_vs_full"] = rt, rm
        r["rest_s"] = max(r["sec_per_step"] - r["forward_s"] - r["backward_s"], 0.0)  # a difference of timings
        if cpu:  # the memory training adds over the built model (peak RSS - RSS after building it)
            r["train_mb"] = r["peak_rss_mb"] - r["rss_after_build_mb"]
            r["train_memory_vs_full"] = (
                r["train_mb"] / (full["peak_rss_mb"] - full["rss_after_build_mb"]) if full else float("nan")
            )
        table.add_row(
            r["mode"],
            f"{r['trainable']:,}",
            f"{r['sec_per_step']:.2f}",
            f"{rt:.2f}",
            f"{r['forward_s']:.2f}",
            f"{r['backward_s']:.2f}",
            f"{r['rest_s']:.2f}",
            f"{r[mem_key]:.0f}",
            f"{rm:.2f}",
        )
    console.print(table)
    prompt = next((r for r in rows if r["mode"] == "prompt"), None)
    verdict = {}
    if full and prompt:
        verdict = {
            "prompt_time_vs_full": prompt["time_vs_full"],
            "time_target": TARGETS["time"],
            "time_met": prompt["time_vs_full"] <= TARGETS["time"],
            "prompt_memory_vs_full": prompt["memory_vs_full"],
            "memory_target": TARGETS["memory"],
            "memory_met": prompt["memory_vs_full"] <= TARGETS["memory"],
            # the prompt step's forward + backward alone: what no optimiser or schedule change can remove
            "prompt_forward_backward_vs_full": (prompt["forward_s"] + prompt["backward_s"]) / full["sec_per_step"],
        }
        console.print(
            f"prompt vs full: time {prompt['time_vs_full']:.2f}x (target <= {TARGETS['time']}), "
            f"memory {prompt['memory_vs_full']:.2f}x (target <= {TARGETS['memory']})"
        )
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "device": args.device
        if not args.device.startswith("cuda") or not torch.cuda.is_available()
        else torch.cuda.get_device_name(0),
    }
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "environment": env,
        "results": rows,
        "verdict": verdict,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = (
        ("" if args.device == "cpu" else "_cuda")
        + ("" if args.size == 320 else f"_{args.size}")
        + ("_ckpt" if args.checkpointing else "")
    )
    (args.out / f"train_step{suffix}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [
        f"# Training step: {args.variant}, batch {args.batch} x {args.size}x{args.size}, {args.tokens}-token caption",
        "",
        f"Device: {env['device']} ({env['cpus']} CPUs, {env['threads']} threads), torch {env['torch']}. "
        f"One warm-up step, mean of {args.steps} timed steps; peak memory: "
        + (
            "`torch.cuda.max_memory_allocated`."
            if args.device.startswith("cuda")
            else "`ru_maxrss` of a fresh process per mode (weights included)."
        ),
        "",
    ]
    header = (
        "| mode | trainable | s / step | x full | forward (s) | backward (s) | rest (s) | peak memory (MB) | x full |"
    )
    if cpu:
        lines += [header + " training's own (MB) | x full |", "| --- |" + " ---: |" * 10]
    else:
        lines += [header, "| --- |" + " ---: |" * 8]
    for r in rows:
        row = (
            f"| {r['mode']} | {r['trainable']:,} | {r['sec_per_step']:.3f} | {r['time_vs_full']:.2f} | "
            f"{r['forward_s']:.3f} | "
            f"{r['backward_s']:.3f} | {r['rest_s']:.3f} | {r[mem_key]:.0f} | {r['memory_vs_full']:.2f} |"
        )
        if cpu:
            row += f" {r['train_mb']:.0f} | {r['train_memory_vs_full']:.2f} |"
        lines.append(row)
    lines += [
        "",
        "forward / backward: one forward with the loss and its backward, timed alone; rest: the step minus both "
        "(gradient clipping, optimiser, schedule, EMA).",
    ]
    if cpu:
        lines += [
            "",
            '"training\'s own": peak RSS minus the RSS after building the model with its deterministic weights '
            "(the build itself peaks near 1.8 GB for GLIP-T and is the same in every mode).",
        ]
    if verdict:
        lines += [
            "",
            f"Prompt step vs full step: time {verdict['prompt_time_vs_full']:.2f}x (target <= {TARGETS['time']}: "
            f"{'met' if verdict['time_met'] else 'NOT met'}), peak memory {verdict['prompt_memory_vs_full']:.2f}x "
            f"(target <= {TARGETS['memory']}: {'met' if verdict['memory_met'] else 'NOT met'}). The prompt step's "
            f"forward + backward alone is {verdict['prompt_forward_backward_vs_full']:.2f}x the full step.",
        ]
    (args.out / f"train_step{suffix}.md").write_text("\n".join(lines) + "\n")
    console.print(f"written: {args.out / f'train_step{suffix}.md'}, {args.out / f'train_step{suffix}.json'}")


if __name__ == "__main__":
    main()
