"""Training on CUDA: mixed precision (bf16 autocast; fp16 with a GradScaler), skipped overflow steps.
Skipped without a GPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from glip_transfer.config import variant_config
from glip_transfer.model.fusion import BiMultiHeadAttention
from glip_transfer.model.glip import build_glip
from glip_transfer.model.loss import GroundingTarget
from glip_transfer.training.config import TrainConfig
from glip_transfer.training.data import Batch, FixedPrompt
from glip_transfer.training.engine import Trainer, TrainModule
from glip_transfer.training.modes import apply_mode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fp16_unsupported_by_the_model() -> str | None:
    """The fused head masks scores with -9e15, which float16 cannot hold (the official adds a
    float32 mask instead); until that changes, float16 autocast cannot run the model."""
    attn = BiMultiHeadAttention(8, 8, 8, 2).cuda()
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            attn(
                torch.randn(1, 4, 8, device="cuda"),
                torch.randn(1, 3, 8, device="cuda"),
                torch.tensor([[1, 1, 0]], device="cuda"),
            )
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def setup(mode, amp_dtype, amp=True, tmp_path=None):
    if amp and amp_dtype == "float16":
        problem = fp16_unsupported_by_the_model()
        if problem:
            pytest.xfail(f"float16 autocast fails in the model's fusion layer: {problem}")
    torch.manual_seed(0)
    model = build_glip(variant_config("test-tiny"))
    lr = 0.05 if mode == "prompt" else 1e-3
    cfg = TrainConfig(batch_size=2, amp=amp, amp_dtype=amp_dtype, lr=lr, schedule="constant")
    plan = apply_mode(model, mode, cfg)
    module = TrainModule(model, plan).cuda()
    ids = torch.zeros(1, 256, dtype=torch.int64)
    ids[0, :7] = torch.tensor([101, 2417, 1012, 2665, 1012, 2630, 102])
    mask = (ids > 0).long()
    pmap = torch.zeros(2, 256)
    pmap[0, 1] = pmap[1, 3] = 1
    prompt = FixedPrompt("red. green. blue", ids, mask, pmap, [1, 2])
    trainer = Trainer(module, cfg, [0, 1], device=torch.device("cuda"), out_dir=tmp_path, prompt=prompt, progress=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 128, generator=g)
    targets = [
        GroundingTarget(torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 120.0, 110.0]]), pmap.clone())
        for _ in range(2)
    ]
    return trainer, module, Batch(images, [(128, 128)] * 2, targets, [1, 2])


@pytest.mark.parametrize("mode", ["full", "prompt", "linear", "lora"])
@pytest.mark.parametrize("amp_dtype, amp", [("bfloat16", True), ("float16", True), ("auto", False)])
def test_mixed_precision_steps_train(tmp_path, mode, amp_dtype, amp):
    trainer, module, batch = setup(mode, amp_dtype, amp, tmp_path)
    assert (trainer.scaler is not None) == (amp and amp_dtype == "float16")
    before = {n: p.detach().clone() for n, p in module.named_trainable()}
    losses = [trainer.train_step(batch)["loss"] for _ in range(6)]
    assert all(math.isfinite(v) for v in losses)
    assert trainer.state.skipped <= (3 if amp_dtype == "float16" else 0)  # fp16: the first scales may overflow
    assert min(losses[2:]) < losses[0], losses
    assert any(not torch.equal(before[n], p) for n, p in module.named_trainable())
    assert all(p.dtype == torch.float32 for _, p in module.named_trainable())  # master weights stay float32


def test_fp16_overflow_is_skipped_and_the_scale_drops(tmp_path):
    trainer, module, batch = setup("linear", "float16", True, tmp_path)
    trainer.train_step(batch)
    scale = trainer.scaler.get_scale()
    skipped = trainer.state.skipped
    bad = Batch(batch.images * float("inf"), batch.image_sizes, batch.targets, batch.image_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = trainer.train_step(bad)
    assert out["skipped"] and trainer.state.skipped == skipped + 1
    assert trainer.scaler.get_scale() < scale
