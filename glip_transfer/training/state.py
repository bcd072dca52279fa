"""Resumable training state: one safetensors file per checkpoint (tensors) with the rest as JSON in
its metadata — no pickle. ``last`` is rotated to ``last.prev`` before a new ``last`` is written
(atomically), so a corrupt or missing ``last`` falls back to the one before it.

Saved: the trainable tensors, the optimiser state, the EMA averages, the learning-rate schedule,
the AMP grad-scaler, every random state (torch CPU and CUDA, Python ``random``, NumPy) and the
trainer's counters (epoch, batch within the epoch, step, best AP, patience, history). Data order
and augmentation derive from (seed, epoch, index), so the counters restore them.
"""

from __future__ import annotations

import json
import os
import random
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError
from ..files import write_file

STATE_FORMAT = "glip-transfer-train-state"

LEGACY_NAMES = {"rpn.tunable_linear.weight": "prompt_offset"}
"""Trained tensors saved under another name by earlier versions (the prompt offset was the
trainer's own tensor before it became a part of the model)."""


def _crc(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        crc = zlib.crc32(key.encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.view(torch.uint8).numpy() if t.dim() else t.reshape(1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def save_state_file(path: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write ``tensors`` and the JSON-able ``state`` to ``path`` atomically, with a checksum."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": STATE_FORMAT, "state": json.dumps(state), "crc32": _crc(tensors)}
    write_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state file; :class:`CheckpointError` when it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a glip-transfer training checkpoint")
    if meta.get("crc32") != _crc(tensors):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    try:
        state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: its state record is missing or corrupt") from None
    return tensors, state


def save_last(folder: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Rotate ``last`` -> ``last.prev`` and write a new ``last`` (both ``.safetensors``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    last, prev = folder / "last.safetensors", folder / "last.prev.safetensors"
    if last.exists():
        os.replace(last, prev)
    save_state_file(last, tensors, state)
    return last


def load_last(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """The newest readable of ``last`` / ``last.prev``; warns when it had to fall back."""
    folder = Path(folder)
    last, prev = folder / "last.safetensors", folder / "last.prev.safetensors"
    try:
        tensors, state = load_state_file(last)
        return tensors, state, last
    except CheckpointError as e:
        if not prev.is_file():
            raise CheckpointError(
                f"{e}; no earlier checkpoint (last.prev) to fall back to: start again without --resume (with --force)"
            ) from None
        warnings.warn(f"{e}; falling back to the previous checkpoint {prev.name}", stacklevel=2)
    tensors, state = load_state_file(prev)
    return tensors, state, prev


def trained_tensors(tensors: dict[str, torch.Tensor], prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors saved as ``prefix + name`` for each of ``names`` that is there (also under its
    :data:`LEGACY_NAMES` name)."""
    out = {}
    for name in names:
        for saved in (name, LEGACY_NAMES.get(name)):
            if saved is not None and prefix + saved in tensors:
                out[name] = tensors[prefix + saved]
                break
    return out


def has_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "last.safetensors").exists() or (folder / "last.prev.safetensors").exists()


# --------------------------------------------------------------------------- random states


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) of every random generator in use."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    data = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, data


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- optimiser state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimiser's state dict split into tensors (``optim/<index>/<key>``) and JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], data: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if not key.startswith("optim/"):
            continue
        _, idx, k = key.split("/", 2)
        state.setdefault(int(idx), {})[k] = v
    for idx, st in data.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in data["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
