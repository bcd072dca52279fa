"""GLIP-T on CUDA: parity with the official float32 run (the astronaut case) in float32 and under
autocast, and forward timings. Needs a GPU and the reference data.

    python benchmarks/cuda_parity.py --reference ../shared/reference [--out benchmarks/results]

Prints a Rich table and writes ``cuda_parity.json`` / ``cuda_parity.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from glip_transfer.boxes import box_iou
from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.model.postprocess import postprocess
from glip_transfer.reference import apply_deterministic_weights
from glip_transfer.runtime import autocast


def detection_agreement(dets, ref) -> dict:
    """How the 100 detections compare with the reference's (top-10 labels, set match)."""
    boxes = dets.boxes.cpu()
    iou = box_iou(boxes, ref["det.boxes"])
    same = (dets.labels.cpu()[:, None] == ref["det.labels"][None]) & (iou > 0.99)
    return {
        "count": len(dets),
        "top10_labels_equal": bool(torch.equal(dets.labels.cpu()[:10], ref["det.labels"][:10])),
        "top10_max_box_diff": float((boxes[:10] - ref["det.boxes"][:10]).abs().max()) if len(dets) >= 10 else None,
        "max_score_diff_top10": float((dets.scores.cpu()[:10] - ref["det.scores"][:10]).abs().max())
        if len(dets) >= 10
        else None,
        "matched_of_100": int(same.any(0).sum()),
    }


def run_case(model, ref, device, amp: bool) -> dict:
    captured = {}
    hooks = [
        model.backbone.body.register_forward_hook(lambda m, a, o: captured.__setitem__("C", o)),
        model.backbone.register_forward_hook(lambda m, a, o: captured.__setitem__("P", o)),
    ]
    with torch.no_grad(), autocast(device, amp):
        text = model.encode_text(ref["text.input_ids"].to(device), ref["text.attention_mask"].to(device))
        outputs, anchors = model(ref["image.input"].to(device), text)
    for h in hooks:
        h.remove()
    f32 = lambda t: t.float().cpu()  # noqa: E731
    valid = ref["text.attention_mask"][0].bool()
    diffs = {
        "bert": float((f32(text.hidden) - ref["lang.backbone_hidden"]).abs().max()),
        "swin": max(float((f32(c) - ref[f"backbone.body.C{i + 3}"]).abs().max()) for i, c in enumerate(captured["C"])),
        "fpn": max(float((f32(p) - ref[f"backbone.fpn.P{i + 3}"]).abs().max()) for i, p in enumerate(captured["P"])),
        "bbox_reg": max(
            float((f32(t) - ref[f"head.bbox_reg.P{i + 3}"]).abs().max()) for i, t in enumerate(outputs.box_regression)
        ),
        "centerness": max(
            float((f32(t) - ref[f"head.centerness.P{i + 3}"]).abs().max()) for i, t in enumerate(outputs.centerness)
        ),
        "token_logits": max(
            float((f32(t)[..., valid] - ref[f"head.dot_product_logits.P{i + 3}"][..., valid]).abs().max())
            for i, t in enumerate(outputs.token_logits)
        ),
    }
    outputs.box_regression = [t.float() for t in outputs.box_regression]
    outputs.centerness = [t.float() for t in outputs.centerness]
    outputs.token_logits = [t.float() for t in outputs.token_logits]
    dets = postprocess(outputs, anchors, ref["text.positive_map"].to(device), [(500, 500)], model.cfg.postprocess)[0]
    dets = dets.rescale((500, 500), (512, 512))
    return {"max_abs_diff": diffs, "detections": detection_agreement(dets, ref)}


def time_forward(model, device, size, batch, amp, repeats=10) -> float:
    images = torch.randn(batch, 3, *size, device=device)
    ids = torch.zeros(1, 256, dtype=torch.long, device=device)
    ids[0, :4] = torch.tensor([101, 2711, 1012, 102])
    with torch.no_grad(), autocast(device, amp):
        text = model.encode_text(ids, (ids != 0).long())
        for _ in range(3):
            model(images, text)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(images, text)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = load_file(str(Path(args.reference) / "glip_tiny_astronaut.safetensors"))
    model = build_glip(variant_config("glip-t"))
    apply_deterministic_weights(model, 6)
    model = model.eval().to(device)

    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "float32": run_case(model, ref, device, amp=False),
        "amp": run_case(model, ref, device, amp=True),
    }
    timings = []
    for size in ((512, 512), (800, 1344)):
        for batch in (1, 4):
            for amp in (False, True):
                seconds = time_forward(model, device, size, batch, amp)
                timings.append(
                    {
                        "size": f"{size[0]}x{size[1]}",
                        "batch": batch,
                        "amp": amp,
                        "ms_per_image": round(1000 * seconds, 1),
                    }
                )
    report["timings"] = timings
    report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    console = Console()
    table = Table(title=f"GLIP-T on {report['device']}: max |diff| vs the official float32 run")
    table.add_column("tensor")
    table.add_column("float32", justify="right")
    table.add_column("amp", justify="right")
    for key in report["float32"]["max_abs_diff"]:
        table.add_row(key, f"{report['float32']['max_abs_diff'][key]:.2e}", f"{report['amp']['max_abs_diff'][key]:.2e}")
    console.print(table)
    console.print({"float32": report["float32"]["detections"], "amp": report["amp"]["detections"]})
    timing_table = Table(title="forward, ms per image (text encoded once)")
    for col in ("size", "batch", "amp", "ms_per_image"):
        timing_table.add_column(col, justify="right")
    for t in timings:
        timing_table.add_row(t["size"], str(t["batch"]), str(t["amp"]), f"{t['ms_per_image']:.1f}")
    console.print(timing_table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_parity.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# GLIP-T on {report['device']} (torch {report['torch']})",
        "",
        "| tensor | float32 max diff | amp max diff |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | {report['float32']['max_abs_diff'][k]:.2e} | {report['amp']['max_abs_diff'][k]:.2e} |"
        for k in report["float32"]["max_abs_diff"]
    ]
    lines += [
        "",
        f"Detections float32: {report['float32']['detections']}",
        "",
        f"Detections amp: {report['amp']['detections']}",
        "",
        "| size | batch | amp | ms / image |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t['size']} | {t['batch']} | {t['amp']} | {t['ms_per_image']} |" for t in timings]
    lines += ["", f"Peak GPU memory: {report['peak_memory_gib']} GiB"]
    (out / "cuda_parity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
