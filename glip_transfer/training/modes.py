"""Transfer modes, each defined in one place: the table :data:`MODES`.

For every mode a :class:`TransferMode` says what trains, which parts run in eval mode while it
trains, where its official settings come from, its learning-rate rule and the artifact its run
leaves (what that holds and how it is applied: :mod:`glip_transfer.training.artifacts`).

Official counterparts: ``tools/finetune.py`` (``tuning_highlevel_override``) and
``GeneralizedVLRCNN.train``. Two rules hold for every mode:

* what runs without autograd: a part whose parameters are all frozen and whose inputs need no
  gradient runs under ``torch.no_grad`` (the model applies this rule in its one forward, see
  :mod:`glip_transfer.model.autograd`): Swin + FPN whenever nothing in the backbone trains, the
  fused tower in linear probing; a frozen language backbone in eval mode encodes the run's caption
  once (:class:`glip_transfer.training.engine.TrainModule`);
* the head's ``cls_logits`` never trains and runs in eval mode (unused by grounding; the official
  freezes it whenever the dot-product token loss is on).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal

from torch import nn

from ..config import ConfigError
from ..model.glip import GLIP
from ..recipes import Recipe, Tuning
from .artifacts import ArtifactKind
from .config import TrainConfig
from .lora import inject_lora, lora_config, lora_parameters


def _parts(model: GLIP) -> list[nn.Module]:
    """The model's parts, in data-flow order (what runs in eval mode is decided per part)."""
    return [model.backbone.body, model.backbone.fpn, model.language_backbone, model.rpn.head]


def _holds_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


# --------------------------------------------------------------------------- what each mode adds and trains


def _full_trains(model: GLIP, cfg: TrainConfig) -> list[nn.Parameter]:
    frozen = {
        id(p)
        for m in (*model.backbone.frozen_stages(cfg.freeze_backbone_at), model.rpn.head.cls_logits)
        for p in m.parameters()
    }
    frozen |= {id(p) for p in _named_frozen(model, cfg.frozen)}
    return [p for p in model.parameters() if id(p) not in frozen]


def _named_frozen(model: GLIP, names: Iterable[str]) -> list[nn.Parameter]:
    """The parameters ``train.frozen`` names: a parameter's name or a module's (all its parameters)."""
    params = dict(model.named_parameters())
    found: list[nn.Parameter] = []
    for given in names:
        prefix = given.rstrip(".") + "."
        matched = [p for n, p in params.items() if n == given or n.startswith(prefix)]
        if not matched:
            raise ConfigError(
                f"train.frozen: {given!r} names no parameter or module of the model "
                "(e.g. language_backbone, backbone.body)"
            )
        found += matched
    return found


def _full_eval(model: GLIP, cfg: TrainConfig) -> list[nn.Module]:
    # a part that train.frozen freezes whole (glip-nano's language backbone) runs in eval mode too
    frozen_parts = [part for part in _parts(model) if not _holds_trainable(part)] if cfg.frozen else []
    return [*model.backbone.frozen_stages(cfg.freeze_backbone_at), *frozen_parts, model.rpn.head.cls_logits]


def _add_prompt_offset(model: GLIP, cfg: TrainConfig) -> dict | None:
    model.set_prompt_offset()  # zero: training starts from the base model's function
    return None


def _add_lora(model: GLIP, cfg: TrainConfig) -> dict | None:
    config = lora_config(cfg.lora)
    inject_lora(model, config)
    return config.to_dict()


def _lora_eval(model: GLIP, cfg: TrainConfig) -> list[nn.Module]:
    return [part for part in _parts(model) if not _holds_trainable(part)] + [model.rpn.head.cls_logits]


@dataclass(frozen=True)
class TransferMode:
    """One transfer mode, complete.

    name:           ``--mode``
    official:       the official counterpart (``SOLVER.TUNING_HIGHLEVEL_OVERRIDE``), if any
    trains:         what trains, in words
    no_autograd:    the parts a training step runs without autograd (``backbone``: Swin + FPN;
                    ``language_backbone``: BERT, its features computed once; ``tower``: the fused
                    head's tower), as the one rule of the module docstring gives them
    add:            adds the mode's own parameters to the model before training (prompt
                    offset, LoRA layers); returns the peft config for the artifact (LoRA)
    trainable:      the parameters that train (all others are frozen)
    eval_parts:     the modules that run in eval mode while training (everything else in train mode)
    recipe_entry:   the recipe's ``tuning.modes`` entry with the official lr, weight decay,
                    BERT lr and frozen Swin stages (None: ``defaults``)
    defaults:       :class:`TrainConfig` values of a mode no recipe entry covers (ours)
    per_part_lr:    the official per-part learning rates (``SOLVER.LANG_LR`` for BERT,
                    ``BACKBONE_BODY_LR_FACTOR`` for Swin); else one lr for every parameter.
                    The bias and norm rules (:mod:`glip_transfer.training.optim`) always apply
    artifact:       what the run leaves and how it is applied
    """

    name: str
    official: str | None
    trains: str
    no_autograd: tuple[Literal["backbone", "language_backbone", "tower"], ...]
    trainable: Callable[[GLIP, TrainConfig], Iterable[nn.Parameter]]
    eval_parts: Callable[[GLIP, TrainConfig], Iterable[nn.Module]]
    artifact: ArtifactKind
    per_part_lr: bool = True
    recipe_entry: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    add: Callable[[GLIP, TrainConfig], dict | None] | None = None


MODES: dict[str, TransferMode] = {
    m.name: m
    for m in (
        TransferMode(
            name="full",
            official="full",
            trains=(
                "every parameter but the Swin stages frozen by train.freeze_backbone_at (official "
                "MODEL.BACKBONE.FREEZE_CONV_BODY_AT; 2: the patch embedding and stage 1, kept in eval mode) "
                "and those train.frozen names (a part frozen whole runs in eval mode)"
            ),
            no_autograd=(),
            trainable=_full_trains,
            eval_parts=_full_eval,
            artifact=ArtifactKind.WEIGHTS,
            recipe_entry="full",
        ),
        TransferMode(
            name="prompt",
            official="language_prompt_v2",
            trains=(
                "a zero-initialised [max_query_len, C_text] offset added to BERT's output (the "
                "official rpn.tunable_linear); everything else frozen and in eval mode"
            ),
            no_autograd=("backbone", "language_backbone"),
            add=_add_prompt_offset,
            trainable=lambda model, cfg: model.prompt_offset.parameters(),
            eval_parts=lambda model, cfg: [model],
            artifact=ArtifactKind.PROMPT,
            recipe_entry="prompt",
        ),
        TransferMode(
            name="linear",
            official="linear_prob",
            trains=(
                "the head's prediction layers (bbox_pred, centerness, dot_product_projection_text, "
                "log_scale, bias_lang, bias0); backbone, FPN and BERT frozen in eval mode, the head in train "
                "mode (dropout in its frozen fusion layers is active, as in the official)"
            ),
            no_autograd=("backbone", "language_backbone", "tower"),
            trainable=lambda model, cfg: [p for _, p in model.rpn.head.predictor_parameters()],
            eval_parts=lambda model, cfg: [model.backbone, model.language_backbone, model.rpn.head.cls_logits],
            artifact=ArtifactKind.WEIGHTS,
            recipe_entry="linear_probe",
        ),
        TransferMode(
            name="lora",
            official=None,
            trains=(
                "peft LoRA adapters on the train.lora.targets modules, the base frozen; parts holding "
                "adapters run in train mode, the rest in eval mode"
            ),
            # with the default targets (fusion, head_bert); a part with adapters runs with autograd
            no_autograd=("backbone", "language_backbone"),
            add=_add_lora,
            trainable=lambda model, cfg: lora_parameters(model),
            eval_parts=_lora_eval,
            artifact=ArtifactKind.LORA,
            per_part_lr=False,
            defaults={"lr": 2e-4, "weight_decay": 0.0, "language_lr": None},
        ),
        TransferMode(
            name="text",
            official="language_prompt_v1",
            trains="the language backbone (BERT) alone; backbone, FPN and head frozen in eval mode",
            no_autograd=("backbone",),
            trainable=lambda model, cfg: model.language_backbone.parameters(),
            eval_parts=lambda model, cfg: [model.backbone, model.rpn.head],
            artifact=ArtifactKind.WEIGHTS,
            per_part_lr=False,  # the text mode's lr is BERT's lr
            defaults={"lr": 1e-5, "weight_decay": 0.05, "language_lr": None},
        ),
    )
}


def get_mode(name: str) -> TransferMode:
    """The mode called ``name``; a one-line :class:`ConfigError` listing the modes otherwise."""
    if name not in MODES:
        raise ConfigError(f"--mode {name!r}: choose one of {', '.join(MODES)}")
    return MODES[name]


# --------------------------------------------------------------------------- settings


def train_config_for(recipe: Recipe | None = None, mode: str = "full", shots: int = 0) -> TrainConfig:
    """The official settings of ``mode`` from a recipe's ``tuning`` (the built-in official
    defaults of :class:`glip_transfer.recipes.Tuning` without one): optimiser, lr, weight decay,
    frozen stages, schedule, patience, copies per epoch of the ``shots``-shot setting."""
    definition = get_mode(mode)
    tuning = recipe.tuning if recipe is not None and recipe.tuning is not None else Tuning()
    cfg = TrainConfig(
        epochs=tuning.max_epochs,
        batch_size=tuning.batch_size,
        optimizer=tuning.optimizer.lower(),
        warmup_iters=tuning.warmup_iters,
        amp=tuning.use_amp,
        clip_grad_norm=tuning.grad_clip_norm,
        bias_lr_factor=tuning.bias_lr_factor,
        bias_weight_decay=tuning.bias_weight_decay,
        gamma=tuning.lr_decay_factor,
        lr_patience=tuning.lr_patience,
        min_lr=tuning.min_lr,
        early_stop_patience=tuning.early_stop_patience,
        eval_every_epochs=max(1, int(round(tuning.eval_every_epochs))),
        ema=tuning.model_ema,
        seed=tuning.seed,
        shuffle_seed=tuning.shuffle_seed,
        schedule="plateau",
    )
    if shots:
        copies = tuning.few_shot_copies.get(shots)
        if copies is None:
            raise ConfigError(
                f"--shots {shots}: the recipe knows copies for {sorted(tuning.few_shot_copies)} shots; pass --set "
                "train.copies=N"
            )
        cfg.copies = copies
    else:
        cfg.copies = tuning.all_data.copies
        cfg.lr_patience = tuning.all_data.lr_patience
        cfg.early_stop_patience = tuning.all_data.early_stop_patience
    if definition.recipe_entry is not None and definition.recipe_entry in tuning.modes:
        m = tuning.modes[definition.recipe_entry]
        cfg.lr, cfg.weight_decay = m.lr, m.weight_decay
        cfg.language_lr = m.language_lr
        if m.freeze_backbone_at is not None:
            cfg.freeze_backbone_at = m.freeze_backbone_at
    elif definition.defaults:
        cfg = replace(cfg, **definition.defaults)
    return cfg


# --------------------------------------------------------------------------- applying a mode


@dataclass
class ModePlan:
    """A mode applied to a model (:func:`apply_mode`): its definition, the settings it was applied
    with, and the peft config of the LoRA layers it added (LoRA mode)."""

    definition: TransferMode
    cfg: TrainConfig
    lora: dict | None = None

    @property
    def mode(self) -> str:
        return self.definition.name


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


def apply_mode(model: GLIP, mode: str, cfg: TrainConfig) -> ModePlan:
    """Add what ``mode`` trains to ``model`` (prompt offset, LoRA layers), freeze everything else,
    and return the plan. Call :func:`set_train_modes` after building the optimiser."""
    definition = get_mode(mode)
    lora = definition.add(model, cfg) if definition.add is not None else None
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    model.requires_grad_(False)
    for p in definition.trainable(model, cfg):
        p.requires_grad_(True)
    return ModePlan(definition, cfg, lora)


def set_train_modes(model: GLIP, plan: ModePlan, training: bool = True) -> None:
    """``model.train(training)``; when training, the mode's :attr:`TransferMode.eval_parts` in
    eval mode (official: frozen backbone / FPN / rpn head / language backbone and frozen Swin
    stages run in eval mode)."""
    model.train(training)
    if training:
        for module in plan.definition.eval_parts(model, plan.cfg):
            module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_breakdown(model: GLIP) -> dict[str, int]:
    """Trainable parameter counts per part of the model (the prompt offset is a part of its own)."""
    parts = {
        "backbone.body": model.backbone.body,
        "backbone.fpn": model.backbone.fpn,
        "language_backbone": model.language_backbone,
        "rpn.head": model.rpn.head,
        "rpn.tunable_linear (prompt offset)": model.prompt_offset,
    }
    out: dict[str, int] = {}
    for name, part in parts.items():
        n = sum(p.numel() for p in part.parameters() if p.requires_grad) if part is not None else 0
        if n:
            out[name] = n
    return out
