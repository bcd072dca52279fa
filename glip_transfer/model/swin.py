"""Swin Transformer image backbone, as Microsoft's *detection* Swin (GLIP ``swint.py``).

Differences from the classification Swin (e.g. timm) that matter for parity with the checkpoints:

- windows are zero-padded right/bottom to a multiple of the window size *before* the cyclic
  shift, and the padded tokens are attended to (only the shifted-window mask, -100, is applied);
- windows and shifts are never shrunk for small feature maps (a 7x7 map is still shifted);
- ``downsample`` (patch merging) belongs to the stage it follows (``layers.i.downsample``);
- output LayerNorms ``norm1..norm3`` after stages 1-3; stage 0's output is not returned.

Tokens are kept channels-last, ``[B, H, W, C]``, between blocks so that windowing is a reshape.
State-dict keys equal the official ones (``patch_embed.proj``, ``layers.i.blocks.j.attn.qkv``...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import SwinConfig

MASK_VALUE = -100.0  # the reference's value for pairs from different shifted regions


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the whole residual branch of a random subset of samples."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x * x.new_empty(shape).bernoulli_(keep) / keep


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of ``ws``) -> ``[B * nW, ws*ws, C]``, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).transpose(2, 3)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, ws*ws, C]`` -> ``[B, h, w, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(hp: int, wp: int, ws: int, shift: int, device, dtype) -> torch.Tensor:
    """Additive mask ``[nW, ws*ws, ws*ws]`` for the shifted windows of a padded ``hp x wp`` map.

    After the cyclic shift, the last ``ws`` rows/columns mix tokens from up to three regions
    (``[0, hp-ws)``, ``[hp-ws, hp-shift)``, ``[hp-shift, hp)``, same for columns); tokens of
    different regions must not attend to each other. Regions are defined on the *padded* size,
    as in the reference, so padded tokens belong to the last region.
    """
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    region_h = (rows >= hp - ws).long() + (rows >= hp - shift).long()
    region_w = (cols >= wp - ws).long() + (cols >= wp - shift).long()
    region = (region_h[:, None] * 3 + region_w[None, :]).to(dtype)  # [hp, wp]
    windows = window_partition(region[None, :, :, None], ws).squeeze(-1)  # [nW, ws*ws]
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, MASK_VALUE)


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` on ``[..., C]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    ``x [B * nW, N, C]`` (N = ws*ws) and an optional additive ``mask [nW, N, N]`` -> ``[B * nW, N, C]``.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        # one bias per head and relative offset (dy, dx) in [-(ws-1), ws-1]^2
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        grid = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        coords = torch.stack(grid).flatten(1)  # [2, N]: (row, col) of each window position
        rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # [2, N, N], offsets from 0
        # persistent int64 buffer: the checkpoints carry it, so it must be in the state dict
        self.register_buffer("relative_position_index", rel[0] * (2 * window_size - 1) + rel[1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B*nW, heads, N, d]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # [1, heads, N, N]
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias + mask[:, None]).repeat(bw // nw, 1, 1, 1)  # [B*nW, heads, N, N]
        q = q * self.scale  # scale q first, like the reference
        if bias.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu":
            # SDPA's fused CPU kernel has no gradient for an additive mask (its math fallback is
            # slower than this): training the bias table on a CPU takes the explicit product
            out = (q @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v
        else:
            # one fused kernel (flash attention on CPU, also with a float mask): no [B*nW, heads, N, N]
            # logits in memory; same function (the bias and the -100 mask are additive)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, each with a residual: ``[B, H, W, C]`` -> same."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x)
        # pad BEFORE the shift (the reference's order): padded zeros take part in the roll
        pad_b, pad_r = (-h) % ws, (-w) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask if shift else None)
        y = window_reverse(y, ws, hp, wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        y = y[:, :h, :w]
        x = x + drop_path(y, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated and projected: ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), 2C]``.

    Odd sizes are zero-padded right/bottom. Concatenation order is the reference's:
    (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        # [B, h2, row parity, w2, col parity, C] -> [B, h2, w2, col parity, row parity, C]:
        # flattening the last three gives the order above (row parity varies fastest)
        x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain / shifted windows, then optional patch merging.

    ``x [B, H, W, C]`` -> ``(stage output [B, H, W, C], input of the next stage [B, H', W', C'])``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_paths: list[float],
        downsample: bool,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        # even blocks use plain windows, odd blocks windows shifted by half a window
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio, drop_paths[i]
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, h, w, _ = x.shape
        ws = self.window_size
        # one mask per stage, shared by its shifted blocks (depends only on the padded size)
        mask = shifted_window_mask(-(-h // ws) * ws, -(-w // ws) * ws, ws, self.shift_size, x.device, x.dtype)
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens: ``[B, 3, H, W]`` -> ``[B, ceil(H/p), ceil(W/p), C]``.

    The image is zero-padded right/bottom to a multiple of ``p`` first.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(nn.Module):
    """Detection Swin: ``images [B, 3, H, W]`` -> ``[C3, C4, C5]``, each ``[B, C_i, H_i, W_i]``.

    For the default ``out_indices (1, 2, 3)``: channels ``2C, 4C, 8C`` (C = ``embed_dim``) at strides
    8, 16, 32, i.e. ``H_i = ceil(H / stride)`` (each downsampling rounds up).
    """

    def __init__(self, cfg: SwinConfig, use_checkpoint: bool = False):
        super().__init__()
        n = len(cfg.depths)
        if len(cfg.num_heads) != n:
            raise ValueError(f"swin: depths {cfg.depths} and num_heads {cfg.num_heads} differ in length")
        if any(i < 0 or i >= n for i in cfg.out_indices):
            raise ValueError(f"swin: out_indices {cfg.out_indices} must lie in 0..{n - 1}")
        self.out_indices = tuple(cfg.out_indices)
        self.num_features = [cfg.embed_dim * 2**i for i in range(n)]
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, cfg.embed_dim)
        # stochastic depth grows linearly from 0 to drop_path_rate over all blocks
        # (on the CPU explicitly, so that building under a meta device context works)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(n):
            start = sum(cfg.depths[:i])
            self.layers.append(
                BasicLayer(
                    self.num_features[i],
                    cfg.depths[i],
                    cfg.num_heads[i],
                    cfg.window_size,
                    cfg.mlp_ratio,
                    dpr[start : start + cfg.depths[i]],
                    downsample=i < n - 1,
                    use_checkpoint=use_checkpoint,
                )
            )
        # output norms named after their stage; stage 0 would get none (Identity in the reference)
        for i in self.out_indices:
            if i > 0:
                self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The reference's training init (checkpoints overwrite it)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> list[int]:
        return [self.num_features[i] for i in self.out_indices]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass of a training forward instead of keeping its activations."""
        for layer in self.layers:
            layer.use_checkpoint = enable

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(images)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x = layer(x)
            if i in self.out_indices:
                if i > 0:
                    out = getattr(self, f"norm{i}")(out)
                outs.append(out.permute(0, 3, 1, 2).contiguous())
            if i >= max(self.out_indices):
                break  # later stages would be computed for nothing
        return outs


def build_swin(cfg: SwinConfig, use_checkpoint: bool = False) -> SwinTransformer:
    """The Swin body of the config; ``use_checkpoint`` trades compute for memory in training."""
    return SwinTransformer(cfg, use_checkpoint=use_checkpoint)
