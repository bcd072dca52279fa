"""The language backbone: a BERT encoder whose last layer gives the token features.

The architecture is built from :class:`~glip_transfer.config.LanguageConfig` (no hub download);
its weights come from the GLIP checkpoint (``language_backbone.body.model.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import LanguageConfig


def used_length(attention_mask: torch.Tensor) -> int:
    """Positions ``[..., T]`` up to the last real token of any prompt (at least 1): what is left
    when the padding after every caption is cut."""
    real = attention_mask.reshape(-1, attention_mask.shape[-1]).any(dim=0).nonzero()
    return int(real.max()) + 1 if len(real) else 1


@dataclass
class TextFeatures:
    """Token features of a batch of prompts.

    hidden:   ``[B, T, C]`` last-layer BERT features at every position (padding included); the
              fusion layers update this.
    embedded: ``[B, T, C]`` the same with padding positions zeroed; GLIP-T-A's dot product uses it.
    mask:     ``[B, T]`` 1 for real tokens, 0 for padding.
    """

    hidden: torch.Tensor
    embedded: torch.Tensor
    mask: torch.Tensor

    def expand(self, batch_size: int) -> "TextFeatures":
        """The features of one prompt repeated for ``batch_size`` images (a view, no copy)."""
        if self.hidden.shape[0] == batch_size:
            return self
        if self.hidden.shape[0] != 1:
            raise ValueError(f"cannot expand text features of batch {self.hidden.shape[0]} to {batch_size}")
        return TextFeatures(
            self.hidden.expand(batch_size, -1, -1),
            self.embedded.expand(batch_size, -1, -1),
            self.mask.expand(batch_size, -1),
        )

    def truncate(self, length: int) -> "TextFeatures":
        """The first ``length`` positions (a view)."""
        return TextFeatures(self.hidden[:, :length], self.embedded[:, :length], self.mask[:, :length])

    def used_length(self) -> int:
        """Positions up to the last real token of any prompt in the batch (at least 1)."""
        return used_length(self.mask)

    def with_offset(self, offset: torch.Tensor) -> "TextFeatures":
        """Add a learned ``[T, C]`` prompt offset to the features (prompt tuning), as the
        official ``language_prompt_v2`` does: to both ``hidden`` and ``embedded``."""
        offset = offset[: self.hidden.shape[1]].unsqueeze(0).to(self.hidden.dtype)
        return TextFeatures(self.hidden + offset, self.embedded + offset, self.mask)


def bert_config(cfg: LanguageConfig):
    """A ``transformers.BertConfig`` for ``cfg`` (bert-base-uncased's values for GLIP)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )


class _BertBody(nn.Module):
    """Holds the ``BertModel`` as ``model`` so that keys read ``language_backbone.body.model.*``."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        from transformers import BertModel

        self.model = BertModel(bert_config(cfg), add_pooling_layer=False)


class LanguageBackbone(nn.Module):
    """BERT over padded prompts: ``input_ids [B, T]``, ``attention_mask [B, T]`` -> :class:`TextFeatures`."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.body = _BertBody(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        # token_type_ids are not passed (all zero), as in the reference
        out = self.body.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        embedded = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return TextFeatures(hidden=hidden, embedded=embedded, mask=attention_mask)


def build_language_backbone(cfg: LanguageConfig) -> LanguageBackbone:
    return LanguageBackbone(cfg)
