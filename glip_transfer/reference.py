"""The reference's deterministic weights (``../shared/reference/README.md``), for parity tests and
benchmarks: every float tensor of the state dict is re-created from a seed derived from its key.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _norm_weight_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) and getattr(module, "weight", None) is not None:
            keys.add(f"{name}.weight" if name else "weight")
    return keys


def deterministic_tensor(key: str, shape, one_plus: bool = False) -> torch.Tensor:
    """``randn(shape) * 0.02`` from a generator seeded with ``crc32(key)`` (plus 1 for norm weights)."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(key.encode("utf-8")))
    n = torch.randn(tuple(shape), generator=g, dtype=torch.float32) * 0.02
    return 1 + n if one_plus else n


def init_rule(key: str, norm_weight_keys: set[str]) -> str:
    """Which branch of the rule applies to ``key`` (the manifest's ``fixture_init_rule``)."""
    if key.startswith("rpn.anchor_generator.cell_anchors."):
        return "keep_default"
    if key.endswith(".gamma_v") or key.endswith(".gamma_l"):
        return "const_1_over_NUM_CONVS"
    if key in norm_weight_keys or (key.startswith("rpn.head.scales.") and key.endswith(".scale")):
        return "one_plus_noise"
    if key.endswith("running_var"):
        return "one_plus_abs_noise"
    return "noise"


@torch.no_grad()
def apply_deterministic_weights(model: nn.Module, num_convs: int) -> nn.Module:
    """Overwrite ``model``'s float tensors in place with the reference's deterministic weights."""
    norm_keys = _norm_weight_keys(model)
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue  # Swin relative_position_index: keep the constructed value
        rule = init_rule(key, norm_keys)
        if rule == "keep_default":
            continue
        if rule == "const_1_over_NUM_CONVS":
            value = torch.full(tensor.shape, 1.0 / num_convs, dtype=torch.float32)
        elif rule == "one_plus_abs_noise":
            value = 1 + deterministic_tensor(key, tensor.shape).abs()
        else:
            value = deterministic_tensor(key, tensor.shape, one_plus=rule == "one_plus_noise")
        tensor.data.copy_(value.to(tensor.dtype))
    return model
