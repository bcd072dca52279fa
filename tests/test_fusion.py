"""The fused head's bi-directional attention: the text-side fold equals the textbook projections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glip_transfer.model.fusion import BiMultiHeadAttention, _linear_parts


def _attention(v_dim=8, l_dim=12, embed=16, heads=2) -> BiMultiHeadAttention:
    torch.manual_seed(0)
    attn = BiMultiHeadAttention(v_dim, l_dim, embed, heads).double().eval()
    for m in attn.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.bias, std=0.5)  # non-zero biases: the fold moves them around
    return attn


def _run(fn, attn, v, l, mask, names=None):
    attn.zero_grad()
    v = v.clone().requires_grad_(True)
    l = l.clone().requires_grad_(True)
    delta_v, delta_l = fn(v, l, mask)
    (delta_v.square().sum() + delta_l.sin().sum()).backward()
    grads = [p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None and (names is None or names in n)]
    return [delta_v.detach(), delta_l.detach(), v.grad, l.grad, *grads]


@pytest.mark.parametrize("tokens", [1, 7, 20])
def test_text_side_fold_equals_the_projections_with_gradients(tokens):
    attn = _attention()
    v = torch.randn(2, 50, 8, dtype=torch.float64)
    l = torch.randn(2, tokens, 12, dtype=torch.float64)
    mask = torch.ones(2, tokens, dtype=torch.int64)
    mask[1, (tokens + 1) // 2 :] = 0  # padded tokens on the second image
    assert all(_linear_parts(m) is not None for m in (attn.v_proj, attn.values_v_proj, attn.out_v_proj))
    folded = _run(attn.forward, attn, v, l, mask)
    projected = _run(attn._forward_projected, attn, v, l, mask)
    assert len(folded) == len(projected) == 4 + 12  # outputs, inputs' and all 12 parameters' gradients
    for a, b in zip(folded, projected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fold_keeps_dropout_mass_in_the_value_bias(monkeypatch):
    # dropout leaves the attention rows summing to != 1; a uniform "dropout" (x * 0.7) shows it
    # without depending on the random mask's layout
    import glip_transfer.model.fusion as fusion

    monkeypatch.setattr(fusion.F, "dropout", lambda x, p=0.5, training=True: x * 0.7 if training else x)
    attn = _attention().train()
    v = torch.randn(1, 40, 8, dtype=torch.float64)
    l = torch.randn(1, 5, 12, dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.int64)
    for a, b in zip(attn(v, l, mask), attn._forward_projected(v, l, mask)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lora_adapters_are_folded_and_trained_like_the_module_path():
    from peft import LoraConfig, inject_adapter_in_model

    attn = _attention()
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=r"(v_proj|values_v_proj|out_v_proj|l_proj)")
    inject_adapter_in_model(config, attn)
    attn.double()
    for name, p in attn.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)  # peft starts B at zero: make the adapters matter
    assert all(_linear_parts(m) is not None for m in (attn.v_proj, attn.values_v_proj, attn.out_v_proj))
    v = torch.randn(2, 30, 8, dtype=torch.float64)
    l = torch.randn(2, 5, 12, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.int64)
    folded = _run(attn.forward, attn, v, l, mask, names="lora_")
    projected = _run(attn._forward_projected, attn, v, l, mask, names="lora_")
    assert len(folded) == 4 + 8
    for a, b in zip(folded, projected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_adapter_dropout_in_training_falls_back_to_the_module():
    from peft import LoraConfig, inject_adapter_in_model

    attn = _attention()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=r"v_proj"), attn)
    attn.train()
    assert _linear_parts(attn.v_proj) is None
    attn.eval()
    assert _linear_parts(attn.v_proj) is not None


@pytest.mark.parametrize("visual_dim", [1, 2])
def test_probabilities_equal_the_reference_formula_bit_for_bit(visual_dim):
    """The text -> image softmax without the reference's explicit max subtraction and clamp, and the
    image -> text softmax without a mask when every token is real: the same floats."""
    from glip_transfer.model.fusion import CLAMP

    attn = _attention().float()
    torch.manual_seed(1)
    shape = (2, 300, 4, 17) if visual_dim == 1 else (2, 4, 300, 17)
    scores = torch.randn(shape) * 30
    scores.view(-1)[::97] = 7e4  # beyond the clamps
    scores.view(-1)[5::89] = -9e4
    for mask in (torch.ones(2, 17, dtype=torch.int64), torch.tensor([[1] * 17, [1] * 11 + [0] * 6])):
        probs_v, probs_l = attn._scores_to_probs(scores, mask, visual_dim=visual_dim, text_dim=3)
        clamped = scores.clamp(-CLAMP, CLAMP)
        want_l = (clamped - clamped.amax(dim=visual_dim, keepdim=True)).clamp(-CLAMP, CLAMP).softmax(dim=visual_dim)
        want_v = clamped.masked_fill(mask.view(2, 1, 1, 17) == 0, torch.finfo(torch.float32).min).softmax(dim=3)
        assert torch.equal(probs_l, want_l) and torch.equal(probs_v, want_v)
