"""How big should glip-nano be? Candidate sizes, each pretrained briefly by the real ``glip
pretrain --recipe nano/pretrain`` (same steps, same data) and measured: parameters (without the
packaged language encoder), float16 file size, CPU seconds per training image, validation AP
on the pretraining corpus, zero-shot AP on the demo/novel target.

Each candidate runs in a child process with ``OMP_NUM_THREADS=--threads`` (1: CPU time is then
robust to a busy machine); its CPU time is the child's ``user + sys`` (``os.wait4``), which
includes rendering nothing (the corpus is rendered once, before) but includes the start-up and
the validation passes. The machine load (``os.getloadavg``) is recorded before and after.

    python benchmarks/nano_sizes.py [--steps 500] [--images 2000] [--data-root runs/nano-sizes/data]
                                    [--candidates a,b,c] [--parallel 2] [--out benchmarks/results]

Writes ``nano_sizes.md`` and ``nano_sizes.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# model (and input) overrides per candidate; "160-s32-c64" is the variant's own configuration
CANDIDATES = {
    "128-s32-c32": ["model.swin.embed_dim=32", "model.fpn.out_channels=32", "model.head.channels=32", "size=128"],
    "160-s32-c64": ["size=160"],
    "160-s48-c64": [
        "model.swin.embed_dim=48",
        "model.swin.num_heads=[2,4,8,16]",
        "model.swin.depths=[2,2,2,2]",
        "size=160",
    ],
}


def sets_for(name: str, args) -> list[str]:
    out = [
        f"synthetic.images={args.images}",
        f"train.max_steps={args.steps}",
        "train.epochs=1000",
        f"train.milestones=[{int(args.steps * 0.7)},{int(args.steps * 0.9)}]",
    ]
    for item in CANDIDATES[name]:
        if item.startswith("size="):
            size = int(item.split("=")[1])
            out += [
                f"train.min_sizes=[{size}]",
                f"train.max_size={size}",
                f"evaluation.min_size={size}",
                f"evaluation.max_size={size}",
            ]
        else:
            out.append(item)
    return out


def run_child(cmd: list[str], threads: int, log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, CPU seconds of the child: user + sys)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLIP_PROGRESS": "0"}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def zeroshot(weights: Path, data_root: Path, out: Path, size: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "glip_transfer.cli", "zeroshot", "eval", "--recipe", "demo/novel",
           "--weights", str(weights), "--data-root", str(data_root), "--out", str(out), "--force", "--batch-size", "8",
           "--set", f"evaluation.min_size={size}", "--set", f"evaluation.max_size={size}"]  # fmt: skip
    code, _, _ = run_child(cmd, threads, out.with_suffix(".log"))
    if code != 0:
        raise SystemExit(f"zero-shot evaluation failed: see {out.with_suffix('.log')}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"AP": metrics["AP"], "AP50": metrics["AP50"]}


def measure(name: str, args) -> dict:
    from safetensors import safe_open

    work = args.work / name
    sets = sets_for(name, args)
    cmd = [sys.executable, "-m", "glip_transfer.cli", "pretrain", "--recipe", "nano/pretrain", "--data-root",
           str(args.data_root), "--out", str(work), "--force"] + [x for s in sets for x in ("--set", s)]  # fmt: skip
    load_before = os.getloadavg()
    code, wall, cpu = run_child(cmd, args.threads, args.work / f"{name}.log")
    if code != 0:
        raise SystemExit(f"{name}: glip pretrain failed: see {args.work / f'{name}.log'}")
    result = json.loads((work / "result.json").read_text())
    with safe_open(str(work / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    evals = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    size = next(int(s.split("=")[1]) for s in sets if s.startswith("evaluation.min_size="))
    return {
        "candidate": name, "overrides": CANDIDATES[name], "params_without_language": params,
        "fp16_mb": params * 2 / 1e6,
        "steps": result["steps"], "batch_size": json.loads((work / "config.json").read_text())["train"]["batch_size"],
        "cpu_s": cpu, "wall_s": wall, "load_before": load_before, "load_after": os.getloadavg(),
        "cpu_s_per_image": cpu / (result["steps"] * 8), "val_AP": result["best_val_AP"],
        "val_curve": [(e.get("epoch"), e.get("AP")) for e in evals],
        "novel_zeroshot": zeroshot(work / "model.safetensors", args.data_root, args.work / f"{name}-novel", size,
                                   args.threads),
    }  # fmt: skip


def main() -> None:
    from concurrent.futures import ThreadPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--candidates", default="128-s32-c32,160-s32-c64,160-s48-c64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="candidates measured at the same time")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "nano-sizes")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.data_root = args.data_root or args.work / "data"
    args.work.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate {unknown[0]!r}: choose from {', '.join(CANDIDATES)}")
    # render the data once (the corpus and the target), outside the timed runs
    from glip_transfer.config import apply_overrides
    from glip_transfer.recipes import ensure_data, load_recipe, parse_recipe, recipe_to_dict

    pre = load_recipe("nano/pretrain")
    pre = parse_recipe(
        apply_overrides(
            {k: v for k, v in recipe_to_dict(pre).items() if k != "path"}, [f"synthetic.images={args.images}"]
        ),
        "nano/pretrain",
    )
    ensure_data(pre, args.data_root)
    ensure_data(load_recipe("demo/novel"), args.data_root)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(pool.map(lambda n: measure(n, args), names))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"glip-nano candidates: {args.steps} pretraining steps of 8 images, {args.threads} thread(s)")
    for col in ("candidate", "params", "fp16 MB", "CPU s / image", "val AP", "novel zero-shot AP50"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["candidate"], f"{r['params_without_language']:,}", f"{r['fp16_mb']:.1f}",
                      f"{r['cpu_s_per_image']:.3f}", f"{r['val_AP']:.3f}",
                      f"{r['novel_zeroshot']['AP50']:.3f}")  # fmt: skip
    Console().print(table)
    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
    }
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "environment": env, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nano_sizes.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# glip-nano sizes: {args.steps} pretraining steps of 8 images ({args.images}-image corpus), "
             f"{args.threads} thread(s)", "",
             "| candidate | overrides | parameters (no language) | fp16 MB | CPU s / image | wall s | load (1 min) "
             "| val AP | novel zero-shot AP / AP50 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['candidate']} | {' '.join(r['overrides'])} | {r['params_without_language']:,} | "
                     f"{r['fp16_mb']:.1f} | {r['cpu_s_per_image']:.3f} | {r['wall_s']:.0f} | "
                     f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} | {r['val_AP']:.3f} | "
                     f"{r['novel_zeroshot']['AP']:.3f} / {r['novel_zeroshot']['AP50']:.3f} |")  # fmt: skip
    lines += ["", "CPU time: the child process's user + sys seconds (start-up and validation included) "
              "over steps x 8 images; it is far less sensitive to a busy machine than the wall time."]  # fmt: skip
    (args.out / "nano_sizes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
