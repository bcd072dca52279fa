"""A fast CPU modulated deformable 3x3 convolution (DCNv2), equal in function to
``torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=s, padding=1, mask=mask)``.

torchvision's CPU kernel runs a scalar im2col and a col2im with per-element scatter; here the
im2col of a chunk of output positions is one ``embedding_bag`` over the rows of a channels-last
copy of the input (each sample is the weighted sum of four neighbour rows, weights = bilinear
weight x mask: exactly what a weighted bag sum computes, in one vectorised pass), the product with
the weights is one GEMM per chunk written straight into the NCHW output (no transpose after), and
the backward is written out by hand with the same conventions as torchvision's kernels. Chunks
bound the im2col block's memory. An input already in ``torch.channels_last`` memory format is used
without a copy (``DyConv`` makes that copy once for the three convolutions that read a level).

Semantics (torchvision / mmcv DCNv2): the sample for output ``(i, j)`` and tap ``(ki, kj)`` (row
major, offset channels ``2*t`` = dy and ``2*t + 1`` = dx for tap ``t = 3*ki + kj``) lies at
``y = i*stride - 1 + ki + dy``, ``x = j*stride - 1 + kj + dx``; its value is the bilinear
interpolation of the four neighbours ``floor(y) + {0, 1}``, ``floor(x) + {0, 1}`` where each
neighbour outside the image counts as 0 (so a sample with ``y <= -1``, ``y >= H``, ``x <= -1`` or
``x >= W`` is 0), times the tap's mask. The offset gradient is the derivative of that bilinear form
with the weights taken at ``floor`` (torchvision's ``get_coordinate_weight``), including at
integer positions.

On devices other than the CPU, torchvision's kernel is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

__all__ = ["modulated_deform_conv3x3"]

# Output positions per chunk: the chunk's im2col block is this many x 9 x C_in values (8 MiB at
# 256 channels in float32: ~900 positions). Measured on GLIP-T's head (800x800, one thread): 2x
# and 4x smaller chunks are 5 % and 12 % slower (the GEMM's N gets small), 2x larger ones equal.
_CHUNK_VALUES = 1 << 21


def modulated_deform_conv3x3(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
) -> torch.Tensor:
    """Modulated deformable 3x3 conv, padding 1, dilation 1, one offset group.

    ``x [B, Cin, H, W]``, ``offset [B, 18, Ho, Wo]`` ((dy, dx) per tap, taps row-major),
    ``mask [B, 9, Ho, Wo]``, ``weight [Cout, Cin, 3, 3]``, ``bias [Cout]`` or None; returns
    ``[B, Cout, Ho, Wo]`` with ``Ho = (H - 1) // stride + 1`` (likewise ``Wo``).
    """
    if x.device.type != "cpu":
        return deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    b, cin, h, w = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    if weight.shape[1:] != (cin, 3, 3):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit a 3x3 conv of {cin} input channels")
    if offset.shape != (b, 18, ho, wo) or mask.shape != (b, 9, ho, wo):
        raise ValueError(
            f"offset {tuple(offset.shape)} / mask {tuple(mask.shape)} must be [{b}, 18|9, {ho}, {wo}] "
            f"for input {tuple(x.shape)} and stride {stride}"
        )
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return _ModulatedDeformConv3x3.apply(x, offset, mask, weight, bias, int(stride))


def _sampling(offset: torch.Tensor, mask: torch.Tensor, h: int, w: int, stride: int):
    """Per (position, tap), in the order ``[B, Ho, Wo, 9]`` flattened (``P*9`` rows): the four
    neighbours' flat row indices ``[P*9, 4]`` into the channels-last input ``[B*H*W, C]`` (clamped;
    invalid neighbours get weight 0), the pieces of the bilinear weights and the mask ``[P*9]``."""
    b, _, ho, wo = offset.shape
    dt, dev = offset.dtype, offset.device
    off = offset.reshape(b, 9, 2, ho, wo).permute(0, 3, 4, 1, 2)  # [B, Ho, Wo, 9, 2]
    taps = torch.arange(3, device=dev, dtype=dt)
    # integer part first (exact), then + offset: one rounding, as in torchvision's kernel
    base_y = (torch.arange(ho, device=dev, dtype=dt) * stride - 1).view(ho, 1, 1) + taps.repeat_interleave(3).view(1, 1, 9)
    base_x = (torch.arange(wo, device=dev, dtype=dt) * stride - 1).view(1, wo, 1) + taps.repeat(3).view(1, 1, 9)
    y = base_y + off[..., 0]  # [B, Ho, Wo, 9]
    x = base_x + off[..., 1]
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly = y - y0
    lx = x - x0
    # neighbour validity as 0/1 in dtype; bounds tested on the float floor (no int overflow for
    # huge offsets); indices clamped, only used where the weight is non-zero
    vy0 = ((y0 >= 0) & (y0 <= h - 1)).to(dt)
    vy1 = ((y0 >= -1) & (y0 <= h - 2)).to(dt)
    vx0 = ((x0 >= 0) & (x0 <= w - 1)).to(dt)
    vx1 = ((x0 >= -1) & (x0 <= w - 2)).to(dt)
    wy0 = (1 - ly) * vy0
    wy1 = ly * vy1
    wx0 = (1 - lx) * vx0
    wx1 = lx * vx1
    iy0 = y0.clamp(-1, h).long()
    ix0 = x0.clamp(-1, w).long()
    iy1 = (iy0 + 1).clamp_(0, h - 1)
    ix1 = (ix0 + 1).clamp_(0, w - 1)
    iy0 = iy0.clamp_(0, h - 1)
    ix0 = ix0.clamp_(0, w - 1)
    img = (torch.arange(b, device=dev) * (h * w)).view(b, 1, 1, 1)
    r0 = img + iy0 * w
    r1 = img + iy1 * w
    index = torch.stack([r0 + ix0, r0 + ix1, r1 + ix0, r1 + ix1], dim=-1).view(-1, 4)
    m = mask.permute(0, 2, 3, 1).reshape(-1)
    return index, (wy0.reshape(-1), wy1.reshape(-1), wx0.reshape(-1), wx1.reshape(-1), vy0, vy1, vx0, vx1), m


def _chunk_positions(n_positions: int, cin: int) -> int:
    return max(1, min(n_positions, _CHUNK_VALUES // (9 * cin)))


class _ModulatedDeformConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride):
        with torch.autocast("cpu", enabled=False):
            b, cin, h, w = x.shape
            cout = weight.shape[0]
            ho, wo = offset.shape[-2:]
            dt = x.dtype
            offset, mask, weight, bias = offset.to(dt), mask.to(dt), weight.to(dt), bias.to(dt)
            ctx.stride = stride
            ctx.save_for_backward(x, offset, mask, weight)
            n_pos = b * ho * wo
            out = torch.empty(b, cout, ho * wo, dtype=dt, device=x.device)
            if n_pos == 0 or cin == 0:
                out.copy_(bias[:, None].expand_as(out))
                return out.view(b, cout, ho, wo)
            index, (wy0, wy1, wx0, wx1, *_), m = _sampling(offset, mask, h, w, stride)
            wy0 = wy0 * m
            wy1 = wy1 * m
            coef = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=-1)  # [P*9, 4], like index
            xcl = x.permute(0, 2, 3, 1).contiguous().view(b * h * w, cin)  # channels-last (free if it is already)
            wmat = weight.permute(0, 2, 3, 1).reshape(cout, 9 * cin)  # (tap, channel) order
            per_image = ho * wo
            step = _chunk_positions(per_image, cin)
            for i in range(b):
                for p0 in range(0, per_image, step):
                    p1 = min(p0 + step, per_image)
                    rows = slice((i * per_image + p0) * 9, (i * per_image + p1) * 9)
                    # the bilinear blend of the four neighbours, masked, in one op: a weighted sum
                    # of rows of xcl is what embedding_bag computes (one vectorised pass)
                    cols = F.embedding_bag(index[rows], xcl, mode="sum", per_sample_weights=coef[rows])
                    # [Cout, 9*Cin] @ [9*Cin, n] straight into the NCHW output (no transpose after)
                    torch.mm(wmat, cols.view(p1 - p0, 9 * cin).t(), out=out[i, :, p0:p1])
            out += bias[:, None]
            return out.view(b, cout, ho, wo)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, offset, mask, weight = ctx.saved_tensors
        stride = ctx.stride
        need_x, need_off, need_mask, need_w, need_b, _ = ctx.needs_input_grad
        with torch.autocast("cpu", enabled=False):
            b, cin, h, w = x.shape
            cout = weight.shape[0]
            ho, wo = offset.shape[-2:]
            dt = x.dtype
            n_pos = b * ho * wo
            gout = grad_out.to(dt).permute(0, 2, 3, 1).contiguous().view(n_pos, cout)
            grad_b = gout.sum(0) if need_b else None
            if n_pos == 0 or cin == 0 or not (need_x or need_off or need_mask or need_w):
                zeros = [torch.zeros_like(t) if n else None for t, n in
                         ((x, need_x), (offset, need_off), (mask, need_mask), (weight, need_w))]
                return (*zeros, grad_b, None)
            index, (wy0, wy1, wx0, wx1, vy0, vy1, vx0, vx1), m = _sampling(offset, mask, h, w, stride)
            index = index.t().contiguous()  # [4, P*9]: one row per neighbour
            bil = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1])  # bilinear weights, no mask
            coef = (bil * m).unsqueeze(-1)
            xcl = x.permute(0, 2, 3, 1).contiguous().view(b * h * w, cin)
            wmat = weight.permute(0, 2, 3, 1).reshape(cout, 9 * cin)
            need_dots = need_off or need_mask
            step = _chunk_positions(n_pos, cin)
            gath = torch.empty(4, step * 9, cin, dtype=dt, device=x.device)
            cols = torch.empty(step * 9, cin, dtype=dt, device=x.device) if need_w else None
            gcol = torch.empty(step * 9, cin, dtype=dt, device=x.device)
            tmp = torch.empty(step * 9, cin, dtype=dt, device=x.device)
            dots = torch.empty(4, n_pos * 9, dtype=dt, device=x.device) if need_dots else None
            gw = torch.zeros(cout, 9 * cin, dtype=dt, device=x.device) if need_w else None
            gx = torch.zeros(b * h * w, cin, dtype=dt, device=x.device) if need_x else None
            for p0 in range(0, n_pos, step):
                p1 = min(p0 + step, n_pos)
                r0, r1 = p0 * 9, p1 * 9
                n = r1 - r0
                g = gath[:, :n]
                if need_w or need_dots:
                    for k in range(4):
                        torch.index_select(xcl, 0, index[k, r0:r1], out=g[k])
                if need_w:
                    c = cols[:n]
                    torch.mul(g[0], coef[0, r0:r1], out=c)
                    for k in range(1, 4):
                        c.addcmul_(g[k], coef[k, r0:r1])
                    gw.addmm_(gout[p0:p1].t(), c.view(p1 - p0, 9 * cin))
                gc = gcol[:n]
                torch.mm(gout[p0:p1], wmat, out=gc.view(p1 - p0, 9 * cin))  # d loss / d (masked sample)
                t = tmp[:n]
                for k in range(4):
                    if need_dots:
                        torch.mul(g[k], gc, out=t)
                        torch.sum(t, dim=1, out=dots[k, r0:r1])
                    if need_x:
                        torch.mul(gc, coef[k, r0:r1], out=t)
                        gx.index_add_(0, index[k, r0:r1], t)
            grad_x = grad_off = grad_mask = grad_w = None
            if need_x:
                grad_x = gx.view(b, h, w, cin).permute(0, 3, 1, 2).contiguous()
            if need_mask:
                grad_mask = (bil * dots).sum(0).view(b, ho, wo, 9).permute(0, 3, 1, 2).contiguous()
            if need_off:
                vy0, vy1, vx0, vx1 = (v.reshape(-1) for v in (vy0, vy1, vx0, vx1))
                d0, d1, d2, d3 = dots
                # derivatives of the four bilinear weights along y and x (floor convention)
                gy = (wx0 * (d2 * vy1 - d0 * vy0) + wx1 * (d3 * vy1 - d1 * vy0)) * m
                gxo = (wy0 * (d1 * vx1 - d0 * vx0) + wy1 * (d3 * vx1 - d2 * vx0)) * m
                grad_off = torch.stack([gy, gxo], -1).view(b, ho, wo, 9, 2).permute(0, 3, 4, 1, 2)
                grad_off = grad_off.reshape(b, 18, ho, wo)
            if need_w:
                grad_w = gw.view(cout, 3, 3, cin).permute(0, 3, 1, 2).contiguous()
            return grad_x, grad_off, grad_mask, grad_w, grad_b, None
