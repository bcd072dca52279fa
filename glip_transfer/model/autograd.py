"""Running frozen parts without autograd, by one rule for every caller (training modes, the
Python API, inference).

A part whose parameters all have ``requires_grad=False``, fed only by tensors that need no
gradient, produces outputs that need no gradient either: autograd would record nothing useful.
Running it under ``torch.no_grad`` is the same function and skips the bookkeeping (and gradient
checkpointing's recompute)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def needs_grad(module: nn.Module, *inputs: torch.Tensor) -> bool:
    """Whether a backward could reach ``module``: grad mode is on and one of ``inputs`` or of its
    parameters requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters())


def grad_if_needed(module: nn.Module, *inputs: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.no_grad()`` when :func:`needs_grad` is False, else a no-op."""
    return contextlib.nullcontext() if needs_grad(module, *inputs) else torch.no_grad()
