"""What a transfer run leaves behind, and applying it to a base model.

Three kinds (:class:`ArtifactKind`; each transfer mode names its kind in
:data:`glip_transfer.training.modes.MODES`), in the run folder:

* ``prompt`` — ``prompt.safetensors``: the prompt offset ``[max_query_len, C_text]`` alone
  (tensor ``prompt_offset``; 786 KB for GLIP-T), with the caption, the recipe and the base
  checkpoint's sha256 in its metadata; applied as the model's ``rpn.tunable_linear``;
* ``lora`` — ``lora/``: the peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``),
  the same metadata in the safetensors header; applied by injecting and merging the adapters;
* ``weights`` — ``weights.safetensors``: the tensors that training changed (official key names),
  with the metadata, the model config and the training config; copied into the model.

:func:`apply_adapter` applies any of them to a base model and refuses one made for another base
checkpoint (or, for a prompt offset, another caption) with a one-line :class:`AdapterError`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import CheckpointError, read_safetensors, weights_sha256
from ..files import write_file, write_text
from ..model.glip import GLIP
from .lora import LORA_MARK, load_lora_folder, lora_config_json

ADAPTER_FORMAT = "glip-transfer-adapter"
PROMPT_FILE = "prompt.safetensors"
PROMPT_TENSOR = "prompt_offset"
WEIGHTS_FILE = "weights.safetensors"
LORA_DIR = "lora"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"


class AdapterError(CheckpointError):
    """An adapter artifact is unreadable or made for another base model / prompt."""


class ArtifactKind(str, enum.Enum):
    """What a run's artifact holds (see the module docstring)."""

    PROMPT = "prompt"
    LORA = "lora"
    WEIGHTS = "weights"

    @property
    def file(self) -> str:
        """Its file (or folder) name in a run folder."""
        return {ArtifactKind.PROMPT: PROMPT_FILE, ArtifactKind.LORA: LORA_DIR, ArtifactKind.WEIGHTS: WEIGHTS_FILE}[self]


# --------------------------------------------------------------------------- base identity


def state_sha256(model: nn.Module) -> str:
    """For a model built without a weights file (``--variant``): ``state:`` + the sha256 of its
    parameters and buffers (names, shapes, bytes) in name order, without what adapters add (LoRA
    layers, the prompt offset)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if LORA_MARK in name or name.startswith("rpn.tunable_linear."):
            continue
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update((t if t.dim() else t.reshape(1)).view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()


def base_hash(weights: str | os.PathLike | None, model: nn.Module | None = None) -> str:
    """The identity of a base model: its weights' sha256 (``checkpoint.weights_sha256``: the same
    for an official ``.pth`` and its model-only copy; a name resolves to its file), or
    :func:`state_sha256`."""
    if weights is not None:
        return weights_sha256(weights)
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


def save_prompt_artifact(
    path: str | os.PathLike,
    offset: torch.Tensor,
    *,
    caption: str,
    recipe: str | None,
    base: str,
    extra: dict | None = None,
) -> Path:
    """The prompt offset ``[T, C]`` (float32) as safetensors with its metadata."""
    path = Path(path)
    tensors = {PROMPT_TENSOR: offset.detach().to(torch.float32).contiguous().cpu()}
    meta = _meta(ArtifactKind.PROMPT.value, caption, recipe, base, extra)
    write_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def save_weights_artifact(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    mode: str,
    caption: str,
    recipe: str | None,
    base: str,
    extra: dict | None = None,
) -> Path:
    """The changed weights (official names) as safetensors with metadata (model + train config in ``extra``)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_file(path, lambda tmp: save_file(tensors, tmp, metadata=_meta(mode, caption, recipe, base, extra)))
    return path


def save_lora_artifact(
    folder: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    lora_config: dict,
    *,
    caption: str,
    recipe: str | None,
    base: str,
    extra: dict | None = None,
) -> Path:
    """A peft adapter folder: ``adapter_model.safetensors`` (peft key names, without the adapter
    name) and ``adapter_config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_state = {
        k.replace(".default.", "."): v.detach().contiguous().cpu() for k, v in tensors.items() if LORA_MARK in k
    }
    text = lora_config_json(lora_config)
    meta = _meta(ArtifactKind.LORA.value, caption, recipe, base, extra)
    write_text(folder / LORA_CONFIG, text)
    write_file(folder / LORA_WEIGHTS, lambda tmp: save_file(peft_state, tmp, metadata=meta))
    return folder


def save_artifact(
    kind: ArtifactKind,
    folder: Path,
    model: GLIP,
    *,
    mode: str,
    lora_config: dict | None,
    caption: str,
    recipe: str | None,
    base: str,
    extra: dict,
) -> Path:
    """The artifact of ``kind`` in the run ``folder``, from the model's trainable tensors as they
    are now; ``extra`` goes into the metadata."""
    if kind is ArtifactKind.PROMPT:
        if model.prompt_offset is None:
            raise ValueError("a prompt artifact needs the model's prompt offset")
        return save_prompt_artifact(
            folder / kind.file, model.prompt_offset.weight, caption=caption, recipe=recipe, base=base, extra=extra
        )
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if kind is ArtifactKind.LORA:
        return save_lora_artifact(
            folder / kind.file, tensors, lora_config or {}, caption=caption, recipe=recipe, base=base, extra=extra
        )
    return save_weights_artifact(
        folder / kind.file, tensors, mode=mode, caption=caption, recipe=recipe, base=base, extra=extra
    )


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
        for kind in ArtifactKind:
            if (p / kind.file).exists():
                return p / kind.file
        raise AdapterError(
            f"{p}: no adapter here (expected {PROMPT_FILE}, {WEIGHTS_FILE} or a {LORA_DIR}/ folder from glip finetune)"
        )
    raise AdapterError(f"{p}: adapter not found")


def _kind(found: Path, tensor_names) -> ArtifactKind:
    if found.is_dir():
        return ArtifactKind.LORA
    return ArtifactKind.PROMPT if PROMPT_TENSOR in tensor_names else ArtifactKind.WEIGHTS


def _unreadable(file: Path) -> AdapterError:
    return AdapterError(f"{file}: not a readable adapter (not a valid safetensors file; it may be truncated)")


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, Path, ArtifactKind]:
    """(tensors, metadata, file or LoRA folder, kind) of an artifact."""
    found = find_artifact(path)
    file = found / LORA_WEIGHTS if found.is_dir() else found
    try:
        tensors, meta = read_safetensors(file)
    except CheckpointError:
        raise _unreadable(file) from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{file}: not a glip finetune adapter (no '{ADAPTER_FORMAT}' metadata)")
    return tensors, meta, found, _kind(found, tensors)


def read_artifact_header(path: str | os.PathLike) -> tuple[dict, Path, ArtifactKind]:
    """(metadata, file or LoRA folder, kind) of an artifact from its safetensors header alone (no
    tensor is read): the check an adapter passes before any weights are loaded."""
    from safetensors import safe_open

    found = find_artifact(path)
    file = found / LORA_WEIGHTS if found.is_dir() else found
    try:
        with safe_open(str(file), framework="pt") as f:
            meta, names = dict(f.metadata() or {}), set(f.keys())
    except Exception:  # noqa: BLE001 - any header failure is an unreadable adapter
        raise _unreadable(file) from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{file}: not a glip finetune adapter (no '{ADAPTER_FORMAT}' metadata)")
    return meta, found, _kind(found, names)


def check_adapter_caption(meta: dict, found: Path, kind: ArtifactKind, captions: list[str]) -> None:
    """Refuse (:class:`AdapterError`) a prompt offset used with a prompt split into several
    captions or with another caption than it was trained for (its rows are tied to token
    positions); a weights or LoRA artifact used with another caption only warns: it works with
    any prompt."""
    trained = meta.get("caption", "")
    if kind is ArtifactKind.PROMPT and len(captions) != 1:
        raise AdapterError(
            f"{found}: a prompt offset fits one caption, but this prompt is split into {len(captions)} chunks"
        )
    caption = captions[0] if len(captions) == 1 else None
    if caption is None or not trained or caption == trained:
        return
    if kind is ArtifactKind.PROMPT:
        raise AdapterError(
            f"{found}: this prompt offset was trained for the caption {trained[:60]!r}, not {caption[:60]!r}: "
            "evaluate with the same categories/prompt (recipe) it was trained on"
        )
    warnings.warn(f"{found.name}: trained with the caption {trained[:60]!r}, used with {caption[:60]!r}", stacklevel=3)


def load_adapter(model: GLIP, path: str | os.PathLike, *, base_hash: str | None, caption: str | None) -> ArtifactKind:
    """Apply the artifact at ``path`` to ``model`` in place: a prompt offset becomes the model's
    ``rpn.tunable_linear``; LoRA adapters are merged into the weights; changed weights are copied
    in. Returns the artifact's kind.

    Refuses (:class:`AdapterError`, one line) an artifact made for another variant (glip-nano vs
    GLIP-T: both named), one made for a base checkpoint whose hash
    differs from ``base_hash``, and a prompt offset trained for another ``caption`` (its rows are
    tied to token positions). ``base_hash=None`` / ``caption=None`` skip those checks. A weights
    or LoRA artifact used with another caption only warns: it works with any prompt.
    """
    tensors, meta, found, kind = read_artifact(path)
    variant = meta.get("variant")
    if variant and variant != model.cfg.variant:
        raise AdapterError(
            f"{found}: this {meta.get('mode', '?')} adapter was made for {variant}, not {model.cfg.variant}: "
            f"pass --weights of the {variant} model it was trained from"
        )
    made_for = meta.get("base_sha256")
    if base_hash is not None and made_for and made_for != base_hash:
        raise AdapterError(
            f"{found}: this {meta.get('mode', '?')} adapter was made for base weights {_short(made_for)}, "
            f"not these ({_short(base_hash)}): pass the --weights it was trained from"
        )
    if caption is not None:
        check_adapter_caption(meta, found, kind, [caption])
    if kind is ArtifactKind.PROMPT:
        _apply_prompt(model, found, tensors[PROMPT_TENSOR])
    elif kind is ArtifactKind.LORA:
        try:
            load_lora_folder(model, found, tensors)
        except ValueError as e:
            raise AdapterError(f"{found}: {e}") from None
    else:
        _apply_weights(model, found, tensors)
    return kind


def _apply_prompt(model: GLIP, found: Path, offset: torch.Tensor) -> None:
    text_dim = model.cfg.language.hidden_size
    if offset.dim() != 2 or offset.shape[1] != text_dim:
        raise AdapterError(
            f"{found}: prompt offset of shape {list(offset.shape)} does not fit a model with {text_dim}-wide text "
            "features"
        )
    model.set_prompt_offset(offset.to(torch.float32)).requires_grad_(False)


def _apply_weights(model: nn.Module, found: Path, tensors: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise AdapterError(
            f"{found}: {len(bad)} tensor(s) do not fit the model (first: {bad[0]}): made for another variant"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))


def apply_adapter(
    model: GLIP, path: str | os.PathLike, *, weights: str | os.PathLike | None = None, captions: list[str] | None = None
) -> GLIP:
    """For ``glip zeroshot eval`` / ``glip predict --adapter`` and the Python API:
    :func:`load_adapter` with the base hash of ``weights`` (or of the model when None), after
    :func:`check_adapter_caption` on the prompt's ``captions`` (None: not checked here). Returns
    the model."""
    if captions is not None:
        check_adapter_caption(*read_artifact_header(path), captions)
    load_adapter(model, path, base_hash=base_hash(weights, model), caption=None)
    return model
