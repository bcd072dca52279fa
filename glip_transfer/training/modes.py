"""Transfer modes: which parameters train, which parts of the model run in train mode, and which
parts can run without autograd (frozen and upstream of everything that trains).

Official counterparts (``tools/finetune.py`` ``tuning_highlevel_override`` and
``GeneralizedVLRCNN.train``):

* ``full`` — ``full``: everything trains but the Swin stages frozen by
  ``MODEL.BACKBONE.FREEZE_CONV_BODY_AT`` (2: ``patch_embed`` and ``layers.0``, kept in eval mode)
  and the unused ``rpn.head.cls_logits`` (frozen by the official model whenever the dot-product
  token loss is on); BERT at its own lr.
* ``prompt`` — ``language_prompt_v2``: a zero-initialised ``[max_query_len, C_text]`` offset added
  to BERT's output (the official ``rpn.tunable_linear.weight[:T]``, 1000 rows of which only the
  first ``max_query_len`` can be used); everything else frozen and in eval mode.
* ``linear`` — ``linear_prob``: the rpn parameters whose names contain ``bbox_pred``,
  ``cls_logits``, ``centerness``, ``cosine_scale``, ``dot_product_projection_text``,
  ``head.log_scale``, ``head.bias_lang`` or ``head.bias0``. ``cls_logits`` is then frozen again by
  the dot-product-loss rule and ``cosine_scale`` does not exist in GLIP, so what trains is
  ``bbox_pred``, ``centerness``, ``dot_product_projection_text``, ``log_scale``, ``bias_lang``,
  ``bias0`` (the per-level ``scales`` do not). Backbone, FPN and BERT are frozen in eval mode; the
  head stays in train mode (dropout in its frozen fusion layers is active, as in the official).
* ``text`` — ``language_prompt_v1``: BERT trains; backbone, FPN and head are frozen in eval mode.
* ``lora`` — no official counterpart: peft LoRA adapters on the chosen modules, the base frozen;
  parts holding adapters run in train mode, the rest in eval mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError
from .config import MODES, LoraSettings, TrainConfig

LINEAR_PROBE = ("bbox_pred", "cls_logits", "centerness", "cosine_scale", "dot_product_projection_text", "head.log_scale", "head.bias_lang", "head.bias0")
"""The official linear_prob name patterns (matched in ``model.rpn.named_parameters()`` names)."""

LORA_PRESETS = {
    "fusion": r"rpn\.head\.dyhead_tower\.\d+\.b_attn\.attn\.(v_proj|l_proj|values_v_proj|values_l_proj|out_v_proj|out_l_proj)",
    "head_bert": r"rpn\.head\.dyhead_tower\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
    "bert": r"language_backbone\.body\.model\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
    "swin": r"backbone\.body\.layers\.\d+\.blocks\.\d+\.attn\.(qkv|proj)",
    "predictors": r"rpn\.head\.dot_product_projection_text",
}

# the model's parts, in data-flow order
PARTS = ("backbone.body", "backbone.fpn", "language_backbone", "rpn.head")


@dataclass
class ModePlan:
    """What a mode trains and how the training forward runs."""

    mode: str
    trainable: list[str] = field(default_factory=list)  # model parameter names
    prompt_offset: bool = False  # the trainer owns an offset parameter
    frozen_backbone_stages: int = 0  # Swin modules kept in eval (patch_embed + layers[:k-1])
    lora: dict | None = None  # the peft LoraConfig as a dict (lora mode)

    @property
    def parts_training(self) -> dict[str, bool]:
        return {part: any(n.startswith(part + ".") for n in self.trainable) for part in PARTS}

    @property
    def backbone_frozen(self) -> bool:
        """Swin and FPN have nothing to train: run them under no_grad."""
        parts = self.parts_training
        return not (parts["backbone.body"] or parts["backbone.fpn"])

    @property
    def text_frozen(self) -> bool:
        """BERT has nothing to train (and runs in eval mode): encode each prompt once and reuse."""
        return not self.parts_training["language_backbone"]

    @property
    def tower_frozen(self) -> bool:
        """Nothing upstream of the head's predictors trains: the fused tower runs under no_grad."""
        if self.prompt_offset or not (self.backbone_frozen and self.text_frozen):
            return False
        return not any(n.startswith("rpn.head.dyhead_tower.") for n in self.trainable)


def lora_target_regex(targets) -> str:
    """The peft ``target_modules`` regular expression of presets / expressions."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise ConfigError("train.lora.targets is empty: name presets (fusion, head_bert, bert, swin, predictors) or regular expressions")
    parts = []
    for t in targets:
        expr = LORA_PRESETS.get(t, t)
        try:
            re.compile(expr)
        except re.error as e:
            raise ConfigError(f"train.lora.targets: {t!r} is neither a preset ({', '.join(LORA_PRESETS)}) nor a valid regular expression ({e})") from None
        parts.append(f"(?:{expr})")
    return "|".join(parts)


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=lora_target_regex(settings.targets), bias="none",
    )  # fmt: skip


def inject_lora(model: nn.Module, config) -> nn.Module:
    """Add peft LoRA layers to ``model`` in place (names gain ``.lora_A.default.weight`` ...)."""
    from peft import inject_adapter_in_model

    hint = f"presets: {', '.join(LORA_PRESETS)}; or regular expressions over module names"
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:
        if "not found" in str(e):
            raise ConfigError(f"train.lora.targets matched no module of the model ({config.target_modules}); {hint}") from None
        raise ConfigError(f"train.lora.targets: {str(e).splitlines()[0]}") from None
    if not any(".lora_A." in n for n, _ in model.named_parameters()):
        raise ConfigError(f"train.lora.targets matched no module of the model ({config.target_modules}); {hint}")
    return model


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of the model to ``p`` (``nn.Dropout`` modules: BERT; the
    fused head's functional dropouts). With ``p == 0`` Swin's stochastic depth is switched off too,
    so that a training forward is deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        value = getattr(module, "dropout", None)
        if isinstance(value, float):
            module.dropout = p
        if p == 0.0 and isinstance(getattr(module, "drop_path", None), float):
            module.drop_path = 0.0


def apply_mode(model: nn.Module, mode: str, cfg: TrainConfig) -> ModePlan:
    """Freeze / unfreeze ``model``'s parameters for ``mode`` (LoRA layers are injected) and
    return the plan. Call :func:`set_train_modes` after ``model.train()``."""
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    plan = ModePlan(mode)
    if mode == "lora":
        config = lora_config(cfg.lora)
        inject_lora(model, config)
        plan.lora = config.to_dict()
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    for p in model.parameters():
        p.requires_grad_(False)
    names = dict(model.named_parameters())
    if mode == "full":
        k = cfg.freeze_backbone_at
        frozen_prefixes = []
        if k >= 0:
            frozen_prefixes.append("backbone.body.patch_embed.")
        if k >= 2:
            frozen_prefixes += [f"backbone.body.layers.{i}." for i in range(k - 1)]
        plan.frozen_backbone_stages = k
        frozen_prefixes.append("rpn.head.cls_logits.")
        frozen_names = set()
        for given in cfg.frozen:  # a parameter's name or a module's (all its parameters)
            prefix = given.rstrip(".") + "."
            matched = {n for n in names if n == given or n.startswith(prefix)}
            if not matched:
                raise ConfigError(f"train.frozen: {given!r} names no parameter or module of the model (e.g. language_backbone, backbone.body)")
            frozen_names |= matched
        plan.trainable = [n for n in names if not n.startswith(tuple(frozen_prefixes)) and n not in frozen_names]
    elif mode == "prompt":
        plan.prompt_offset = True
    elif mode == "linear":
        plan.trainable = [n for n in names if n.startswith("rpn.") and any(p in n[len("rpn."):] for p in LINEAR_PROBE) and "cls_logits" not in n]
    elif mode == "text":
        plan.trainable = [n for n in names if n.startswith("language_backbone.")]
    elif mode == "lora":
        plan.trainable = [n for n in names if ".lora_" in n]
    for n in plan.trainable:
        names[n].requires_grad_(True)
    return plan


def set_train_modes(model: nn.Module, plan: ModePlan, training: bool = True) -> None:
    """``model.train(training)``, then eval mode for the parts that do not train (official:
    frozen backbone / FPN / rpn head / language backbone run in eval mode; frozen Swin stages too)."""
    model.train(training)
    if not training:
        return
    parts = plan.parts_training
    if plan.mode == "linear":
        parts["rpn.head"] = True  # official linear_prob keeps the head in train mode
    if not any(parts.values()):  # prompt tuning: the whole model is frozen
        model.eval()
        return
    for part, trains in parts.items():
        if not trains:
            model.get_submodule(part).eval()
    k = plan.frozen_backbone_stages
    if plan.mode == "full" and k >= 0:
        body = model.backbone.body
        body.patch_embed.eval()
        for i in range(max(k - 1, 0)):
            body.layers[i].eval()
    head = model.rpn.head
    head.cls_logits.eval()


def count_parameters(model: nn.Module, plan: ModePlan, extra: dict[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """(trainable, total) parameter counts; ``extra`` are trainer-owned parameters (the prompt offset)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for t in (extra or {}).values():
        trainable += t.numel()
        total += t.numel()
    return trainable, total


def trainable_breakdown(model: nn.Module, extra: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Trainable parameter counts per part of the model."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = next((x for x in PARTS if name.startswith(x + ".")), name.split(".")[0])
        out[part] = out.get(part, 0) + p.numel()
    for name, t in (extra or {}).items():
        out[name] = t.numel()
    return out
