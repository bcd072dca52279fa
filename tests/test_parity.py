"""Full-size GLIP-T parity with the official model (``../shared/reference``), the astronaut case.

The deterministic weights are re-created from the reference's rule; every stored intermediate
tensor is compared within the tolerances its README suggests, and the detections end to end,
also through the real ``glip predict`` command from a checkpoint file in the official layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.model.head import HeadOutputs
from glip_transfer.model.postprocess import Detections, postprocess
from glip_transfer.reference import apply_deterministic_weights

pytestmark = pytest.mark.slow

CATEGORIES = ["person", "rocket", "american flag", "helmet", "glove"]

# Largest absolute differences from the official float32 run, measured on this project's 2-core
# AVX-512 CPU (1 and 2 threads alike): BERT 3.6e-6, Swin 4.3e-6, FPN 9.1e-6, DyHead visual levels
# 1.5e-4 and text 5.0e-6, head outputs 2.7e-5. Each tolerance is about ten times that, so that a
# real regression fails; the head's 2e-4 (7x) predates the measurement and is kept.
TOL_BERT = 4e-5
TOL_SWIN = 5e-5
TOL_FPN = 1e-4
TOL_DYHEAD_VISUAL = 1.5e-3
TOL_DYHEAD_TEXT = 5e-5
TOL_HEAD = 2e-4


@pytest.fixture(scope="module")
def ref(reference_dir):
    from safetensors.torch import load_file

    return load_file(str(reference_dir / "glip_tiny_astronaut.safetensors"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_glip(variant_config("glip-t"))
    apply_deterministic_weights(m, num_convs=6)
    return m.eval()


@pytest.fixture(scope="module")
def run(model, ref):
    """One forward of the whole model on the stored input, capturing every compared stage."""
    captured = {}
    hooks = [
        module.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
        for i, module in enumerate(model.rpn.head.dyhead_tower)
    ]
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
    return {"text": text, "outputs": outputs, "anchors": anchors, "dets": dets, "captured": captured}


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_language_backbone(run, ref):
    assert max_diff(run["text"].hidden, ref["lang.backbone_hidden"]) < TOL_BERT


def test_swin_and_fpn(run, ref):
    for i, c in enumerate(run["captured"]["body"]):
        assert max_diff(c, ref[f"backbone.body.C{i + 3}"]) < TOL_SWIN
    for i, p in enumerate(run["captured"]["fpn"]):
        assert max_diff(p, ref[f"backbone.fpn.P{i + 3}"]) < TOL_FPN


def test_dyhead_stages(run, ref):
    cap = run["captured"]
    for index in (0, 2, 17):
        visual = cap[index][0] if isinstance(cap[index], tuple) else cap[index]
        for level, v in enumerate(visual):
            assert max_diff(v, ref[f"head.tower{index:02d}.visual.P{level + 3}"]) < TOL_DYHEAD_VISUAL, (index, level)
    assert max_diff(cap[0][1], ref["head.tower00.lang_hidden"]) < TOL_DYHEAD_TEXT
    assert max_diff(cap[1], ref["head.tower01.lang_hidden"]) < TOL_DYHEAD_TEXT
    assert max_diff(cap[16], ref["head.tower17.lang_hidden"]) < TOL_DYHEAD_TEXT  # module 16 is the last BERT layer


def test_head_outputs(run, ref):
    out = run["outputs"]
    valid = ref["text.attention_mask"][0].bool()
    for level in range(5):
        p = f"P{level + 3}"
        assert max_diff(out.box_regression[level], ref[f"head.bbox_reg.{p}"]) < TOL_HEAD
        assert max_diff(out.centerness[level], ref[f"head.centerness.{p}"]) < TOL_HEAD
        assert max_diff(out.token_logits[level][..., valid], ref[f"head.dot_product_logits.{p}"][..., valid]) < TOL_HEAD
        assert max_diff(run["anchors"][level], ref[f"post.anchors.{p}"]) == 0


def test_postprocessor_on_stored_head_outputs_is_exact(model, ref):
    levels = [f"P{i}" for i in range(3, 8)]
    outputs = HeadOutputs(
        [ref[f"head.bbox_reg.{p}"] for p in levels],
        [ref[f"head.centerness.{p}"] for p in levels],
        [ref[f"head.dot_product_logits.{p}"] for p in levels],
    )
    anchors = [ref[f"post.anchors.{p}"] for p in levels]
    dets = postprocess(outputs, anchors, ref["text.positive_map"], [(500, 500)], model.cfg.postprocess)[0]
    assert len(dets) == 100
    assert torch.equal(dets.labels, ref["det.labels"])
    # bit-exact where torch's vectorised sigmoid matches the reference machine's; CPUs with
    # other SIMD kernels (AVX-512 here) round some scores one float32 ULP (6e-8 at 0.5) apart
    assert max_diff(dets.scores, ref["det.scores"]) <= 1.2e-7
    assert max_diff(dets.boxes, ref["det.boxes_resized_image"]) < 1e-3
    assert max_diff(dets.rescale((500, 500), (512, 512)).boxes, ref["det.boxes"]) < 1e-3


def assert_detections_match(boxes, scores, labels, ref):
    """Top 10 in order; the rest as a set (same label, IoU > 0.99, score within 1e-4)."""
    from glip_transfer.boxes import box_iou

    assert len(scores) == 100
    assert torch.equal(labels[:10], ref["det.labels"][:10])
    assert (boxes[:10] - ref["det.boxes"][:10]).abs().max() < 1e-2
    assert (scores[:10] - ref["det.scores"][:10]).abs().max() < 1e-4
    iou = box_iou(boxes, ref["det.boxes"])
    same = (labels[:, None] == ref["det.labels"][None]) & (iou > 0.99)
    same &= (scores[:, None] - ref["det.scores"][None]).abs() < 1e-4
    assert same.any(1).all() and same.any(0).all()


def test_end_to_end_detections(run, ref):
    dets: Detections = run["dets"].rescale((500, 500), (512, 512))
    assert_detections_match(dets.boxes, dets.scores, dets.labels, ref)


def glip_command() -> list[str]:
    exe = shutil.which("glip", path=os.path.dirname(sys.executable)) or shutil.which("glip")
    return [exe] if exe else [sys.executable, "-m", "glip_transfer"]


def test_glip_predict_cli_from_official_checkpoint(model, ref, reference_dir, vocab_dir, tmp_path):
    weights = tmp_path / "glip_tiny_model_o365_goldg.pth"
    state = {"module." + k: v for k, v in model.state_dict().items()}
    state["module.language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save({"model": state, "iteration": 1}, weights)
    out_json = tmp_path / "dets.json"
    cmd = glip_command() + [
        "predict",
        str(reference_dir / "astronaut.png"),
        "--weights",
        str(weights),
        "--classes",
        ",".join(CATEGORIES),
        "--min-size",
        "500",
        "--max-size",
        "800",
        "--threshold",
        "0",
        "--max-detections",
        "100",
        "--tokenizer",
        str(vocab_dir),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "vis"),
        "--json",
        str(out_json),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert len(data) == 1 and data[0]["width"] == 512 and data[0]["height"] == 512
    dets = data[0]["detections"]
    boxes = torch.tensor([d["box"] for d in dets])
    scores = torch.tensor([d["score"] for d in dets])
    labels = torch.tensor([CATEGORIES.index(d["label"]) + 1 for d in dets])
    assert_detections_match(boxes, scores, labels, ref)
    assert (tmp_path / "vis" / "astronaut.png").exists()

    # the model-only conversion gives the very same detections and the same inspection
    converted = tmp_path / "glip_t.safetensors"
    done = subprocess.run(glip_command() + ["weights", "convert", str(weights), str(converted)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    converted_json = tmp_path / "converted.json"
    cmd[cmd.index(str(weights))] = str(converted)
    cmd[cmd.index(str(out_json))] = str(converted_json)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(converted_json.read_text())[0]["detections"] == dets
    inspected = []
    for w in (weights, converted):
        out = subprocess.run(glip_command() + ["inspect", str(w), "--json"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        info = json.loads(out.stdout)
        inspected.append({k: v for k, v in info.items() if k not in ("path", "format")})
    assert inspected[0] == inspected[1] and inspected[0]["keys"]["ok"] and inspected[0]["detected_variant"] == "glip-t"
