"""LoRA adapters (peft) on named modules of the model: the target presets, the peft config, and
injecting the adapter layers (used when training in ``lora`` mode and when applying a LoRA
artifact). peft is imported only here and only when used: it costs seconds to import."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import ConfigError
from .config import LoraSettings

if TYPE_CHECKING:
    from peft import LoraConfig

LORA_PRESETS = {
    "fusion": r"rpn\.head\.dyhead_tower\.\d+\.b_attn\.attn\."
    r"(v_proj|l_proj|values_v_proj|values_l_proj|out_v_proj|out_l_proj)",
    "head_bert": r"rpn\.head\.dyhead_tower\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
    "bert": r"language_backbone\.body\.model\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
    "swin": r"backbone\.body\.layers\.\d+\.blocks\.\d+\.attn\.(qkv|proj)",
    "predictors": r"rpn\.head\.dot_product_projection_text",
}
"""peft ``target_modules`` expressions (full module names) of the ``train.lora.targets`` presets."""

LORA_MARK = ".lora_"
"""What peft puts in the names of the adapter parameters (``...qkv.lora_A.default.weight``)."""


def lora_target_regex(targets) -> str:
    """The peft ``target_modules`` regular expression of presets / expressions."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise ConfigError(
            "train.lora.targets is empty: name presets (fusion, head_bert, bert, swin, predictors) or regular "
            "expressions"
        )
    parts = []
    for t in targets:
        expr = LORA_PRESETS.get(t, t)
        try:
            re.compile(expr)
        except re.error as e:
            raise ConfigError(
                f"train.lora.targets: {t!r} is neither a preset ({', '.join(LORA_PRESETS)}) nor a valid regular "
                f"expression ({e})"
            ) from None
        parts.append(f"(?:{expr})")
    return "|".join(parts)


def lora_config(settings: LoraSettings) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_regex(settings.targets),
        bias="none",
    )


def inject_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Add peft LoRA layers to ``model`` in place (names gain ``.lora_A.default.weight`` ...)."""
    from peft import inject_adapter_in_model

    hint = f"presets: {', '.join(LORA_PRESETS)}; or regular expressions over module names"
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:
        if "not found" in str(e):
            raise ConfigError(
                f"train.lora.targets matched no module of the model ({config.target_modules}); {hint}"
            ) from None
        raise ConfigError(f"train.lora.targets: {str(e).splitlines()[0]}") from None
    if not lora_parameters(model):
        raise ConfigError(f"train.lora.targets matched no module of the model ({config.target_modules}); {hint}")
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters peft added to ``model``."""
    return [p for n, p in model.named_parameters() if LORA_MARK in n]


def lora_config_json(config: dict) -> str:
    """``adapter_config.json`` of a peft ``LoraConfig`` given as a dict (``LoraConfig.to_dict()``)."""
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    kept = {k: v for k, v in config.items() if k in fields and k not in ("peft_type", "task_type")}
    return json.dumps(
        LoraConfig(**kept).to_dict(), indent=2, default=lambda v: sorted(v) if isinstance(v, set) else str(v)
    )


def load_lora_folder(model: nn.Module, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Inject the adapters of a peft folder (its ``adapter_config.json``; ``tensors`` from its
    safetensors file), load them, merge them into the base weights and freeze the model.
    ``ValueError`` (one line) when the folder does not fit the model."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import set_peft_model_state_dict

    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - peft raises several types for a bad file
        raise ValueError(f"unreadable adapter_config.json ({str(e).splitlines()[0][:120]})") from None
    inject_lora(model, config)
    result = set_peft_model_state_dict(model, tensors)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if LORA_MARK in k]
    if unexpected:
        raise ValueError(f"adapter tensors do not fit the model (first: {unexpected[0]})")
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    model.requires_grad_(False)
