"""GLIP: Swin + FPN image backbone, BERT language backbone, vision-language DyHead, ATSS decoding.

Attribute names follow the official model so that state-dict keys match the released checkpoints:
``backbone.body`` (Swin), ``backbone.fpn``, ``language_backbone.body.model`` (BERT),
``rpn.head`` (DyHead), ``rpn.anchor_generator``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import GLIPConfig
from .backbone import build_backbone
from .head import HeadOutputs, build_head
from .language import TextFeatures, build_language_backbone
from .postprocess import AnchorGenerator, Detections, postprocess


class RPN(nn.Module):
    """Holds the head and the anchor generator under the reference's ``rpn.`` prefix."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.head = build_head(cfg.head, cfg.language)
        self.anchor_generator = AnchorGenerator(cfg.anchors)


class GLIP(nn.Module):
    """Grounded detector. ``images [B, 3, H, W]`` (normalised, padded) and the features of a prompt
    (:class:`TextFeatures`, batch 1 or B) -> per-level head outputs and anchors."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.swin, cfg.fpn)
        self.language_backbone = build_language_backbone(cfg.language)
        self.rpn = RPN(cfg)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """BERT over padded prompts ``[B, T]``; compute once per prompt and reuse for every image."""
        return self.language_backbone(input_ids, attention_mask)

    def forward(
        self,
        images: torch.Tensor,
        text: TextFeatures,
        prompt_offset: torch.Tensor | None = None,
        features: list[torch.Tensor] | None = None,
    ) -> tuple[HeadOutputs, list[torch.Tensor]]:
        """``features``: ``self.backbone(images)`` when already computed (prompt chunks share it)."""
        features = self.backbone(images) if features is None else features
        text = text.expand(images.shape[0])
        if prompt_offset is not None:
            text = text.with_offset(prompt_offset)
        outputs = self.rpn.head(features, text)
        anchors = self.rpn.anchor_generator([tuple(f.shape[-2:]) for f in features])
        return outputs, anchors

    @torch.no_grad()
    def detect(
        self,
        images: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        text: TextFeatures,
        positive_map: torch.Tensor,
        prompt_offset: torch.Tensor | None = None,
        features: list[torch.Tensor] | None = None,
    ) -> list[Detections]:
        """Detections per image in resized-image coordinates; labels index the rows of
        ``positive_map [L, T]`` (1-based). Under autocast the network runs in reduced precision;
        the decoding always runs in float32. ``features``: the backbone's output for ``images``
        when already computed (the chunks of a long prompt share it; only the head runs per chunk).

        Padding positions after the last real token are dropped first: they cannot change the
        visual features (the image-to-text softmax gives them zero weight) nor any real token's
        features (BERT's and the fusion's masks), and no phrase maps to them, so the detections
        are the same while the fused head's text-side work shrinks from 256 positions to the
        caption's length."""
        mapped = positive_map.nonzero()
        length = max(text.used_length(), int(mapped[:, 1].max()) + 1 if len(mapped) else 0)
        text, positive_map = text.truncate(length), positive_map[:, :length]
        outputs, anchors = self(images, text, prompt_offset, features)
        outputs = HeadOutputs(*([t.float() for t in field] for field in (outputs.box_regression, outputs.centerness, outputs.token_logits)))
        return postprocess(outputs, anchors, positive_map.float(), image_sizes, self.cfg.postprocess)


def build_glip(cfg: GLIPConfig) -> GLIP:
    return GLIP(cfg)
