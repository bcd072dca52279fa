"""What a transfer run leaves behind, and applying it to a base model.

By mode (in the run folder):

* ``prompt`` — ``prompt.safetensors``: the ``[max_query_len, C_text]`` offset alone (786 KB for
  GLIP-T), with the caption, the recipe and the base checkpoint's sha256 in its metadata;
* ``lora`` — ``lora/``: the peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``),
  the same metadata in the safetensors header;
* ``full`` / ``linear`` / ``text`` — ``weights.safetensors``: the tensors that training changed
  (official key names), with the metadata, the model config and the training config.

:func:`load_adapter` applies any of them to a base model and refuses one made for another base
checkpoint (or, for a prompt offset, another caption) with a one-line :class:`AdapterError`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_write

ADAPTER_FORMAT = "glip-transfer-adapter"
PROMPT_FILE = "prompt.safetensors"
WEIGHTS_FILE = "weights.safetensors"
LORA_DIR = "lora"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"


class AdapterError(CheckpointError):
    """An adapter artifact is unreadable or made for another base model / prompt."""


# --------------------------------------------------------------------------- base identity


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per process for a given (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256(str(p), st.st_size, st.st_mtime_ns)


def state_sha256(model: nn.Module) -> str:
    """For a model built without a weights file (``--variant``): ``state:`` + the sha256 of its
    parameters and buffers (names, shapes, bytes) in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()


def base_hash(weights: str | os.PathLike | None, model: nn.Module | None = None) -> str:
    """The identity of a base model: the weights file's sha256, or :func:`state_sha256`."""
    if weights is not None:
        from ..checkpoint import resolve_weights

        return file_sha256(resolve_weights(weights))
    if model is None:
        raise ValueError("base_hash needs the weights file or the model")
    return state_sha256(model)


def _short(h: str | None) -> str:
    if not h:
        return "unknown"
    return h[:6] + h[6:18] if h.startswith("state:") else h[:12]


# --------------------------------------------------------------------------- saving


def _meta(mode: str, caption: str, recipe: str | None, base: str, extra: dict | None) -> dict[str, str]:
    meta = {"format": ADAPTER_FORMAT, "mode": mode, "caption": caption, "recipe": recipe or "", "base_sha256": base}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_prompt_artifact(path: str | os.PathLike, offset: torch.Tensor, *, caption: str, recipe: str | None, base: str,
                         extra: dict | None = None) -> Path:  # fmt: skip
    """The prompt offset ``[T, C]`` (float32) as safetensors with its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"prompt_offset": offset.detach().to(torch.float32).contiguous().cpu()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=_meta("prompt", caption, recipe, base, extra)))
    return path


def save_weights_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], *, mode: str, caption: str,
                          recipe: str | None, base: str, extra: dict | None = None) -> Path:  # fmt: skip
    """The changed weights (official names) as safetensors with metadata (model + train config in ``extra``)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=_meta(mode, caption, recipe, base, extra)))
    return path


def save_lora_artifact(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], lora_config: dict, *, caption: str,
                       recipe: str | None, base: str, extra: dict | None = None) -> Path:  # fmt: skip
    """A peft adapter folder: ``adapter_model.safetensors`` (peft key names, without the adapter
    name) and ``adapter_config.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    import dataclasses

    from peft import LoraConfig

    peft_state = {k.replace(".default.", "."): v.detach().contiguous().cpu() for k, v in tensors.items() if ".lora_" in k}
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    config = LoraConfig(**{k: v for k, v in lora_config.items() if k in fields and k not in ("peft_type", "task_type")})
    text = json.dumps(config.to_dict(), indent=2, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    atomic_write(folder / LORA_CONFIG, lambda tmp: Path(tmp).write_text(text))
    atomic_write(folder / LORA_WEIGHTS, lambda tmp: save_file(peft_state, tmp, metadata=_meta("lora", caption, recipe, base, extra)))
    return folder


# --------------------------------------------------------------------------- loading


def find_artifact(path: str | os.PathLike) -> Path:
    """The artifact file/folder at ``path``: a ``.safetensors`` file, a LoRA folder, or a run
    folder holding one of them."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / LORA_CONFIG).is_file():
            return p
        for name in (PROMPT_FILE, WEIGHTS_FILE, LORA_DIR):
            if (p / name).exists():
                return p / name
        raise AdapterError(f"{p}: no adapter here (expected {PROMPT_FILE}, {WEIGHTS_FILE} or a {LORA_DIR}/ folder from glip finetune)")
    raise AdapterError(f"{p}: adapter not found")


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(tensors, metadata, file) of an artifact."""
    from ..checkpoint import CheckpointError, read_safetensors

    found = find_artifact(path)
    file = found / LORA_WEIGHTS if found.is_dir() else found
    try:
        tensors, meta = read_safetensors(file)
    except CheckpointError:
        raise AdapterError(f"{file}: not a readable adapter (not a valid safetensors file; it may be truncated)") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{file}: not a glip finetune adapter (no '{ADAPTER_FORMAT}' metadata)")
    return tensors, meta, found


def load_adapter(model: nn.Module, path: str | os.PathLike, *, base_hash: str | None, caption: str | None) -> torch.Tensor | None:
    """Apply the artifact at ``path`` to ``model`` (in place) and return the prompt offset
    ``[T, C]`` (prompt mode) or None (weights / LoRA, merged into the model).

    Refuses (:class:`AdapterError`, one line) an artifact made for a base checkpoint whose hash
    differs from ``base_hash``, and a prompt offset trained for another ``caption`` (its rows are
    tied to token positions). ``base_hash=None`` / ``caption=None`` skip those checks. A weights
    or LoRA artifact used with another caption only warns: it works with any prompt.
    """
    tensors, meta, found = read_artifact(path)
    mode = meta.get("mode", "?")
    made_for = meta.get("base_sha256")
    if base_hash is not None and made_for and made_for != base_hash:
        raise AdapterError(
            f"{found}: this {mode} adapter was made for base weights {_short(made_for)}, not these ({_short(base_hash)}): "
            "pass the --weights it was trained from"
        )
    trained_caption = meta.get("caption", "")
    if caption is not None and trained_caption and caption != trained_caption:
        if mode == "prompt":
            raise AdapterError(
                f"{found}: this prompt offset was trained for the caption {trained_caption[:60]!r}, not {caption[:60]!r}: "
                "evaluate with the same categories/prompt (recipe) it was trained on"
            )
        warnings.warn(f"{found.name}: trained with the caption {trained_caption[:60]!r}, used with {caption[:60]!r}", stacklevel=2)
    if mode == "prompt":
        offset = tensors.get("prompt_offset")
        text_dim = model.cfg.language.hidden_size
        if offset is None or offset.dim() != 2 or offset.shape[1] != text_dim:
            shape = None if offset is None else list(offset.shape)
            raise AdapterError(f"{found}: prompt offset of shape {shape} does not fit a model with {text_dim}-wide text features")
        param = next(model.parameters())
        return offset.to(device=param.device, dtype=torch.float32)
    if mode == "lora":
        _apply_lora(model, found, tensors)
        return None
    own = model.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise AdapterError(f"{found}: {len(bad)} tensor(s) do not fit the model (first: {bad[0]}): made for another variant")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))
    return None


def _apply_lora(model: nn.Module, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import set_peft_model_state_dict

    from .modes import inject_lora

    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise AdapterError(f"{folder}: unreadable {LORA_CONFIG} ({str(e).splitlines()[0][:120]})") from None
    inject_lora(model, config)
    result = set_peft_model_state_dict(model, tensors)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise AdapterError(f"{folder}: adapter tensors do not fit the model (first: {unexpected[0]})")
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    for p in model.parameters():
        p.requires_grad_(False)


def apply_adapter(model: nn.Module, path: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                  captions: list[str] | None = None) -> tuple[nn.Module, torch.Tensor | None]:  # fmt: skip
    """For ``glip zeroshot eval`` / ``glip predict --adapter``: :func:`load_adapter` with the
    base hash of ``weights`` (or of the model when None) and the run's caption (prompt offsets
    need exactly one caption). Returns ``(model, prompt_offset or None)``."""
    _, meta, found = read_artifact(path)
    caption = None
    if captions is not None:
        if meta.get("mode") == "prompt" and len(captions) != 1:
            raise AdapterError(f"{found}: a prompt offset fits one caption, but this prompt is split into {len(captions)} chunks")
        caption = captions[0] if len(captions) == 1 else None
    offset = load_adapter(model, path, base_hash=base_hash(weights, model), caption=caption)
    return model, offset
