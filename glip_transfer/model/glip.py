"""GLIP: Swin + FPN image backbone, BERT language backbone, vision-language DyHead, ATSS decoding.

Attribute names follow the official model so that state-dict keys match the released checkpoints:
``backbone.body`` (Swin), ``backbone.fpn``, ``language_backbone.body.model`` (BERT),
``rpn.head`` (DyHead), ``rpn.anchor_generator``, and ``rpn.tunable_linear`` (prompt tuning's
offset, present only once prompt tuning or a prompt adapter adds it).

The forward is split as in timm: :meth:`GLIP.forward_features` (images -> FPN levels) and
:meth:`GLIP.forward_head` (levels + text features -> head outputs and anchors). Training,
evaluation, ``--adapter`` and the Python API all run this one forward; a frozen part fed by
inputs that need no gradient runs without autograd (:mod:`glip_transfer.model.autograd`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import GLIPConfig
from .autograd import grad_if_needed
from .backbone import build_backbone
from .head import HeadOutputs, build_head
from .language import TextFeatures, build_language_backbone
from .postprocess import AnchorGenerator, Detections, postprocess

BIAS_NAMED = frozenset({"relative_position_bias_table", "bias_lang", "bias0"})
"""Parameters that the official solver treats as biases although they are no module's ``bias``:
its rule is the substring "bias" in the name (Swin's relative position tables, the head's token
bias terms)."""


@dataclass(frozen=True)
class ParamRole:
    """How the official solver (``maskrcnn_benchmark/solver/build.py: make_optimizer``) sets one
    parameter's learning rate and weight decay.

    part: ``swin`` (``SOLVER.BACKBONE_BODY_LR_FACTOR``), ``language`` (``SOLVER.LANG_LR``) or
          ``other`` (``SOLVER.BASE_LR``)
    bias: ``SOLVER.BIAS_LR_FACTOR`` and ``SOLVER.WEIGHT_DECAY_BIAS`` apply (every module's
          ``bias`` and :data:`BIAS_NAMED`)
    norm: ``SOLVER.WEIGHT_DECAY_NORM_FACTOR`` applies (LayerNorm parameters; the DyHead's
          GroupNorms are named ``bn`` in the official model, so its name rule skips them)
    """

    part: Literal["swin", "language", "other"]
    bias: bool
    norm: bool


class PromptOffset(nn.Module):
    """Prompt tuning's learned offset on the text features (official ``language_prompt_v2``:
    ``rpn.tunable_linear``, a bias-free ``Linear`` of 1000 rows whose weight is added to the BERT
    features position by position; only the first ``max_query_len`` rows can ever be used, so
    that many are kept here).

    ``weight [rows, C_text]``, zero when created for training; a prompt of ``T <= rows`` tokens
    gets rows ``0..T-1`` added to both ``hidden`` and ``embedded``.
    """

    def __init__(self, rows: int, text_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, text_dim))

    def forward(self, text: TextFeatures) -> TextFeatures:
        return text.with_offset(self.weight)


class RPN(nn.Module):
    """Holds the head and the anchor generator under the reference's ``rpn.`` prefix, and the
    prompt offset when one is added (applied to the text features before the head, where the
    official ``VLDyHeadModule.forward`` applies it)."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.head = build_head(cfg.head, cfg.language)
        self.anchor_generator = AnchorGenerator(cfg.anchors)
        # absent unless added: the released checkpoints' keys load strictly
        self.register_module("tunable_linear", None)

    def forward(self, features: list[torch.Tensor], text: TextFeatures) -> tuple[HeadOutputs, list[torch.Tensor]]:
        if self.tunable_linear is not None:
            text = self.tunable_linear(text)
        outputs = self.head(features, text)
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in features])
        return outputs, anchors


class GLIP(nn.Module):
    """Grounded detector. ``images [B, 3, H, W]`` (normalised, padded) and the features of a prompt
    (:class:`TextFeatures`, batch 1 or B) -> per-level head outputs and anchors."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.swin, cfg.fpn)
        self.language_backbone = build_language_backbone(cfg.language)
        self.rpn = RPN(cfg)
        self.set_grad_checkpointing(cfg.head.gradient_checkpointing)

    # ------------------------------------------------------------------ the forward

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """BERT over padded prompts ``[B, T]``; compute once per prompt and reuse for every image."""
        return self.language_backbone(input_ids, attention_mask)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Swin + FPN: ``images [B, 3, H, W]`` -> ``[P3, ..., P7]``, each ``[B, C, H_i, W_i]``;
        without autograd when nothing in the backbone trains."""
        with grad_if_needed(self.backbone, images):
            return self.backbone(images)

    def forward_head(self, features: list[torch.Tensor], text: TextFeatures) -> tuple[HeadOutputs, list[torch.Tensor]]:
        """The prompt offset (if any), the fused head and the anchors, for FPN levels of batch B and
        text features of batch 1 or B."""
        return self.rpn(features, text.expand(features[0].shape[0]))

    def forward(
        self, images: torch.Tensor, text: TextFeatures, features: list[torch.Tensor] | None = None
    ) -> tuple[HeadOutputs, list[torch.Tensor]]:
        """``features``: ``forward_features(images)`` when already computed (prompt chunks share it)."""
        return self.forward_head(self.forward_features(images) if features is None else features, text)

    @torch.no_grad()
    def detect(
        self,
        images: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        text: TextFeatures,
        positive_map: torch.Tensor,
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
        outputs, anchors = self(images, text, features)
        outputs = HeadOutputs(
            *(
                [t.float() for t in field]
                for field in (outputs.box_regression, outputs.centerness, outputs.token_logits)
            )
        )
        return postprocess(outputs, anchors, positive_map.float(), image_sizes, self.cfg.postprocess)

    # ------------------------------------------------------------------ parts and declarations

    @property
    def prompt_offset(self) -> PromptOffset | None:
        """Prompt tuning's offset (``rpn.tunable_linear``), or None."""
        return self.rpn.tunable_linear

    def set_prompt_offset(self, weight: torch.Tensor | None = None) -> PromptOffset:
        """Add (or replace) the prompt offset: a zero ``[max_query_len, C_text]`` one to train, or
        ``weight [rows, C_text]`` (a trained offset), on the model's device, float32."""
        lang = self.cfg.language
        rows = lang.max_query_len if weight is None else weight.shape[0]
        device = next(self.parameters()).device
        offset = PromptOffset(rows, lang.hidden_size).to(device)
        if weight is not None:
            with torch.no_grad():
                offset.weight.copy_(weight)
        self.rpn.tunable_linear = offset
        return offset

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the fused head's tower and Swin's blocks: recompute them in
        the backward pass instead of keeping their activations (``model.head.gradient_checkpointing``
        sets it at build time)."""
        self.backbone.set_grad_checkpointing(enable)
        self.rpn.head.set_grad_checkpointing(enable)

    def param_roles(self) -> dict[str, ParamRole]:
        """Every parameter's :class:`ParamRole` (what the optimiser's groups follow), by name."""
        parts = {id(p): "swin" for p in self.backbone.body.parameters()}
        parts.update({id(p): "language" for p in self.language_backbone.parameters()})
        roles = {}
        for module_name, module in self.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                name = f"{module_name}.{attr}" if module_name else attr
                bias = attr == "bias" or attr in BIAS_NAMED
                roles[name] = ParamRole(parts.get(id(p), "other"), bias, isinstance(module, nn.LayerNorm))
        return roles


def build_glip(cfg: GLIPConfig) -> GLIP:
    return GLIP(cfg)
