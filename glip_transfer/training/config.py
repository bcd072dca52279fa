"""Training configuration: :class:`TrainConfig`, filled from a recipe's official tuning settings
(``recipes/*.yaml``, :class:`glip_transfer.recipes.Tuning`) for a transfer mode
(:func:`glip_transfer.training.modes.train_config_for`), then from the command line
(``--epochs``, ``--batch-size``, ``--set train.lr=...``).

Where a value comes from in the official code is noted next to each field; values without a
note are our own (LoRA and text-only tuning have no official counterpart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ConfigError, from_dict, override_dataclass, to_dict
from ..runtime import AmpDtype

OFFICIAL_MIN_SIZES = (480, 560, 640, 720, 800)  # AUGMENT.MULT_MIN_SIZE_TRAIN of the GLIP-T pretrain config


@dataclass
class LoraSettings:
    """peft LoRA adapters. ``targets``: presets ``fusion`` (the fused head's bi-directional
    cross-attention projections), ``head_bert`` (the BERT layers inside the head), ``bert`` (the
    language backbone's attention), ``swin`` (Swin window attention ``qkv``/``proj``),
    ``predictors`` (the text projection of the dot-product head), or any regular expression
    matched against full module names."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("fusion", "head_bert")


ZERO_MEANS = {
    "max_steps": "all epochs",
    "checkpoint_every_steps": "after each epoch only",
    "warmup_iters": "no warmup",
    "workers": "load in the training process",
}
"""What 0 means for the step-count settings that accept it (the range errors say so)."""


@dataclass
class TrainConfig:
    """Everything the trainer needs besides the model and the data. Batch sizes are global (over
    all processes), as the official ``SOLVER.IMS_PER_BATCH``."""

    epochs: int = 12  # SOLVER.MAX_EPOCH (ODinW fine-tuning: 200 via the command line)
    batch_size: int = 4  # SOLVER.IMS_PER_BATCH (global)
    lr: float = 1e-4  # SOLVER.BASE_LR
    language_lr: float | None = 1e-5  # SOLVER.LANG_LR: parameters under language_backbone (None: lr)
    weight_decay: float = 0.05  # SOLVER.WEIGHT_DECAY
    bias_lr_factor: float = 2.0  # SOLVER.BIAS_LR_FACTOR: every parameter whose name contains "bias"
    bias_weight_decay: float = 0.0  # SOLVER.WEIGHT_DECAY_BIAS
    norm_weight_decay_factor: float = 1.0  # SOLVER.WEIGHT_DECAY_NORM_FACTOR ("norm"/"Norm" in the name)
    backbone_lr_factor: float = 1.0  # SOLVER.BACKBONE_BODY_LR_FACTOR (Swin)
    optimizer: Literal["adamw", "sgd"] = "adamw"  # SOLVER.OPTIMIZER
    momentum: float = 0.9  # SOLVER.MOMENTUM (sgd)
    warmup_iters: int = 0  # SOLVER.WARMUP_ITERS
    warmup_factor: float = 1.0 / 3  # SOLVER.WARMUP_FACTOR
    warmup_method: Literal["linear", "constant"] = "linear"  # SOLVER.WARMUP_METHOD
    # plateau (USE_AUTOSTEP: x gamma on a val-AP plateau) | multistep (STEPS) | constant
    schedule: Literal["plateau", "multistep", "constant"] = "plateau"
    milestones: tuple[float, ...] = (0.67, 0.89)  # SOLVER.STEPS: < 1 fractions of all steps, else step numbers
    gamma: float = 0.1  # SOLVER.GAMMA
    lr_patience: int = 3  # SOLVER.STEP_PATIENCE (evaluations)
    min_lr: float = 1e-6  # SOLVER.MIN_LR
    early_stop_patience: int = 8  # SOLVER.AUTO_TERMINATE_PATIENCE (evaluations; <= 0: never stop early)
    clip_grad_norm: float = 1.0  # SOLVER.CLIP_GRADIENTS full_model CLIP_VALUE (<= 0: off)
    ema: float = 0.0  # SOLVER.MODEL_EMA decay (0: off); when on, evaluation uses the averaged weights
    amp: bool = True  # SOLVER.USE_AMP (CUDA only: bf16 where supported, else fp16 with a GradScaler)
    amp_dtype: AmpDtype = "auto"  # auto: bf16 where supported, else fp16 (fp16 trains with a GradScaler)
    seed: int = 10  # SOLVER.SEED: initialisation of trainable additions, dropout, data order, augmentation
    shuffle_seed: int = 3  # DATASETS.SHUFFLE_SEED: which few-shot images are drawn
    workers: int = 0  # image loading processes (per process)
    min_sizes: tuple[int, ...] = OFFICIAL_MIN_SIZES  # AUGMENT.MULT_MIN_SIZE_TRAIN (short side drawn per image)
    max_size: int = 1333  # INPUT.MAX_SIZE_TRAIN
    flip_prob: float = 0.5  # AUGMENT.FLIP_PROB_TRAIN
    copies: int = 1  # DATASETS.GENERAL_COPY: passes over the training set per epoch
    freeze_backbone_at: int = 2  # MODEL.BACKBONE.FREEZE_CONV_BODY_AT (full mode): 2 = patch embed + stage 1; -1 = none
    eval_every_epochs: int = 1  # SOLVER.CHECKPOINT_PER_EPOCH
    eval_before: bool = False  # also evaluate the starting weights (logged as epoch 0; not used for selection)
    checkpoint_every_steps: int = 0  # also write `last` every N steps (0: after each epoch only)
    max_steps: int = 0  # stop training after N steps in total (0: all epochs)
    dropout: float | None = None  # override every dropout probability of the model (None: keep 0.1)
    negatives: int = 85  # DATASETS.RANDOM_SAMPLE_NEG (pretraining on detection data)
    few_shot_prepared: bool = False  # use the recipe's prepared few-shot files instead of sampling
    frozen: tuple[str, ...] = ()  # full mode: parameter-name prefixes that stay frozen (e.g. language_backbone)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def check(self) -> "TrainConfig":
        """Validate every value (types and choices, then ranges); the first problem as a
        one-line :class:`~glip_transfer.config.ConfigError`."""
        from_dict(TrainConfig, to_dict(self), "train")
        problems = []
        if self.epochs < 1:
            problems.append(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            problems.append(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            problems.append(f"train.ema must be in [0, 1), got {self.ema}")
        if not self.min_sizes or min(self.min_sizes) < 1:
            problems.append(f"train.min_sizes must be positive sizes, got {list(self.min_sizes)}")
        if self.copies < 1:
            problems.append(f"train.copies must be >= 1, got {self.copies}")
        if self.lora.rank < 1:
            problems.append(f"train.lora.rank must be >= 1, got {self.lora.rank}")
        if self.max_size < max(self.min_sizes or [1]):
            problems.append(f"train.max_size must be >= every train.min_sizes, got {self.max_size}")
        for name in ("max_steps", "checkpoint_every_steps", "warmup_iters", "workers"):
            if getattr(self, name) < 0:
                problems.append(f"train.{name} must be >= 0 (0: {ZERO_MEANS[name]}), got {getattr(self, name)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            problems.append(f"train.dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ConfigError(problems[0])
        return self


def pretrain_config(recipe_settings: dict | None = None) -> TrainConfig:
    """GLIP-T pretraining settings (``configs/pretrain/glip_Swin_T_O365_GoldG.yaml``): AdamW 1e-4,
    BERT 1e-5, weight decay 1e-4, steps at 67 % / 89 %, 2000 warm-up iterations from 0.001, EMA
    0.999, AMP, gradient clipping 1.0, nothing frozen (FREEZE_CONV_BODY_AT -1), 30 epochs, batch 64;
    then a recipe's ``pretraining.train`` settings replace any of them."""
    cfg = TrainConfig(
        epochs=30,
        batch_size=64,
        lr=1e-4,
        language_lr=1e-5,
        weight_decay=1e-4,
        warmup_iters=2000,
        warmup_factor=0.001,
        schedule="multistep",
        milestones=(0.67, 0.89),
        ema=0.999,
        amp=True,
        clip_grad_norm=1.0,
        freeze_backbone_at=-1,
        early_stop_patience=0,
        seed=0,
    )
    if recipe_settings:
        from ..config import from_dict, to_dict

        cfg = from_dict(TrainConfig, {**to_dict(cfg), **recipe_settings}, "pretraining.train")
    return cfg


def apply_train_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``--set train.key=value`` (the ``train.`` prefix already removed) applied and validated."""
    for item in overrides:
        if item.split("=", 1)[0].strip() == "eval_batch_size":
            value = item.split("=", 1)[1] if "=" in item else "N"
            raise ConfigError(
                f"train.eval_batch_size is now evaluation.batch_size, one setting for validation, test and glip "
                f"zeroshot eval: --set evaluation.batch_size={value}"
            )
    return override_dataclass(cfg, overrides, "train").check()


APPLIED_ON_RESUME: tuple[str, ...] = (
    "train.workers",
    "train.checkpoint_every_steps",
    "train.epochs",
    "train.max_steps",
    "train.early_stop_patience",
)
"""Settings a ``--resume`` may change: they decide only what happens from now on (how long to
train, when to stop early or write a checkpoint, how images load), so the run equals one started
with them. Every other difference of the run's identity (the learning rates, whose optimiser
and schedule state is restored from the checkpoint, the data, the model, the caption...) is
refused. The run length is refused too under a multi-step schedule whose milestones are fractions
of it."""


def resume_decision(diff: dict[str, tuple], cfg: TrainConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``(applied, refused)``: the changes ``{key: (saved, now)}`` of a resumed run's identity
    split by :data:`APPLIED_ON_RESUME`."""
    length_sets_milestones = cfg.schedule == "multistep" and any(m < 1 for m in cfg.milestones)
    applied, refused = {}, {}
    for key, change in diff.items():
        ok = key in APPLIED_ON_RESUME and not (length_sets_milestones and key in ("train.epochs", "train.max_steps"))
        (applied if ok else refused)[key] = change
    return applied, refused
