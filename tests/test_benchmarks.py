"""The benchmark scripts that cannot run in full here keep working: ``benchmarks/gpu_eval.py --smoke``
(test-tiny on the CPU) end to end, learnt-weights comparison included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from glip_transfer.checkpoint import save_model
from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_eval_smoke(tmp_path, vocab_dir):
    torch.manual_seed(0)
    model = build_glip(variant_config("test-tiny"))
    with torch.no_grad():
        model.rpn.head.bias0.fill_(2.0)
    save_model(model, tmp_path / "tiny.safetensors")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_eval.py"), "--smoke", "--device", "cpu", "--tokenizer", str(vocab_dir),
           "--weights", str(tmp_path / "tiny.safetensors"), "--out", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_eval_smoke.json").read_text())
    assert [(r["precision"], r["batch"]) for r in data["throughput"]] == [("float32", 1), ("float32", 2)]
    assert all(r["images_per_s"] > 0 for r in data["throughput"])
    assert len(data["amp_vs_float32"]) == 2  # deterministic and the learnt weights
    for agreement in data["amp_vs_float32"].values():
        # on a CPU "AMP" is float32 again: every detection pairs with itself
        assert agreement["float32_all"] > 0 and agreement["strict_all"] == agreement["float32_all"] == agreement["amp_all"]
    assert (tmp_path / "out" / "gpu_eval_smoke.md").exists()
