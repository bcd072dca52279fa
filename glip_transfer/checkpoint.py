"""Loading the official GLIP checkpoints (``.pth``) and saving / loading our own (safetensors).

Official files are plain dicts of tensors and numbers, so they are read with
``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused with an
explanation instead of being executed.

Loading is fast and small: a ``.pth`` is memory-mapped (``mmap=True``) and only its ``model``
entry is used (the official GLIP-T file also carries ``model_ema`` and the optimizer state, four
times the model's size), safetensors are memory-mapped too, and the model is built with its
parameters on the meta device, so the file's tensors *become* the parameters: no random
initialisation, no second copy. ``--weights`` names (``glip-t``...) resolve through :mod:`.hub`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import GLIPConfig, from_dict, to_dict, variant_config
from .files import write_file


class CheckpointError(ValueError):
    """The weights file is missing, unreadable, or does not fit the model; the message says why."""


# keys the official files may carry that the model does not have, and that are safe to drop
_IGNORED_SUFFIXES = ("embeddings.position_ids",)
_IGNORED_PARTS = (".pooler.",)


atomic_write = write_file
"""The output writer of :mod:`glip_transfer.files` under its earlier name (code written against it)."""


def _torch_load(path: Path) -> dict:
    """The unpickled dict of tensors, memory-mapped: only the tensors that are used are read."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # files in the legacy (pre-zip) format cannot be memory-mapped: read them whole
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not _has_checkpoint_header(path):
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither the zip format of torch.save nor a pickle); pass an "
                "official GLIP .pth or a .safetensors"
            ) from None
        if _names_python_objects(str(e)):
            raise CheckpointError(
                f"{path}: the file holds Python objects beyond tensors and numbers ({text[:120]}); "
                "refusing to unpickle it. Re-save only its state dict, e.g. "
                "torch.save({'model': ckpt['model']}, 'clean.pth'), from a source you trust"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({text[:160]}); "
            "the file may be truncated or corrupt — download it again"
        ) from None


def _has_checkpoint_header(path: Path) -> bool:
    """Whether the file begins as ``torch.save`` writes: a zip archive, or a pickle of protocol 2+
    (the legacy format)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True  # let the reader's own error speak
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _names_python_objects(message: str) -> bool:
    """Whether torch's weights-only unpickler refused a pickle for the Python objects it names
    (not for bytes that are no pickle at all, e.g. "Unsupported operand")."""
    return any(k in message for k in ("Unsupported global", "GLOBAL", "Unsupported class", "unrecognized function"))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a safetensors file; a one-line :class:`CheckpointError` if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); it may be truncated") from None


def read_safetensors_metadata(path: str | Path) -> dict:
    """The metadata of a safetensors file (no tensor is read); {} if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file: no metadata
        return {}


def resolve_weights(weights: str | os.PathLike | None, model_only: bool = True) -> Path:
    """The local file for ``--weights``: a name (``glip-t``..., see :mod:`.hub`; None = the
    default) is fetched into the Hugging Face cache on first use, a path is returned as is."""
    from .hub import resolve_weights as resolve

    return resolve(weights, model_only=model_only)


def read_state_dict(path: str | Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The model weights of a checkpoint file (or weights name) with official key names
    (``module.`` stripped, ignorable keys dropped), and its metadata (our safetensors' config, or {}).
    Tensors are memory-mapped from the file."""
    path = resolve_weights(path, model_only=not use_ema)
    if not path.exists():
        raise CheckpointError(
            f"{path}: file not found (pass --weights PATH to an official GLIP .pth or a .safetensors)"
        )
    meta: dict = {}
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
    else:
        loaded = _torch_load(path)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{path}: expected a dict of weights, found {type(loaded).__name__}")
        key = "model_ema" if use_ema else "model"
        if key in loaded and isinstance(loaded[key], dict):
            state = loaded[key]
        elif use_ema:
            raise CheckpointError(f"{path}: no 'model_ema' weights in this file (drop --ema to use 'model')")
        elif all(isinstance(v, torch.Tensor) for v in loaded.values()):
            state = loaded  # a bare state dict
        else:
            raise CheckpointError(f"{path}: no 'model' entry with the weights (keys: {', '.join(list(loaded)[:8])})")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    state = {
        k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES) and not any(p in k for p in _IGNORED_PARTS)
    }
    if not state:
        raise CheckpointError(f"{path}: contains no weights")
    return state, meta


def detect_variant(state: dict[str, torch.Tensor]) -> str:
    """Guess the variant from the keys and shapes of an official state dict."""
    embed = state.get("backbone.body.patch_embed.proj.weight")
    if embed is None:
        raise CheckpointError(
            "the weights have no Swin backbone (backbone.body.patch_embed.proj.weight): not a GLIP checkpoint"
        )
    if embed.shape[0] == 192:
        return "glip-l"
    if embed.shape[0] == 96:
        has_fusion = any(".b_attn." in k for k in state)
        return "glip-t" if has_fusion else "glip-t-a"
    return "test-tiny" if embed.shape[0] == 16 else "unknown"


@dataclass
class KeyReport:
    """How a state dict fits a model."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, model shape, file shape
    adapted: list[str] = field(default_factory=list)  # tolerated differences (the unused cls_logits)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def summary(self, limit: int = 3) -> str:
        parts = []
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {name}: {', '.join(items[:limit])}{more}")
        if self.wrong_shape:
            k, a, b = self.wrong_shape[0]
            more = f" (+{len(self.wrong_shape) - 1} more)" if len(self.wrong_shape) > 1 else ""
            parts.append(f"{len(self.wrong_shape)} wrong shape: {k} model {list(a)} file {list(b)}{more}")
        return "; ".join(parts) if parts else "all keys match"


def compare_state(model: nn.Module, state: dict[str, torch.Tensor]) -> KeyReport:
    own = model.state_dict()
    report = KeyReport()
    report.missing = sorted(k for k in own if k not in state)
    report.unexpected = sorted(k for k in state if k not in own)
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            if k.startswith("rpn.head.cls_logits."):
                # unused by grounding; released files trained with another NUM_CLASSES differ here
                report.adapted.append(k)
            else:
                report.wrong_shape.append((k, tuple(own[k].shape), tuple(v.shape)))
    report.adapted.sort()
    return report


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights", assign: bool = False
) -> KeyReport:
    """Load ``state`` into ``model``; every key must match by name and shape, else a
    :class:`CheckpointError` with a compact report (and a hint when the file is another variant).

    ``assign=True`` makes ``state``'s tensors the model's parameters and buffers instead of
    copying them (cast to the model's dtype where they differ, e.g. a ``--half`` file): for a
    model from :func:`build_empty` whose parameters are still on the meta device."""
    report = compare_state(model, state)
    if not report.ok:
        hint = ""
        try:
            found = detect_variant(state)
            own = getattr(getattr(model, "cfg", None), "variant", None)
            if own and found not in (own, "unknown"):
                hint = (
                    f" — the file looks like {found}, the model is {own}: pass --variant {found} or leave --variant out"
                )
        except CheckpointError:
            pass
        raise CheckpointError(f"{source}: does not fit the model: {report.summary()}{hint}")
    if report.adapted:
        head = model.rpn.head
        w = state["rpn.head.cls_logits.weight"]
        head.cls_logits = nn.Conv2d(w.shape[1], w.shape[0], kernel_size=1)
    if assign:
        own = model.state_dict()
        state = {k: v.to(own[k].dtype) if v.dtype != own[k].dtype else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
    return report


def build_empty(cfg: GLIPConfig) -> nn.Module:
    """The model of ``cfg`` with its parameters on the meta device (no memory, no random
    initialisation: GLIP-T's takes ~10 s) and its buffers built as usual (BERT's position ids are
    not in any file); :func:`load_weights` with ``assign=True`` then gives it the file's tensors."""
    from .model.glip import build_glip

    with _parameters_on_meta():
        return build_glip(cfg)


@contextlib.contextmanager
def _parameters_on_meta():
    """While open, every parameter a module registers is moved to the meta device (its
    initialisation then costs nothing); buffers are built as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def save_state(state: dict[str, torch.Tensor], cfg: GLIPConfig, path: str | Path, metadata: dict | None = None) -> None:
    """Save weights as safetensors (atomically) with the model config in the metadata: the
    format every loader here reads. A language encoder that an installed package supplies
    (``cfg.language.pretrained``) is left out."""
    from safetensors.torch import save_file

    if cfg.language.pretrained:  # the installed encoder package supplies these
        state = {k: v for k, v in state.items() if not k.startswith("language_backbone.")}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": "glip-transfer", "glip_config": json.dumps(to_dict(cfg))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    write_file(path, lambda tmp: save_file(state, tmp, metadata=meta))


def save_model(model: nn.Module, path: str | Path, metadata: dict | None = None, state: dict | None = None) -> None:
    """Save a model's weights (or ``state``) as safetensors (atomically) with its config in the metadata."""
    save_state(state if state is not None else model.state_dict(), model.cfg, path, metadata)


def config_from_metadata(meta: dict) -> GLIPConfig | None:
    if "glip_config" not in meta:
        return None
    return from_dict(GLIPConfig, json.loads(meta["glip_config"]), "glip_config")


def load_model(
    weights: str | Path | None,
    variant: str | None = None,
    use_ema: bool = False,
    tokenizer: str | None = None,
    overrides: list[str] | None = None,
):
    """Build the model of ``variant`` (detected from the file when None) and load ``weights``
    (a file, or a name such as ``glip-t``: see :mod:`.hub`).

    Returns ``(model, report)``; ``model`` is in eval mode on the CPU, its tensors memory-mapped
    from the file (copy-on-write: training never changes the file).
    """
    from .config import override_dataclass

    state, meta = read_state_dict(weights, use_ema=use_ema)
    cfg = config_from_metadata(meta)
    if cfg is None or (variant and variant != cfg.variant):
        found = variant or detect_variant(state)
        if found == "unknown":
            raise CheckpointError(f"{weights}: cannot tell which GLIP variant these weights are; pass --variant")
        cfg = variant_config(found)
    if tokenizer:
        cfg.language.tokenizer = tokenizer
    cfg = override_dataclass(cfg, overrides or [], "model")
    model = build_empty(cfg)
    if cfg.language.pretrained and not any(k.startswith("language_backbone.") for k in state):
        from .text_encoders import packaged_language_state

        state = {**state, **packaged_language_state(cfg.language.pretrained)}
    report = load_weights(model, state, str(weights), assign=True)
    model.eval()
    return model, report


@dataclass
class Converted:
    """What :func:`convert_checkpoint` wrote."""

    path: Path
    variant: str
    tensors: int
    bytes: int
    dtype: str
    base_sha256: str | None


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    half: bool = False,
    use_ema: bool = False,
    variant: str | None = None,
    base_sha256: str | None = None,
) -> Converted:
    """Write the model weights of ``src`` (an official ``.pth``: ``model``, or ``model_ema`` with
    ``use_ema``) to ``dst`` as a model-only safetensors with the config in its metadata (the
    :func:`save_state` format). ``half`` stores the parameters in float16 (half the size; loading
    casts them back, outputs differ slightly); buffers stay as they are. ``base_sha256`` (the
    source file's sha256) is recorded as the weights' identity when they are an exact copy
    (neither ``half`` nor ``use_ema``), so adapters trained on ``src`` apply to ``dst``.
    Refuses weights that do not fit the model. Written atomically."""
    state, meta = read_state_dict(src, use_ema=use_ema)
    cfg = config_from_metadata(meta)
    if variant is not None or cfg is None:
        found = variant or detect_variant(state)
        if found == "unknown":
            raise CheckpointError(f"{src}: cannot tell which GLIP variant these weights are; pass --variant")
        cfg = variant_config(found)
    with torch.device("meta"):
        from .model.glip import build_glip

        shape_model = build_glip(cfg)
    report = compare_state(shape_model, state)
    if not report.ok:
        raise CheckpointError(f"{src}: does not fit {cfg.variant}: {report.summary()}")
    if half:
        params = {k for k, _ in shape_model.named_parameters()}
        state = {k: v.half() if k in params and v.is_floating_point() else v for k, v in state.items()}
    exact = not (half or use_ema)
    metadata = {
        "source": Path(src).name,
        "weights": "model_ema" if use_ema else "model",
        "dtype": "float16" if half else "float32",
    }
    if exact and base_sha256:
        metadata["base_sha256"] = base_sha256
    save_state(state, cfg, dst, metadata)
    return Converted(
        Path(dst), cfg.variant, len(state), Path(dst).stat().st_size, metadata["dtype"], metadata.get("base_sha256")
    )


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


def weights_sha256(weights: str | os.PathLike) -> str:
    """The identity of the weights a file (or name) holds: the ``base_sha256`` a model-only copy
    records (the sha256 of the official file it came from), else the sha256 a Hugging Face cache
    file is named by, else the file's own sha256. Equal for an official ``.pth`` and its
    conversion, so an adapter trained on one applies to the other."""
    from .hub import cached_blob_sha256

    path = resolve_weights(weights)
    if path.suffix == ".safetensors":
        declared = read_safetensors_metadata(path).get("base_sha256")
        if declared:
            return declared
    return cached_blob_sha256(path) or file_sha256(path)
