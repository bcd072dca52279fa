"""The optimiser's parameter groups (lr and weight decay of every trainable parameter, in order)
for every transfer mode on GLIP-T and GLIP-T-A equal the frozen table ``data/param_groups.json``,
which the trainer built at commit 4b7a6b5 from parameter-name rules (``data/make_param_groups.py``),
before the model declared its parameter roles. The settings follow the official solver
(``maskrcnn_benchmark/solver/build.py``)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.training.config import LoraSettings, TrainConfig, pretrain_config
from glip_transfer.training.modes import apply_mode, train_config_for
from glip_transfer.training.optim import param_groups

TABLE = json.loads((Path(__file__).parent / "data" / "param_groups.json").read_text())

# every factor away from 1 and every rule switched on (the same values as make_param_groups.py)
STRESS = dict(
    lr=1e-3,
    language_lr=2e-5,
    weight_decay=0.05,
    bias_lr_factor=3.0,
    bias_weight_decay=0.01,
    norm_weight_decay_factor=0.5,
    backbone_lr_factor=0.1,
)
ALL_LORA = LoraSettings(targets=("fusion", "head_bert", "bert", "swin", "predictors"))


def case_config(setting: str, mode: str) -> TrainConfig:
    if setting == "recipe":
        return train_config_for(None, mode)
    if setting == "stress":
        return TrainConfig(**STRESS, lora=ALL_LORA)
    if setting == "pretrain":
        return pretrain_config()
    assert setting == "stress-unfrozen"
    return TrainConfig(**{**STRESS, "language_lr": None}, freeze_backbone_at=-1)


@functools.cache
def meta_model(variant: str):
    """The variant built once on the meta device (no memory); each case works on a copy."""
    with torch.device("meta"):
        return build_glip(variant_config(variant))


def expand(indices: list) -> list[str]:
    out = []
    for item in indices:
        first, last = item if isinstance(item, list) else (item, item)
        out.extend(TABLE["names"][first : last + 1])
    return out


@pytest.mark.parametrize("case", sorted(TABLE["cases"]))
def test_groups_equal_the_frozen_table(case):
    variant, mode, setting = case.split("/")
    cfg = case_config(setting, mode)
    model = copy.deepcopy(meta_model(variant))
    with torch.device("meta"):
        plan = apply_mode(model, mode, cfg)
    got = [[g["lr"], g["weight_decay"], g["names"]] for g in param_groups(model, cfg, plan.definition.per_part_lr)]
    want = [[lr, wd, expand(indices)] for lr, wd, indices in TABLE["cases"][case]]
    assert [(lr, wd, len(n)) for lr, wd, n in got] == [(lr, wd, len(n)) for lr, wd, n in want]
    assert got == want  # the same floats (not approximately), the same parameters, the same order
