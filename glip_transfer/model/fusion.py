"""Early vision-language fusion inside the DyHead: bi-directional cross-attention, and the BERT
layers that follow each fusion block on the text side.

The clamps to +-50000 are the reference's guards against fp16 overflow; they are kept because they
are part of the function the official weights were trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLAMP = 50000.0


def _linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(weight, bias)`` such that ``module(x) == x @ weight.T + bias``: a plain ``nn.Linear``, or a
    peft LoRA ``Linear`` with its active adapters folded in (``W + scaling * B @ A``, differentiable
    in A and B). None when the module is not such an affine map (adapter dropout while training,
    DoRA and other variants, an adapter bias): the caller then calls the module itself."""
    if type(module) is nn.Linear:
        return (module.weight, module.bias) if module.bias is not None else None
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear or base.bias is None or not hasattr(module, "get_delta_weight"):
        return None
    if module.disable_adapters or module.merged:
        return None if module.disable_adapters and module.merged else (base.weight, base.bias)
    weight = base.weight
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name, False):
            return None
        dropout = module.lora_dropout[name]
        if dropout.training and getattr(dropout, "p", 0.0) > 0:
            return None
        weight = weight + module.get_delta_weight(name)
    return weight, base.bias


class BiMultiHeadAttention(nn.Module):
    """Cross-attention in both directions between visual tokens ``v [B, N, Cv]`` and text tokens
    ``l [B, T, Cl]`` sharing one score matrix; returns ``(delta_v [B, N, Cv], delta_l [B, T, Cl])``."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for layer in (
            self.v_proj,
            self.l_proj,
            self.values_v_proj,
            self.values_l_proj,
            self.out_v_proj,
            self.out_l_proj,
        ):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, E]`` -> ``[B, heads, S, head_dim]``."""
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, d = x.shape
        return x.transpose(1, 2).reshape(b, s, h * d)

    def forward(self, v: torch.Tensor, l: torch.Tensor, mask_l: torch.Tensor | None = None):
        visual_side = [_linear_parts(m) for m in (self.v_proj, self.values_v_proj, self.out_v_proj)]
        if all(parts is not None for parts in visual_side):
            return self._forward_text_side(v, l, mask_l, *visual_side)
        return self._forward_projected(v, l, mask_l)

    def _scores_to_probs(self, scores: torch.Tensor, mask_l: torch.Tensor | None, visual_dim: int, text_dim: int):
        """Both softmaxes of the shared scores (visual positions along ``visual_dim``, text tokens
        along ``text_dim``): ``(probs_v, probs_l)``, dropout applied."""
        scores = scores.clamp(-CLAMP, CLAMP)
        # text -> image: softmax over ALL visual positions (image padding is not masked). The
        # reference subtracts the max over that axis and clamps at -CLAMP first; softmax makes the
        # same subtraction itself (the max of the shifted scores is exactly 0, so exp() gets the
        # same arguments) and whatever the clamp changes has exp() == 0 either way: the same
        # probabilities, bit for bit, without two passes over [B, N, heads, T]
        probs_l = scores.softmax(dim=visual_dim)
        # image -> text: softmax over the real tokens only (nothing to mask when all are real, as
        # for a caption cut to its own length)
        if mask_l is not None and not bool(mask_l.all()):
            # the reference adds -9e15; the most negative value of the dtype gives the same zeros and
            # does not overflow float16
            shape = [mask_l.shape[0], 1, 1, 1]
            shape[text_dim] = mask_l.shape[1]
            scores = scores.masked_fill(mask_l.view(shape) == 0, torch.finfo(scores.dtype).min)
        probs_v = scores.softmax(dim=text_dim)
        probs_v = F.dropout(probs_v, p=self.dropout, training=self.training)
        probs_l = F.dropout(probs_l, p=self.dropout, training=self.training)
        return probs_v, probs_l

    def _forward_projected(self, v, l, mask_l):
        """The textbook order: project both sides to ``embed_dim``, attend, project back."""
        query = self._heads(self.v_proj(v) * self.scale)  # [B, h, N, d]
        key = self._heads(self.l_proj(l))  # [B, h, T, d]
        value_v = self._heads(self.values_v_proj(v))
        value_l = self._heads(self.values_l_proj(l))
        scores = query @ key.transpose(-1, -2)  # [B, h, N, T]
        probs_v, probs_l = self._scores_to_probs(scores, mask_l, visual_dim=2, text_dim=3)
        delta_v = self.out_v_proj(self._merge(probs_v @ value_l))
        delta_l = self.out_l_proj(self._merge(probs_l.transpose(-1, -2) @ value_v))
        return delta_v, delta_l

    def _forward_text_side(self, v, l, mask_l, q_parts, value_parts, out_parts):
        """The same function with the visual projections folded into the text side.

        Every visual-side product is linear in ``v``, so the weights can meet the text first:
        ``scores[n, h, t] = v[n] . (s W_q,h^T k[h, t]) + s b_q,h . k[h, t]`` and
        ``delta_v[n] = sum_{h,t} p_v[n, h, t] (value_l[h, t] W_out,h^T) + b_out``, and
        ``sum_n p_l[h, t, n] value_v[h, n] = (sum_n p_l[h, t, n] v[n]) W_v,h^T + b_v,h sum_n p_l``.
        The products over the N visual positions then have width ``heads * T`` (160 for a
        20-token caption) instead of ``embed_dim`` (2048): ~10x fewer FLOPs and no ``[B, N, 2048]``
        activations, for any caption up to ``embed_dim / heads`` = 256 tokens.
        """
        b, n, cv = v.shape
        t = l.shape[1]
        h, d = self.num_heads, self.head_dim
        key = self.l_proj(l).view(b, t, h, d) * self.scale
        value_l = self.values_l_proj(l).view(b, t, h, d)
        (w_q, b_q), (w_v, b_v), (w_out, b_out) = q_parts, value_parts, out_parts
        fold_q = torch.einsum("bthd,hdc->bcht", key, w_q.view(h, d, cv)).reshape(b, cv, h * t)  # [B, Cv, h*T]
        bias_q = torch.einsum("bthd,hd->bht", key, b_q.view(h, d)).reshape(b, 1, h * t)
        scores = torch.baddbmm(bias_q, v, fold_q).view(b, n, h, t)  # [B, N, h, T]
        probs_v, probs_l = self._scores_to_probs(scores, mask_l, visual_dim=1, text_dim=3)

        fold_out = torch.einsum("bthd,chd->bhtc", value_l, w_out.view(cv, h, d)).reshape(b, h * t, cv)  # [B, h*T, Cv]
        delta_v = torch.baddbmm(b_out, probs_v.reshape(b, n, h * t), fold_out)  # [B, N, Cv]

        pooled = (probs_l.reshape(b, n, h * t).transpose(1, 2) @ v).view(b, h, t, cv)  # [B, h, T, Cv]
        context = torch.einsum("bhtc,hdc->bthd", pooled, w_v.view(h, d, cv))
        # the value bias, weighted by each row's probability mass (exactly 1 without dropout)
        context = context + probs_l.sum(dim=1).transpose(1, 2)[..., None] * b_v.view(h, d)
        delta_l = self.out_l_proj(context.reshape(b, t, h * d))
        return delta_v, delta_l


class BiAttentionBlock(nn.Module):
    """LayerNorm both sides, cross-attend, add the layer-scaled update: ``out = LN(x) + gamma * delta``."""

    def __init__(
        self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, init_values: float, dropout: float = 0.1
    ):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), init_values))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), init_values))

    def forward(self, v: torch.Tensor, l: torch.Tensor, mask_l: torch.Tensor | None = None):
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l, mask_l)
        return v + self.gamma_v * delta_v, l + self.gamma_l * delta_l


class VLFuse(nn.Module):
    """One early-fusion block over all pyramid levels at once.

    The 5 levels ``[B, C, H_i, W_i]`` are flattened (row-major) and concatenated into one visual
    sequence ``[B, sum H_i W_i, C]`` (no positional or level embedding) and cross-attended with the
    text features ``[B, T, Ct]``. Returns the updated levels and text features.
    """

    def __init__(self, channels: int, text_dim: int, embed_dim: int, num_heads: int, init_values: float):
        super().__init__()
        self.b_attn = BiAttentionBlock(channels, text_dim, embed_dim, num_heads, init_values)

    def forward(self, visual: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor):
        sizes = [f.shape[-2:] for f in visual]
        flat = torch.cat([f.flatten(2).transpose(1, 2) for f in visual], dim=1)  # [B, N, C]
        new_v, new_l = self.b_attn(flat, text, text_mask)
        new_v = new_v.transpose(1, 2)  # [B, C, N]
        out, start = [], 0
        for h, w in sizes:
            out.append(new_v[:, :, start : start + h * w].reshape(new_v.shape[0], -1, h, w))
            start += h * w
        return out, new_l


class HeadBertLayer(nn.Module):
    """A standard post-LayerNorm BERT encoder layer over ``[B, T, C]`` with the reference's clamps;
    key names follow transformers' ``BertLayer`` (``attention.self.query``, ``intermediate.dense``...)."""

    def __init__(self, hidden: int, num_heads: int, intermediate: int, eps: float = 1e-12, dropout: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.dropout = dropout
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(hidden, hidden)
        self.attention.self.key = nn.Linear(hidden, hidden)
        self.attention.self.value = nn.Linear(hidden, hidden)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sa = self.attention.self
        q, k, v = self._heads(sa.query(x)), self._heads(sa.key(x)), self._heads(sa.value(x))
        scores = (q @ k.transpose(-1, -2)) / self.head_dim**0.5
        scores = scores.clamp(-CLAMP, CLAMP)
        # the extended mask of transformers: (1 - mask) * most negative float
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        probs = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
        context = (probs @ v).transpose(1, 2).reshape(x.shape)
        attn = self.attention.output
        x = attn.LayerNorm(F.dropout(attn.dense(context), p=self.dropout, training=self.training) + x)

        h = self.intermediate.dense(x).clamp(-CLAMP, CLAMP)
        h = F.gelu(h).clamp(-CLAMP, CLAMP)
        out = self.output
        h = F.dropout(out.dense(h), p=self.dropout, training=self.training).clamp(-CLAMP, CLAMP)
        return out.LayerNorm(h + x).clamp(-CLAMP, CLAMP)
