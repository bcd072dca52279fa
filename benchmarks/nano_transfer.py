"""What glip-nano transfers: zero-shot on both demo targets, then linear probing, prompt tuning,
LoRA and full fine-tuning on the shifted one, each by the real CLI (``glip zeroshot eval``,
``glip finetune``) in a child process; test AP / AP50 of the best (val) weights, trainable
parameters, the child's CPU and wall seconds, the machine load.

    python benchmarks/nano_transfer.py [--weights glip-nano] [--modes linear,prompt,lora,full]
                                       [--epochs 6] [--shots 0] [--threads 1] [--set train.lr=...]
                                       [--work runs/nano-transfer] [--out benchmarks/results]

Writes ``nano_transfer.json`` and ``.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(cmd: list[str], threads: int, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLIP_PROGRESS": "0"}
    load, start = os.getloadavg(), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[2:6])} failed: see {log}")
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": time.perf_counter() - start,
        "load": [load[0], os.getloadavg()[0]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="glip-nano")
    parser.add_argument("--modes", default="linear,prompt,lora,full")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="passed to every glip finetune")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "nano-transfer")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    data = args.data_root or args.work / "data"
    args.work.mkdir(parents=True, exist_ok=True)
    glip = [sys.executable, "-m", "glip_transfer.cli"]
    rows = []
    for target in ("demo/novel", "demo/shifted"):
        folder = args.work / f"zeroshot-{target.split('/')[1]}"
        timing = child(glip + ["zeroshot", "eval", "--recipe", target, "--weights", args.weights,
                               "--data-root", str(data), "--out", str(folder), "--force", "--batch-size", "8"],
                       args.threads, folder.with_suffix(".log"))  # fmt: skip
        metrics = json.loads((folder / "metrics.json").read_text())
        rows.append(
            {
                "target": target,
                "mode": "zeroshot",
                "trainable": 0,
                "ap": metrics["AP"],
                "ap50": metrics["AP50"],
                **timing,
            }
        )
    for mode in [m for m in args.modes.split(",") if m]:
        folder = args.work / f"{mode}"
        cmd = glip + ["finetune", "--recipe", "demo/shifted", "--weights", args.weights, "--mode", mode,
                      "--data-root", str(data), "--out", str(folder), "--force", "--epochs", str(args.epochs),
                      "--shots", str(args.shots)]  # fmt: skip
        cmd += [x for s in args.sets for x in ("--set", s)]
        timing = child(cmd, args.threads, folder.with_suffix(".log"))
        result = json.loads((folder / "result.json").read_text())
        rows.append({"target": "demo/shifted", "mode": mode, "trainable": result["trainable"], "total": result["total"],
                     "ap": result["test"]["AP"], "ap50": result["test"]["AP50"], "best_val_AP": result["best_val_AP"],
                     "best_epoch": result["best_epoch"], "steps": result["steps"], **timing})  # fmt: skip
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nano_transfer.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# glip-nano transfer ({args.weights}; fine-tuning: {args.epochs} epochs, "
             f"{'all training images' if not args.shots else f'{args.shots}-shot'}, {args.threads} thread(s))", "",
             "| target | mode | trainable | share | test AP | test AP50 | CPU s | wall s | load |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        share = f"{100 * r['trainable'] / r['total']:.2f} %" if r.get("total") else "-"
        lines.append(f"| {r['target']} | {r['mode']} | {r['trainable']:,} | {share} | {r['ap']:.3f} | "
                     f"{r['ap50']:.3f} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} | "
                     f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |")  # fmt: skip
    (args.out / "nano_transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
