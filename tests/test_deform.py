"""The CPU modulated deformable 3x3 conv against torchvision's ``deform_conv2d`` (forward and
backward), on odd sizes, both strides, batch 2, far out-of-range / integer / exactly-on-border
offsets, several chunkings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from glip_transfer.model import deform
from glip_transfer.model.deform import modulated_deform_conv3x3

CASES = [(7, 5, 1), (7, 5, 2), (13, 9, 1), (13, 9, 2), (8, 8, 2), (1, 1, 1), (1, 4, 2)]


def _reference(x, offset, mask, weight, bias, stride):
    return deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)


def _inputs(h, w, stride, dtype, batch=2, cin=5, cout=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(batch, cin, h, w, generator=g, dtype=dtype)
    offset = torch.randn(batch, 18, ho, wo, generator=g, dtype=dtype) * 2.5
    offset[:, 0::4] = offset[:, 0::4].round()  # integer offsets (samples exactly on pixels)
    offset[:, 1::7] *= 20  # far outside the image
    mask = torch.rand(batch, 9, ho, wo, generator=g, dtype=dtype)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype)
    bias = torch.randn(cout, generator=g, dtype=dtype)
    return x, offset, mask, weight, bias


def _border_offsets(batch, h, w, stride, dtype, seed=1):
    """Offsets putting every sample on a special coordinate: -1, 0, size-1, size, just inside or
    outside those, or an integer far away."""
    g = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    eps = 1e-3
    targets_y = torch.tensor(
        [-1.0, 0.0, h - 1.0, float(h), -1 + eps, -1 - eps, h - eps, h - 1 + eps, 2.0, -3.0], dtype=dtype
    )
    targets_x = torch.tensor(
        [-1.0, 0.0, w - 1.0, float(w), -1 + eps, -1 - eps, w - eps, w - 1 + eps, 1.0, w + 2.0], dtype=dtype
    )
    ty = targets_y[torch.randint(len(targets_y), (batch, 9, ho, wo), generator=g)]
    tx = targets_x[torch.randint(len(targets_x), (batch, 9, ho, wo), generator=g)]
    tap = torch.arange(9)
    base_y = (torch.arange(ho) * stride - 1).view(1, 1, ho, 1) + (tap // 3).view(1, 9, 1, 1)
    base_x = (torch.arange(wo) * stride - 1).view(1, 1, 1, wo) + (tap % 3).view(1, 9, 1, 1)
    return torch.stack([ty - base_y, tx - base_x], 2).reshape(batch, 18, ho, wo)


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.fixture(params=[None, 7, 1 << 19], ids=["default-chunk", "chunk-7", "chunk-big"])
def chunk(request, monkeypatch):
    """Run with several chunk sizes: 7 values -> 1 position per chunk; 1 << 19 -> one chunk here."""
    if request.param is not None:
        monkeypatch.setattr(deform, "_CHUNK_VALUES", request.param)


@pytest.mark.parametrize("h,w,stride", CASES)
def test_forward_matches_torchvision(h, w, stride, chunk):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x, offset, mask, weight, bias = _inputs(h, w, stride, dtype)
        ref = _reference(x, offset, mask, weight, bias, stride)
        out = modulated_deform_conv3x3(x, offset, mask, weight, bias, stride)
        assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=0, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("h,w,stride", CASES)
def test_backward_matches_torchvision(h, w, stride, chunk):
    inputs = _inputs(h, w, stride, torch.float64)
    shape = _reference(*inputs, stride).shape
    grad_out = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref, ref_grads = _grads(lambda x, o, m, wt, b: _reference(x, o, m, wt, b, stride), inputs, grad_out)
    out, grads = _grads(lambda x, o, m, wt, b: modulated_deform_conv3x3(x, o, m, wt, b, stride), inputs, grad_out)
    for name, a, b in zip(("x", "offset", "mask", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(1.0, b.abs().max().item()), msg=name)


@pytest.mark.parametrize("h,w,stride", [(7, 5, 1), (6, 9, 2), (2, 3, 1)])
def test_exact_border_samples(h, w, stride):
    """Samples exactly on -1, 0, size-1, size and just around them: values and all gradients equal
    torchvision's (its offset gradient at exactly -1 is not zero)."""
    x, _, mask, weight, bias = _inputs(h, w, stride, torch.float64, seed=3)
    offset = _border_offsets(2, h, w, stride, torch.float64)
    inputs = (x, offset, mask, weight, bias)
    grad_out = torch.randn(2, weight.shape[0], *offset.shape[-2:], dtype=torch.float64)
    ref, ref_grads = _grads(lambda *a: _reference(*a, stride), inputs, grad_out)
    out, grads = _grads(lambda *a: modulated_deform_conv3x3(*a, stride), inputs, grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for name, a, b in zip(("x", "offset", "mask", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_offsets_is_plain_conv(stride):
    x, offset, mask, weight, bias = _inputs(9, 6, stride, torch.float32)
    offset.zero_()
    mask.fill_(1)
    out = modulated_deform_conv3x3(x, offset, mask, weight, bias, stride)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, stride=stride, padding=1), rtol=0, atol=1e-5)
    # the mask scales each tap
    half = modulated_deform_conv3x3(x, offset, mask * 0.5, weight, None, stride)
    torch.testing.assert_close(half, 0.5 * F.conv2d(x, weight, None, stride=stride, padding=1), rtol=0, atol=1e-5)


def test_gradcheck_tiny():
    x, offset, mask, weight, bias = _inputs(4, 3, 1, torch.float64, batch=1, cin=2, cout=2)
    offset = offset.clamp(-4, 4) + 0.37  # away from the kinks at integer positions
    args = [t.requires_grad_() for t in (x, offset, mask, weight, bias)]
    assert torch.autograd.gradcheck(lambda *a: modulated_deform_conv3x3(*a, 1), args, eps=1e-6, atol=1e-7)


def test_partial_requires_grad_non_contiguous_and_no_bias():
    """Offsets sliced out of a 27-channel tensor (as in DyHead), no bias, gradient for x only."""
    x, _, _, weight, _ = _inputs(7, 6, 1, torch.float64, seed=4)
    offset_mask = torch.randn(2, 27, 7, 6, dtype=torch.float64)
    offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
    xg = x.clone().requires_grad_()
    out = modulated_deform_conv3x3(xg, offset, mask, weight, None, 1)
    ref = _reference(x, offset, mask, weight, None, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (gx,) = torch.autograd.grad(out.square().sum(), xg)
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(_reference(xr, offset, mask, weight, None, 1).square().sum(), xr)
    torch.testing.assert_close(gx, gr, rtol=0, atol=1e-11)


def test_shape_errors():
    x, offset, mask, weight, bias = _inputs(7, 5, 1, torch.float32)
    with pytest.raises(ValueError):
        modulated_deform_conv3x3(x, offset, mask, weight, bias, 2)
    with pytest.raises(ValueError):
        modulated_deform_conv3x3(x, offset, mask, weight[:, :2], bias, 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_input(stride):
    """An input in channels-last memory format (DyConv shares one such copy per level) gives the same
    result and the same gradients."""
    inputs = _inputs(9, 7, stride, torch.float64)
    grad_out = torch.randn(_reference(*inputs, stride).shape, dtype=torch.float64)
    plain, plain_grads = _grads(lambda *a: modulated_deform_conv3x3(*a, stride), inputs, grad_out)
    x_cl = inputs[0].contiguous(memory_format=torch.channels_last)
    last, last_grads = _grads(lambda *a: modulated_deform_conv3x3(*a, stride), (x_cl, *inputs[1:]), grad_out)
    assert torch.equal(plain, last)
    for a, b in zip(plain_grads, last_grads):
        assert torch.equal(a, b)
