"""Writes ``param_groups.json``: the optimiser groups (lr, weight decay, parameter names, in
order) that the trainer built at commit 4b7a6b5 (before the model declared its parameter
groups), for every transfer mode, on GLIP-T and GLIP-T-A built on the meta device.

It ran once against that commit (``PYTHONPATH=<checkout of 4b7a6b5> python make_param_groups.py``)
and is kept to show where the frozen table comes from; ``tests/test_optim.py`` compares today's
groups with it. It uses that commit's API (``apply_mode``, ``TrainModule``, ``param_groups``).
"""

import json
from pathlib import Path

import torch

from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.training.config import LoraSettings, TrainConfig, pretrain_config, train_config_for
from glip_transfer.training.engine import TrainModule
from glip_transfer.training.modes import apply_mode
from glip_transfer.training.optim import param_groups

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


def cases():
    for variant in ("glip-t", "glip-t-a"):
        for mode in ("full", "prompt", "linear", "lora", "text"):
            if not (variant == "glip-t-a" and mode == "lora"):  # its default targets are fusion layers it lacks
                yield f"{variant}/{mode}/recipe", variant, mode, train_config_for(None, mode)
            cfg = TrainConfig(**STRESS, lora=ALL_LORA)
            yield f"{variant}/{mode}/stress", variant, mode, cfg
        yield f"{variant}/full/pretrain", variant, "full", pretrain_config()
        yield (
            f"{variant}/full/stress-unfrozen",
            variant,
            "full",
            TrainConfig(**{**STRESS, "language_lr": None}, freeze_backbone_at=-1),
        )


def main() -> None:
    out = {}
    for key, variant, mode, cfg in cases():
        with torch.device("meta"):
            model = build_glip(variant_config(variant))
            plan = apply_mode(model, mode, cfg)
            module = TrainModule(model, plan)
        named = [("rpn.tunable_linear.weight" if n == "prompt_offset" else n, p) for n, p in module.named_trainable()]
        out[key] = [[g["lr"], g["weight_decay"], g["names"]] for g in param_groups(named, cfg, mode)]
    write_table(out, Path(__file__).with_name("param_groups.json"))


def write_table(cases: dict[str, list], path: Path) -> None:
    """The groups with parameter names as indices into one name list (runs as ``[first, last]``)."""
    names: list[str] = []
    index: dict[str, int] = {}
    compact = {}
    for key, groups in cases.items():
        rows = []
        for lr, wd, group_names in groups:
            runs: list[list[int]] = []
            for name in group_names:
                i = index.setdefault(name, len(names))
                if i == len(names):
                    names.append(name)
                if runs and runs[-1][1] == i - 1:
                    runs[-1][1] = i
                else:
                    runs.append([i, i])
            rows.append([lr, wd, [a if a == b else [a, b] for a, b in runs]])
        compact[key] = rows
    note = "groups: [lr, weight decay, parameter indices into names (runs as [first, last])], in the optimiser's order"
    names_text = ",\n".join(json.dumps(n) for n in names)
    cases_text = ",\n".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in compact.items())
    path.write_text(
        f'{{"commit":"4b7a6b5","note":{json.dumps(note)},\n"names":[\n{names_text}\n],\n"cases":{{\n{cases_text}\n}}}}\n'
    )


if __name__ == "__main__":
    main()
