"""Where and how work runs, shared by the commands, the trainer and the Python API: the device,
the CUDA autocast precision, and the progress bar of long work."""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .config import ConfigError

AmpDtype = Literal["auto", "bfloat16", "float16"]
"""Autocast precision: ``auto`` is bf16 where the GPU supports it, else fp16."""

PROGRESS_ENV = "GLIP_PROGRESS"  # "0" hides every progress bar (tests, logs)


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a
    :class:`~glip_transfer.config.ConfigError` for a name torch does not know or a GPU that is
    not there."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None


def autocast_dtype(device: torch.device, enabled: bool, dtype: AmpDtype = "auto") -> torch.dtype | None:
    """The reduced precision a CUDA forward runs in, or None (float32): CPU paths always stay
    float32 (no bf16 units on the CPUs this runs on)."""
    if not enabled or device.type != "cuda":
        return None
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def precision_name(device: torch.device, enabled: bool, dtype: AmpDtype = "auto") -> str:
    """``float32``, ``bfloat16`` or ``float16``: the precision :func:`autocast` runs a forward in."""
    chosen = autocast_dtype(torch.device(device), enabled, dtype)
    return "float32" if chosen is None else str(chosen).removeprefix("torch.")


def autocast(device: torch.device, enabled: bool, dtype: AmpDtype = "auto") -> contextlib.AbstractContextManager:
    """CUDA autocast in :func:`autocast_dtype`'s precision; a no-op where that is float32."""
    chosen = autocast_dtype(device, enabled, dtype)
    if chosen is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=chosen)


class RateColumn(ProgressColumn):
    """Throughput of a task: completed units per second (the task's ``unit`` field, default "it")."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:.2f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


def progress_bar(transient: bool = False) -> Progress:
    """A Rich progress bar on stderr (description, bar, done/total, elapsed, remaining, rate,
    info); hidden when ``$GLIP_PROGRESS`` is ``0``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        RateColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        transient=transient,
        disable=os.environ.get(PROGRESS_ENV, "") == "0",
    )
