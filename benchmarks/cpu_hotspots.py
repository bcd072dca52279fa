"""CPU hot spots of the GLIP-T forward, before and after, measured in ONE run.

The "before" code paths (the CPU deformable convolution, DyConv's level loop, DyReLU, Swin window
attention and the fusion's probabilities as of commit 4b7a6b5) are kept here, and swapped in by patching
the model's modules; every repetition times both paths back to back (alternating which goes
first), so machine drift and other processes hit both alike. CPU time (``time.process_time``) of
one ``GLIP.detect`` per timing; the median is reported. Also: the detections of both paths
compared, the parity errors of both against the official run (``../shared/reference``, when
present), the GFLOP/s of the main GEMMs (profiler FLOP counts / self time) against this machine's
measured sgemm peak, and the load average (``uptime``) at the start and the end.

    python benchmarks/cpu_hotspots.py [--size 800x800] [--threads 1] [--repeats 5] [--malloc keep|default]
                                      [--out benchmarks/results]

Writes ``cpu_hotspots.json`` / ``.md`` (``cpu_hotspots_malloc_default.*`` with ``--malloc default``)
in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from glip_transfer.allocator import keep_freed_memory
from glip_transfer.config import variant_config
from glip_transfer.model import deform, fusion, head, swin
from glip_transfer.model.glip import build_glip
from glip_transfer.model.postprocess import match_detections, postprocess
from glip_transfer.reference import apply_deterministic_weights

REFERENCE_DIR = Path(os.environ.get("GLIP_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))  # as tests/
CATEGORIES = ["person", "rocket", "american flag", "helmet", "glove"]
CAPTION_IDS = [101, 2711, 1012, 7596, 1012, 2137, 5210, 1012, 10412, 1012, 15913, 102]  # "person. rocket. ..."
PHRASE_TOKENS = ([1], [3], [5, 6], [8], [10])

# --------------------------------------------------------------------------- the "before" code paths


@torch.no_grad()
def before_deform_conv3x3(x, offset, mask, weight, bias, stride=1):
    """The CPU modulated deformable conv of 4b7a6b5: four row gathers and three multiply-adds per
    chunk, ``[P, Cout]`` GEMM output transposed to NCHW afterwards (inference only)."""
    b, cin, h, w = x.shape
    cout = weight.shape[0]
    ho, wo = offset.shape[-2:]
    n_pos = b * ho * wo
    out = torch.empty(n_pos, cout, dtype=x.dtype)
    index, (wy0, wy1, wx0, wx1, *_), m = deform._sampling(offset, mask, h, w, stride)
    index = index.t()  # [4, P*9] as it was laid out then
    wy0 = wy0 * m
    wy1 = wy1 * m
    coef = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1]).unsqueeze(-1)
    xcl = x.permute(0, 2, 3, 1).contiguous().view(b * h * w, cin)
    wmat_t = weight.permute(0, 2, 3, 1).reshape(cout, 9 * cin).t()
    step = max(1, min(n_pos, (1 << 19) // (9 * cin)))
    cols = torch.empty(step * 9, cin, dtype=x.dtype)
    tmp = torch.empty(step * 9, cin, dtype=x.dtype)
    for p0 in range(0, n_pos, step):
        p1 = min(p0 + step, n_pos)
        r0, r1 = p0 * 9, p1 * 9
        c = cols[: r1 - r0]
        t = tmp[: r1 - r0]
        torch.index_select(xcl, 0, index[0, r0:r1], out=c)
        c.mul_(coef[0, r0:r1])
        for k in range(1, 4):
            torch.index_select(xcl, 0, index[k, r0:r1], out=t)
            c.addcmul_(t, coef[k, r0:r1])
        torch.addmm(bias, c.view(p1 - p0, 9 * cin), wmat_t, out=out[p0:p1])
    return out.view(b, ho, wo, cout).permute(0, 3, 1, 2).contiguous()


def before_window_attention(self, x, mask=None):
    """Swin window attention of 4b7a6b5: explicit logits, bias and mask added, softmax, product."""
    bw, n, c = x.shape
    qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
        attn = attn.view(bw, self.num_heads, n, n)
    out = attn.softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(bw, n, c))


def before_dyconv(self, visual):
    """DyConv's level loop of 4b7a6b5 (each convolution makes its own channels-last copy; the terms
    stacked)."""
    out = []
    for level, feature in enumerate(visual):
        offset_mask = self.offset(feature)
        offset = offset_mask[:, :18]
        mask = offset_mask[:, 18:].sigmoid()
        terms = [self.DyConv[1](feature, offset, mask)]
        if level > 0:
            terms.append(self.DyConv[2](visual[level - 1], offset, mask))
        if level < len(visual) - 1:
            h, w = visual[level + 1].shape[-2:]
            upper = self.DyConv[0](
                visual[level + 1], head._offset_for_smaller_output(offset, h, w), head._offset_for_smaller_output(mask, h, w)
            )
            terms.append(F.interpolate(upper, size=feature.shape[-2:], mode="bilinear", align_corners=True))
        stacked = torch.stack(terms)
        attn = head.h_sigmoid(torch.stack([self.AttnConv(t) for t in terms]))
        out.append(self.relu((stacked * attn).mean(dim=0)))
    return out


def before_dyrelu(self, x):
    """DyReLU of 4b7a6b5 (six full-size temporaries)."""
    b, c = x.shape[:2]
    y = head.h_sigmoid(self.fc(x.mean(dim=(2, 3)))).view(b, 4 * c, 1, 1)
    a1, b1, a2, b2 = torch.split(y, c, dim=1)
    a1 = (a1 - 0.5) * 2 + 1.0
    a2 = (a2 - 0.5) * 2
    return torch.max(x * a1 + b1 - 0.5, x * a2 + b2 - 0.5)


def before_scores_to_probs(self, scores, mask_l, visual_dim, text_dim):
    """The fusion's two softmaxes of 4b7a6b5 (explicit max subtraction and clamp, mask always filled)."""
    scores = scores.clamp(-fusion.CLAMP, fusion.CLAMP)
    scores_t = (scores - scores.amax(dim=visual_dim, keepdim=True)).clamp(-fusion.CLAMP, fusion.CLAMP)
    probs_l = scores_t.softmax(dim=visual_dim)
    if mask_l is not None:
        shape = [mask_l.shape[0], 1, 1, 1]
        shape[text_dim] = mask_l.shape[1]
        scores = scores.masked_fill(mask_l.view(shape) == 0, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=text_dim), probs_l


BEFORE = [  # (owner, attribute, the before code)
    (head, "modulated_deform_conv3x3", before_deform_conv3x3),
    (swin.WindowAttention, "forward", before_window_attention),
    (head.DyConv, "forward", before_dyconv),
    (head.DyReLU, "forward", before_dyrelu),
    (fusion.BiMultiHeadAttention, "_scores_to_probs", before_scores_to_probs),
]


@contextlib.contextmanager
def code_path(name: str):
    """Run the model with the ``before`` code patched in, or as it is (``after``)."""
    if name == "after":
        yield
        return
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in BEFORE]
    for owner, attr, code in BEFORE:
        setattr(owner, attr, code)
    try:
        yield
    finally:
        for owner, attr, code in saved:
            setattr(owner, attr, code)


# --------------------------------------------------------------------------- measurements


class ComponentTimer:
    """CPU time inside modules of the given types (forward hooks), per type name."""

    def __init__(self, model, types: dict[str, type]):
        self.seconds = {name: 0.0 for name in types}
        self.hooks = []
        for module in model.modules():
            for name, kind in types.items():
                if isinstance(module, kind):
                    start = {}
                    self.hooks.append(module.register_forward_pre_hook(lambda m, a, s=start: s.__setitem__(0, time.process_time())))
                    self.hooks.append(module.register_forward_hook(
                        lambda m, a, o, s=start, n=name: self.seconds.__setitem__(n, self.seconds[n] + time.process_time() - s[0])))  # fmt: skip

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def sgemm_peak(n: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of one large float32 matmul on this thread count (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_cpu_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def gemm_rates(run) -> list[dict]:
    """FLOPs, self CPU time and GFLOP/s per GEMM-like op of one ``run`` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        run()
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    rows = []
    for e in prof.key_averages():
        if e.flops and e.self_cpu_time_total > 0:
            seconds = e.self_cpu_time_total / 1e6
            rows.append({"op": e.key, "calls": e.count, "gflop": round(e.flops / 1e9, 2), "seconds": round(seconds, 3),
                         "share": round(seconds / total, 3), "gflop_per_s": round(e.flops / 1e9 / seconds, 1)})  # fmt: skip
    return sorted(rows, key=lambda r: -r["seconds"])


def parity_errors(model) -> dict[str, float]:
    """Max abs errors against the official run (as ``tests/test_parity.py`` compares them)."""
    from safetensors.torch import load_file

    ref = load_file(str(REFERENCE_DIR / "glip_tiny_astronaut.safetensors"))
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: captured.__setitem__(i, out)) for i, m in enumerate(model.rpn.head.dyhead_tower)]
    hooks.append(model.backbone.body.register_forward_hook(lambda m, a, out: captured.__setitem__("body", out)))
    hooks.append(model.backbone.register_forward_hook(lambda m, a, out: captured.__setitem__("fpn", out)))
    try:
        with torch.no_grad():
            text = model.encode_text(ref["text.input_ids"], ref["text.attention_mask"])
            outputs, anchors = model(ref["image.input"], text)
            dets = postprocess(outputs, anchors, ref["text.positive_map"], [(500, 500)], model.cfg.postprocess)[0]
    finally:
        for h in hooks:
            h.remove()

    def err(a, b):
        return (a - b).abs().max().item()

    valid = ref["text.attention_mask"][0].bool()
    out = {
        "swin": max(err(c, ref[f"backbone.body.C{i + 3}"]) for i, c in enumerate(captured["body"])),
        "fpn": max(err(p, ref[f"backbone.fpn.P{i + 3}"]) for i, p in enumerate(captured["fpn"])),
    }
    for index in (0, 2, 17):
        visual = captured[index][0] if isinstance(captured[index], tuple) else captured[index]
        out[f"dyhead_tower{index:02d}"] = max(err(v, ref[f"head.tower{index:02d}.visual.P{lv + 3}"]) for lv, v in enumerate(visual))
    out["box_regression"] = max(err(o, ref[f"head.bbox_reg.P{lv + 3}"]) for lv, o in enumerate(outputs.box_regression))
    out["centerness"] = max(err(o, ref[f"head.centerness.P{lv + 3}"]) for lv, o in enumerate(outputs.centerness))
    out["token_logits"] = max(err(o[..., valid], ref[f"head.dot_product_logits.P{lv + 3}"][..., valid])
                              for lv, o in enumerate(outputs.token_logits))  # fmt: skip
    d = dets.rescale((500, 500), (512, 512))
    out["det_labels_equal"] = bool(torch.equal(d.labels, ref["det.labels"]))
    out["det_scores"] = err(d.scores, ref["det.scores"]) if len(d) == len(ref["det.scores"]) else float("nan")
    out["det_boxes"] = err(d.boxes, ref["det.boxes"]) if len(d) == len(ref["det.boxes"]) else float("nan")
    return out


def test_image(h: int, w: int) -> torch.Tensor:
    """The reference's astronaut photo through the test transform at ``h x w`` (random when absent)."""
    photo = REFERENCE_DIR / "astronaut.png"
    if not photo.exists():
        return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    from PIL import Image

    from glip_transfer.config import InputConfig
    from glip_transfer.transforms import to_normalized_tensor

    image = Image.open(photo).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    return to_normalized_tensor(image, InputConfig())[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="800x800", help="input HxW (multiples of 32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timings per code path (after one warm-up each)")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: glibc keeps freed memory, as the glip command sets it (glip_transfer.allocator); "
                             "default: glibc's defaults (page faults every forward)")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.malloc == "keep" and not keep_freed_memory():
        raise SystemExit("--malloc keep: not applied (not glibc, or MALLOC_* / GLIBC_TUNABLES set); use --malloc default")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    h, w = (int(v) for v in args.size.lower().split("x"))

    cfg = variant_config("glip-t")
    model = build_glip(cfg)
    apply_deterministic_weights(model, cfg.head.num_convs)
    model.eval()
    ids = torch.zeros(1, cfg.language.max_query_len, dtype=torch.long)
    ids[0, : len(CAPTION_IDS)] = torch.tensor(CAPTION_IDS)
    positive_map = torch.zeros(len(PHRASE_TOKENS), cfg.language.max_query_len)
    for row, tokens in enumerate(PHRASE_TOKENS):
        positive_map[row, tokens] = 1.0
    images = test_image(h, w)
    with torch.no_grad():
        text = model.encode_text(ids, (ids != 0).long())

    def run():
        with torch.no_grad():
            return model.detect(images, [(h, w)], text, positive_map)[0]

    peak = sgemm_peak()
    paths = ("before", "after")
    timer = ComponentTimer(model, {"deform_conv": head.ModulatedDeformConv, "dyconv": head.DyConv,
                                   "window_attention": swin.WindowAttention, "swin": swin.SwinTransformer})  # fmt: skip
    seconds = {p: [] for p in paths}
    parts = {p: [] for p in paths}
    dets = {}
    for p in paths:  # warm-up, and the detections of each path
        with code_path(p):
            dets[p] = run()
    for r in range(args.repeats):
        for p in paths if r % 2 == 0 else paths[::-1]:
            with code_path(p):
                timer.reset()
                seconds[p].append(_cpu_seconds(run))
                parts[p].append(dict(timer.seconds))
    timer.remove()

    gemms, parity = {}, {}
    for p in paths:
        with code_path(p):
            gemms[p] = gemm_rates(run)
            if (REFERENCE_DIR / "glip_tiny_astronaut.safetensors").exists():
                parity[p] = parity_errors(model)
    same = match_detections(dets["before"], dets["after"])

    summary = {}
    for p in paths:
        summary[p] = {"median_s": round(statistics.median(seconds[p]), 3), "min_s": round(min(seconds[p]), 3),
                      "all_s": [round(s, 3) for s in seconds[p]]}  # fmt: skip
        for part in parts[p][0]:
            summary[p][f"{part}_s"] = round(statistics.median(x[part] for x in parts[p]), 3)
    load_end = os.getloadavg()
    machine = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {args.threads} thread(s), torch {torch.__version__}"
    result = {"machine": machine, "size": args.size, "threads": args.threads, "repeats": args.repeats, "malloc": args.malloc,
              "loadavg_start": load_start, "loadavg_end": load_end, "sgemm_peak_gflop_per_s": round(peak, 1),
              "timing": summary, "detections_before_vs_after": same, "gemms": gemms, "parity_max_errors": parity}  # fmt: skip

    console = Console()
    table = Table(title=f"GLIP-T detect at {args.size}, {args.threads} thread(s), CPU seconds (median of {args.repeats})")
    cols = ["median_s", "min_s", "deform_conv_s", "dyconv_s", "window_attention_s", "swin_s"]
    table.add_column("path")
    for c in cols:
        table.add_column(c, justify="right")
    for p in paths:
        table.add_row(p, *(f"{summary[p][c]:.3f}" for c in cols))
    console.print(table)
    console.print(f"sgemm peak {peak:.1f} GFLOP/s; load average {load_start} -> {load_end}; detections {same}")
    gt = Table(title="GEMM-like ops (profiler FLOPs / self time)")
    for c in ("path", "op", "calls", "gflop", "seconds", "share", "gflop_per_s", "of peak"):
        gt.add_column(c, justify="right")
    for p in paths:
        for g in gemms[p][:6]:
            gt.add_row(p, g["op"], str(g["calls"]), f"{g['gflop']:.1f}", f"{g['seconds']:.3f}", f"{100 * g['share']:.0f}%",
                       f"{g['gflop_per_s']:.1f}", f"{100 * g['gflop_per_s'] / peak:.0f}%")  # fmt: skip
    console.print(gt)
    if parity:
        pt = Table(title="max abs error against the official run (astronaut, 500x500)")
        pt.add_column("tensor")
        for p in paths:
            pt.add_column(p, justify="right")
        for key in parity["before"]:
            pt.add_row(key, *(f"{parity[p][key]:.3g}" if isinstance(parity[p][key], float) else str(parity[p][key]) for p in paths))
        console.print(pt)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "cpu_hotspots" if args.malloc == "keep" else "cpu_hotspots_malloc_default"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# CPU hot spots: GLIP-T detect at {args.size}, {args.threads} thread(s), malloc {args.malloc}", "", f"Machine: {machine}; "
             f"sgemm peak {peak:.1f} GFLOP/s; load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end.", "",
             f"CPU seconds per image, before/after interleaved in one run, median of {args.repeats}:", "",
             "| path | median s | min s | " + " | ".join(c.removesuffix("_s").replace("_", " ") + " s" for c in cols[2:]) + " |",
             "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for p in paths:
        lines.append(f"| {p} | " + " | ".join(f"{summary[p][c]:.3f}" for c in cols) + " |")
    lines += ["", f"Detections before vs after: {json.dumps(same)}", "", "| path | op | calls | GFLOP | s | share | GFLOP/s | of peak |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in paths:
        for g in gemms[p][:6]:
            lines.append(f"| {p} | {g['op']} | {g['calls']} | {g['gflop']:.1f} | {g['seconds']:.3f} | {100 * g['share']:.0f}% | "
                         f"{g['gflop_per_s']:.1f} | {100 * g['gflop_per_s'] / peak:.0f}% |")  # fmt: skip
    if parity:
        lines += ["", "Max abs error against the official run (astronaut, 500x500):", "", "| tensor | before | after |", "|---|---|---|"]
        for key in parity["before"]:
            lines.append(f"| {key} | {parity['before'][key]} | {parity['after'][key]} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
