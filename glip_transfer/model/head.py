"""The vision-language DyHead: a tower of (fusion -> BERT layer -> DyConv) layers over the FPN
levels, then box regression, centerness and the dot-product token logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import HeadConfig, LanguageConfig
from .autograd import grad_if_needed
from .deform import modulated_deform_conv3x3
from .fusion import CLAMP, HeadBertLayer, VLFuse
from .language import TextFeatures

PREDICTORS = ("bbox_pred", "centerness", "dot_product_projection_text", "log_scale", "bias_lang", "bias0")
"""The head's prediction layers (official ``linear_prob``: its name patterns ``bbox_pred``,
``cls_logits``, ``centerness``, ``cosine_scale``, ``dot_product_projection_text``,
``head.log_scale``, ``head.bias_lang``, ``head.bias0`` over the rpn's parameters, less
``cls_logits``, frozen by the dot-product token loss, and ``cosine_scale``, which GLIP lacks; the
per-level ``scales`` match none of them)."""


def h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3) / 6


class ModulatedDeformConv(nn.Module):
    """A 3x3 modulated deformable conv (DCNv2) with bias."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, Cin, H, W]``, ``offset [B, 18, Ho, Wo]`` ((dy, dx) per tap), ``mask [B, 9, Ho, Wo]``.
        On CPU a faster equal-in-function implementation (``deform.py``); elsewhere torchvision's."""
        return modulated_deform_conv3x3(x, offset, mask, self.weight, self.bias, self.stride)


class Conv3x3Norm(nn.Module):
    """Deformable 3x3 conv followed by GroupNorm (keys ``conv``, ``bn`` as in the reference)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, gn_groups: int):
        super().__init__()
        self.conv = ModulatedDeformConv(in_channels, out_channels, stride)
        self.bn = nn.GroupNorm(gn_groups, out_channels)

    def forward(self, x, offset, mask):
        return self.bn(self.conv(x, offset, mask))


class DyReLU(nn.Module):
    """Dynamic ReLU: ``max(x * a1 + b1, x * a2 + b2)`` with coefficients ``[B, C, 1, 1]`` from the
    globally pooled input."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels * 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = h_sigmoid(self.fc(x.mean(dim=(2, 3)))).view(b, 4 * c, 1, 1)
        a1, b1, a2, b2 = torch.split(y, c, dim=1)
        a1 = (a1 - 0.5) * 2 + 1.0
        a2 = (a2 - 0.5) * 2
        # max(x * a1 + b1 - 0.5, x * a2 + b2 - 0.5), the same operations, two full-size buffers
        return torch.maximum((x * a1).add_(b1).sub_(0.5), (x * a2).add_(b2).sub_(0.5))


def _offset_for_smaller_output(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The reference CUDA kernel reads a level-l offset/mask buffer ``[B, K, H, W]`` for an output
    of size ``(height, width) < (H, W)`` as if it had the output's size: the first ``K*height*width``
    values of each image's flat buffer. Reproduce that (the official weights were trained with it)."""
    b, k = t.shape[:2]
    return t.contiguous().view(b, -1)[:, : k * height * width].view(b, k, height, width)


class DyConv(nn.Module):
    """Scale-aware DyConv over the pyramid: for level l, average (weighted by a scale attention) of a
    stride-1 conv on level l, a stride-2 conv on level l-1 and an upsampled conv on level l+1, then
    DyReLU. Keys: ``DyConv.0`` (on l+1), ``DyConv.1`` (on l), ``DyConv.2`` (on l-1), ``AttnConv``,
    ``relu`` (DyReLU), ``offset`` (27 channels: 18 offsets + 9 mask logits)."""

    def __init__(self, channels: int, gn_groups: int, dyrelu_reduction: int = 4):
        super().__init__()
        self.DyConv = nn.ModuleList(
            [
                Conv3x3Norm(channels, channels, 1, gn_groups),
                Conv3x3Norm(channels, channels, 1, gn_groups),
                Conv3x3Norm(channels, channels, 2, gn_groups),
            ]
        )
        self.AttnConv = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, kernel_size=1), nn.ReLU(inplace=True)
        )
        self.relu = DyReLU(channels, dyrelu_reduction)
        self.offset = nn.Conv2d(channels, 27, kernel_size=3, stride=1, padding=1)
        for m in list(self.DyConv.modules()) + list(self.AttnConv.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, visual: list[torch.Tensor]) -> list[torch.Tensor]:
        # the CPU deformable kernel gathers rows of a channels-last copy of its input: make it once
        # per level for the three convolutions that read the level (same values, another layout)
        sampled = visual
        if visual[0].device.type == "cpu":
            sampled = [f.contiguous(memory_format=torch.channels_last) for f in visual]
        out = []
        for level, feature in enumerate(visual):
            offset_mask = self.offset(feature)
            offset = offset_mask[:, :18]
            mask = offset_mask[:, 18:].sigmoid()
            terms = [self.DyConv[1](sampled[level], offset, mask)]
            if level > 0:
                terms.append(self.DyConv[2](sampled[level - 1], offset, mask))
            if level < len(visual) - 1:
                h, w = visual[level + 1].shape[-2:]
                upper = self.DyConv[0](
                    sampled[level + 1], _offset_for_smaller_output(offset, h, w), _offset_for_smaller_output(mask, h, w)
                )
                terms.append(F.interpolate(upper, size=feature.shape[-2:], mode="bilinear", align_corners=True))
            # the scale-attention-weighted mean of the terms, (stack(terms) * attn).mean(0) term by
            # term: the same floats without the stacked copies
            fused = terms[0] * h_sigmoid(self.AttnConv(terms[0]))
            for term in terms[1:]:
                fused = fused.add_(term * h_sigmoid(self.AttnConv(term)))
            out.append(self.relu(fused.div_(len(terms))))
        return out


class Scale(nn.Module):
    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x):
        return x * self.scale


@dataclass
class HeadOutputs:
    """Per-level predictions (levels P3..P7).

    box_regression: ``[B, 4, H, W]`` per level (already multiplied by the level's scale)
    centerness:     ``[B, 1, H, W]`` per level, logits
    token_logits:   ``[B, H*W, T]`` per level, dot-product logits, location index ``y*W + x``
    """

    box_regression: list[torch.Tensor]
    centerness: list[torch.Tensor]
    token_logits: list[torch.Tensor]


class VLDyHead(nn.Module):
    """The vision-language DyHead.

    ``dyhead_tower`` holds, per layer, ``VLFuse`` -> ``HeadBertLayer`` -> ``DyConv`` (early fusion,
    GLIP-T/L) or ``DyConv`` alone (GLIP-T-A). Input: FPN levels ``[B, C, H_i, W_i]`` and
    :class:`TextFeatures`; output: :class:`HeadOutputs`.
    """

    def __init__(self, cfg: HeadConfig, lang: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = cfg.gradient_checkpointing
        c, t = cfg.channels, lang.hidden_size
        tower: list[nn.Module] = []
        for i in range(cfg.num_convs):
            if cfg.early_fusion:
                tower.append(VLFuse(c, t, cfg.fusion_embed_dim, cfg.fusion_num_heads, 1.0 / cfg.num_convs))
                if i < cfg.num_convs - 1 or cfg.fused_dot_product:
                    tower.append(HeadBertLayer(t, lang.num_heads, lang.intermediate_size, lang.layer_norm_eps))
                else:
                    tower.append(nn.Identity())  # the reference's DummyLayer: keeps the tower's numbering
            tower.append(DyConv(c, cfg.gn_groups, cfg.dyrelu_reduction))
        self.dyhead_tower = nn.ModuleList(tower)

        bias_value = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        # cls_logits is unused by grounding; kept because the checkpoints carry it
        self.cls_logits = nn.Conv2d(c, cfg.num_classes, kernel_size=1)
        self.bbox_pred = nn.Conv2d(c, 4, kernel_size=1)
        self.centerness = nn.Conv2d(c, 1, kernel_size=1)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, bias_value)
        self.dot_product_projection_text = nn.Linear(t, c)
        self.log_scale = nn.Parameter(torch.tensor([cfg.log_scale]))
        self.bias_lang = nn.Parameter(torch.zeros(t))
        self.bias0 = nn.Parameter(torch.tensor([bias_value]))
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(5)])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the tower's fusion and DyConv layers in the backward pass instead of keeping
        their activations (official ``MODEL.DYHEAD.USE_CHECKPOINT``): less memory, more compute."""
        self.grad_checkpointing = enable

    def predictor_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the prediction layers (:data:`PREDICTORS`), names relative to the head."""
        return [(n, p) for n, p in self.named_parameters() if n.split(".")[0] in PREDICTORS]

    def run_tower(self, visual: list[torch.Tensor], text: TextFeatures) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The tower alone: fused levels and final text features ``[B, T, Ct]``."""
        # checkpointing only pays when a backward will follow (also for a frozen head in eval mode)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        hidden = text.hidden
        for module in self.dyhead_tower:
            if isinstance(module, VLFuse):
                if recompute:
                    visual, hidden = checkpoint(module, visual, hidden, text.mask, use_reentrant=False)
                else:
                    visual, hidden = module(visual, hidden, text.mask)
            elif isinstance(module, HeadBertLayer):
                hidden = module(hidden, text.mask)
            elif isinstance(module, DyConv):
                visual = checkpoint(module, visual, use_reentrant=False) if recompute else module(visual)
        return visual, hidden

    def predict(self, visual: list[torch.Tensor], hidden: torch.Tensor, text: TextFeatures) -> HeadOutputs:
        """The predictions from the tower's outputs (fused levels, final text features ``hidden``)."""
        tokens = hidden if self.cfg.fused_dot_product else text.embedded
        tokens = F.normalize(tokens, p=2, dim=-1)
        proj_tokens = self.dot_product_projection_text(tokens / 2.0)  # [B, T, C]
        token_bias = tokens @ self.bias_lang + self.bias0  # [B, T]
        box_regression, centerness, token_logits = [], [], []
        for level, x in enumerate(visual):
            box_regression.append(self.scales[level](self.bbox_pred(x)))
            centerness.append(self.centerness(x))
            queries = x.flatten(2).transpose(1, 2)  # [B, HW, C], not normalised
            logits = (queries @ proj_tokens.transpose(-1, -2)) / self.log_scale.exp() + token_bias[:, None, :]
            token_logits.append(logits.clamp(-CLAMP, CLAMP))
        return HeadOutputs(box_regression, centerness, token_logits)

    def forward(self, features: list[torch.Tensor], text: TextFeatures) -> HeadOutputs:
        # a frozen tower fed by inputs that need no gradient (linear probing) runs without autograd
        with grad_if_needed(self.dyhead_tower, *features, text.hidden, text.embedded):
            visual, hidden = self.run_tower(features, text)
        return self.predict(visual, hidden, text)


def build_head(cfg: HeadConfig, lang: LanguageConfig) -> VLDyHead:
    return VLDyHead(cfg, lang)
