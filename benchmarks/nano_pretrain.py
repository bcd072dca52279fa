"""The glip-nano pretraining, measured, and the packaged weights made from it.

1. ``glip pretrain --recipe nano/pretrain`` in a child process (``OMP_NUM_THREADS=--threads``;
   the corpus is rendered on first use, inside the timed run): wall time, the child's CPU time
   (``user + sys``, ``os.wait4``) and the machine load (``os.getloadavg``) before and after.
   ``--resume`` continues an interrupted run; every run segment is recorded (``timing.json`` in
   the run folder) and the totals are their sums.
2. ``--ship``: the run's ``model.safetensors`` stored as float16 (parameters; buffers stay
   float32; the language encoder is not stored: the installed package supplies it) in
   ``glip_transfer/weights/glip-nano.safetensors``, and the detections of the float32 and
   float16 models compared on the demo targets' test images (COCO AP of both, the largest
   score difference of matched detections, the largest box-corner difference).
3. The report: ``nano_pretrain.json`` / ``.md`` and a small copy of the run's loss / val-AP curve
   (``nano_pretrain_curves.png``) in ``--results``.

    python benchmarks/nano_pretrain.py [--out runs/nano-pretrain] [--data-root runs/nano-pretrain/data]
                                       [--threads 1] [--resume] [--ship] [--skip-train]
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
TARGETS = ("demo/novel", "demo/shifted")


def run_pretraining(args) -> list[dict]:
    timing_file = args.out / "timing.json"
    segments = json.loads(timing_file.read_text()) if (args.resume and timing_file.exists()) else []
    cmd = [sys.executable, "-m", "glip_transfer.cli", "pretrain", "--recipe", "nano/pretrain", "--data-root",
           str(args.data_root), "--out", str(args.out)] + (["--resume"] if args.resume else ["--force"])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLIP_PROGRESS": "0"}
    args.out.mkdir(parents=True, exist_ok=True)
    load_before, start = os.getloadavg(), time.perf_counter()
    with open(args.out.parent / f"{args.out.name}.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    segment = {"command": " ".join(cmd[2:]), "threads": args.threads, "wall_s": time.perf_counter() - start,
               "cpu_s": usage.ru_utime + usage.ru_stime, "load_before": load_before, "load_after": os.getloadavg(),
               "exit_code": os.waitstatus_to_exitcode(status), "ended": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    segments.append(segment)
    timing_file.write_text(json.dumps(segments, indent=2) + "\n")
    if segment["exit_code"] != 0:
        raise SystemExit(
            f"glip pretrain failed (exit {segment['exit_code']}): see {args.out.parent / f'{args.out.name}.log'}"
        )
    return segments


def ship(model_file: Path, target: Path) -> dict:
    """Write the float16 copy; returns its size and the number of stored values."""
    import torch

    from glip_transfer.checkpoint import load_model, save_model
    from glip_transfer.text_encoders import PACKAGED_ENCODERS

    model, _ = load_model(model_file)
    params = {n for n, _ in model.named_parameters()}
    state = {
        k: (v.to(torch.float16) if k in params and v.is_floating_point() else v) for k, v in model.state_dict().items()
    }
    meta = json.loads(_metadata(model_file).get("train_config", "{}") or "{}")
    encoder = PACKAGED_ENCODERS[model.cfg.language.pretrained]
    save_model(model, target, state=state, metadata={
        "recipe": "nano/pretrain", "storage": "float16 parameters (float32 buffers); loads into a float32 model",
        "language": f"{encoder.package} ({encoder.source}), model.safetensors sha256 {encoder.sha256}, not stored here",
        "train_config": json.dumps(meta), "source_sha256": _sha256(model_file)})  # fmt: skip
    stored = {k: v for k, v in state.items() if not k.startswith("language_backbone.")}
    return {"file": str(target.relative_to(ROOT)), "bytes": target.stat().st_size,
            "values": sum(v.numel() for v in stored.values()), "sha256": _sha256(target)}  # fmt: skip


def _metadata(path: Path) -> dict:
    from glip_transfer.checkpoint import read_safetensors

    return read_safetensors(path)[1]


def _sha256(path: Path) -> str:
    from glip_transfer.checkpoint import file_sha256

    return file_sha256(path)


def compare(fp32: Path, fp16: Path, data_root: Path) -> dict:
    """COCO AP of both models on each target's test split, and how far their detections differ."""
    import torch

    from glip_transfer.checkpoint import load_model
    from glip_transfer.data import DetectionDataset, load_coco
    from glip_transfer.inference import EncodedPrompt
    from glip_transfer.recipes import evaluation_prompt, load_recipe, split_paths
    from glip_transfer.tokenizer import load_tokenizer
    from glip_transfer.training.evaluate import evaluate

    out = {}
    models = {name: load_model(path)[0] for name, path in (("float32", fp32), ("float16", fp16))}
    tok = load_tokenizer(models["float32"].cfg.language.tokenizer)
    for name in TARGETS:
        rec = load_recipe(name)
        ann, img = split_paths(rec, rec.evaluation.split, data_root)
        coco = load_coco(ann, require_annotations=False)
        dataset = DetectionDataset(coco, img, models["float32"].cfg.input)
        prompt = EncodedPrompt.from_chunks(tok, evaluation_prompt(rec, tok, list(coco.categories.values())).chunks, 256)
        results, metrics = {}, {}
        for kind, model in models.items():
            results[kind], m = evaluate(model, dataset, prompt, batch_size=8, device=torch.device("cpu"))
            metrics[kind] = {"AP": m["AP"], "AP50": m["AP50"]}
        score_diff, box_diff, unmatched = _differences(results["float32"], results["float16"])
        out[name] = {"metrics": metrics, "max_score_diff": score_diff, "max_box_diff_px": box_diff,
                     "detections": {k: len(v) for k, v in results.items()},
                     "unmatched_above_0.3": unmatched}  # fmt: skip
    return out


def _differences(a: list[dict], b: list[dict]) -> tuple[float, float, int]:
    """Match detections of the same image and label greedily by box distance: the largest score
    and box-corner differences of the matches, and how many detections scoring > 0.3 found no
    match (within 2 px)."""
    from collections import defaultdict

    groups = defaultdict(list)
    for d in b:
        groups[(d["image_id"], d["category_id"])].append(d)
    score_diff = box_diff = 0.0
    unmatched = 0
    for d in a:
        candidates = groups[(d["image_id"], d["category_id"])]
        best = min(candidates, key=lambda e: max(abs(x - y) for x, y in zip(e["bbox"], d["bbox"])), default=None)
        dist = math.inf if best is None else max(abs(x - y) for x, y in zip(best["bbox"], d["bbox"]))
        if dist > 2.0:
            unmatched += d["score"] > 0.3
            continue
        candidates.remove(best)
        score_diff = max(score_diff, abs(best["score"] - d["score"]))
        box_diff = max(box_diff, dist)
    return score_diff, box_diff, unmatched


def curve(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("type") == "step"]
    evals = [r for r in records if r.get("type") == "eval"]
    chunk = max(1, len(steps) // 20)
    loss = [{"step": steps[min(i + chunk, len(steps)) - 1]["step"],
             "loss": sum(r["loss"] for r in steps[i : i + chunk]) / len(steps[i : i + chunk])}
            for i in range(0, len(steps), chunk)]  # fmt: skip
    return {
        "loss": loss,
        "val": [{"epoch": r["epoch"], "step": r["step"], "AP": r.get("AP"), "AP50": r.get("AP50")} for r in evals],
    }


def small_plot(src: Path, dst: Path, width: int = 880) -> None:
    from PIL import Image

    image = Image.open(src).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    image.save(dst, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "nano-pretrain")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="use the finished run in --out as it is")
    parser.add_argument(
        "--ship", action="store_true", help="write glip_transfer/weights/glip-nano.safetensors and compare it"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.data_root = args.data_root or args.out.parent / f"{args.out.name}-data"

    if not args.skip_train:
        run_pretraining(args)
    segments = json.loads((args.out / "timing.json").read_text())
    result = json.loads((args.out / "result.json").read_text())
    config = json.loads((args.out / "config.json").read_text())
    report = {
        "command": f"OMP_NUM_THREADS={args.threads} glip pretrain --recipe nano/pretrain",
        "environment": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "threads": args.threads},
        "segments": segments,
        "cpu_s": sum(s["cpu_s"] for s in segments), "wall_s": sum(s["wall_s"] for s in segments),
        "steps": result["steps"], "epochs": result["epochs"], "best_val_AP": result["best_val_AP"],
        "trainable": result["trainable"], "total": result["total"], "images": config["images"],
        "train": config["train"],
        "model": config["model"], "curve": curve(args.out),
    }  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    if (args.out / "curves.png").exists():
        small_plot(args.out / "curves.png", args.results / "nano_pretrain_curves.png")
    if args.ship:
        from glip_transfer.hub import PACKAGED_DIR

        NANO_WEIGHTS = PACKAGED_DIR / "glip-nano.safetensors"
        report["shipped"] = ship(args.out / "model.safetensors", NANO_WEIGHTS)
        report["float16_vs_float32"] = compare(args.out / "model.safetensors", NANO_WEIGHTS, args.data_root)
    (args.results / "nano_pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# glip-nano pretraining", "",
             f"`{report['command']}` (the corpus rendered inside the run), {report['steps']} steps of "
             f"{config['train']['batch_size']} images ({report['images']} images x {report['epochs']} epochs), "
             f"{report['trainable']:,} trainable parameters (the language encoder frozen).", "",
             f"CPU time {report['cpu_s'] / 60:.1f} min (user + sys of the process), "
             f"wall {report['wall_s'] / 60:.1f} min, load "
             + ", ".join(f"{s['load_before'][0]:.1f} -> {s['load_after'][0]:.1f}" for s in segments)
             + f" ({os.cpu_count()} CPUs).", "",
             "| epoch | step | val AP | val AP50 |", "| ---: | ---: | ---: | ---: |"]  # fmt: skip
    lines += [f"| {v['epoch']} | {v['step']} | {v['AP']:.3f} | {v['AP50']:.3f} |" for v in report["curve"]["val"]]
    if args.ship:
        s = report["shipped"]
        lines += ["", f"Shipped: `{s['file']}`, {s['bytes'] / 1e6:.1f} MB ({s['values']:,} values, float16), "
                  f"sha256 {s['sha256'][:16]}...", "",
                  "| target (test) | float32 AP / AP50 | float16 AP / AP50 | max score diff | max box diff (px) "
                  "| unmatched > 0.3 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for name, c in report["float16_vs_float32"].items():
            m32, m16 = c["metrics"]["float32"], c["metrics"]["float16"]
            lines.append(f"| {name} | {m32['AP']:.4f} / {m32['AP50']:.4f} | {m16['AP']:.4f} / {m16['AP50']:.4f} | "
                         f"{c['max_score_diff']:.2e} | {c['max_box_diff_px']:.3f} | "
                         f"{c['unmatched_above_0.3']} |")  # fmt: skip
    lines += ["", "Curve: `nano_pretrain_curves.png`."]
    (args.results / "nano_pretrain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
