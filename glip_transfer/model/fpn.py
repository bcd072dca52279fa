"""Feature pyramid over C3-C5 with the RetinaNet extra levels P6, P7 (GLIP's ``fpn.py``).

Key names follow the reference (``fpn_inner2..4``, ``fpn_layer2..4``, ``top_blocks.p6/p7``): the
reference numbers the inputs from C2, whose lateral it never builds (``in_channels`` 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FPNConfig


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Conv with bias, "same" padding and the reference's init (kaiming uniform a=1, zero bias)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


class LastLevelP6P7(nn.Module):
    """``P5 [B, C, H, W]`` -> ``[P6, P7]``: 3x3 stride-2 convs, P6 from P5 (not C5: the reference
    uses P5 whenever its channels equal the output channels, as in GLIP), P7 from relu(P6)."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = _conv(channels, channels, 3, stride=2)
        self.p7 = _conv(channels, channels, 3, stride=2)

    def forward(self, p5: torch.Tensor) -> list[torch.Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """``[C3, C4, C5]`` (channels ``in_channels``) -> ``[P3, P4, P5, P6, P7]``, all ``out_channels``.

    Laterals are 1x1 convs, outputs 3x3 convs, no norm or activation; the top-down path adds the
    coarser merged map upsampled (nearest) to the exact size of the finer lateral, so odd sizes
    (e.g. 13 -> 25) work. P6/P7 halve the size with rounding up.
    """

    def __init__(self, in_channels: list[int] | tuple[int, ...], out_channels: int):
        super().__init__()
        self.num_inputs = len(in_channels)
        # reference numbering: the first input is level 2 (C3 -> fpn_inner2)
        for idx, channels in enumerate(in_channels, start=2):
            self.add_module(f"fpn_inner{idx}", _conv(channels, out_channels, 1))
            self.add_module(f"fpn_layer{idx}", _conv(out_channels, out_channels, 3))
        self.top_blocks = LastLevelP6P7(out_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != self.num_inputs:
            raise ValueError(f"FPN expects {self.num_inputs} feature maps, got {len(features)}")
        last = self.num_inputs + 1
        merged = getattr(self, f"fpn_inner{last}")(features[-1])
        results = [getattr(self, f"fpn_layer{last}")(merged)]
        for idx in range(last - 1, 1, -1):  # from the coarsest lateral down to the finest
            lateral = getattr(self, f"fpn_inner{idx}")(features[idx - 2])
            if lateral.shape[-2:] != merged.shape[-2:]:
                # by size, not scale_factor=2, as the reference: exact for any input size
                merged = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = lateral + merged
            results.insert(0, getattr(self, f"fpn_layer{idx}")(merged))
        return results + self.top_blocks(results[-1])


def build_fpn(in_channels: list[int] | tuple[int, ...], cfg: FPNConfig) -> FPN:
    """The FPN of the config over features with ``in_channels`` channels (finest first)."""
    return FPN(in_channels, cfg.out_channels)
