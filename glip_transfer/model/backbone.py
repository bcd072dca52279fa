"""The image backbone: Swin body + FPN, under the reference's names ``backbone.body`` / ``backbone.fpn``."""

from __future__ import annotations

import torch
from torch import nn

from ..config import FPNConfig, SwinConfig
from .fpn import FPN, build_fpn
from .swin import SwinTransformer, build_swin


class Backbone(nn.Module):
    """``images [B, 3, H, W]`` (normalised, padded to a multiple of 32) -> ``[P3, P4, P5, P6, P7]``,
    each ``[B, fpn.out_channels, ceil(H / s), ceil(W / s)]`` for strides s = 8, 16, 32, 64, 128."""

    def __init__(self, body: SwinTransformer, fpn: FPN):
        super().__init__()
        self.body = body
        self.fpn = fpn

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(self.body(images))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute Swin's blocks in the backward pass of a training forward (official
        ``MODEL.BACKBONE.USE_CHECKPOINT``)."""
        self.body.set_grad_checkpointing(enable)

    def frozen_stages(self, freeze_at: int) -> list[nn.Module]:
        """The Swin modules that official fine-tuning freezes (``MODEL.BACKBONE.FREEZE_CONV_BODY_AT``,
        Swin's ``frozen_stages``): the patch embedding for ``freeze_at >= 0``, and stages
        ``1 .. freeze_at - 1`` for ``freeze_at >= 2`` (-1: nothing)."""
        if freeze_at < 0:
            return []
        return [self.body.patch_embed, *self.body.layers[: max(freeze_at - 1, 0)]]


def build_backbone(swin: SwinConfig, fpn: FPNConfig, use_checkpoint: bool = False) -> Backbone:
    """Swin + FPN from their configs; ``use_checkpoint`` enables gradient checkpointing in Swin."""
    body = build_swin(swin, use_checkpoint=use_checkpoint)
    return Backbone(body, build_fpn(body.out_channels, fpn))
