"""Loading the official GLIP checkpoints (``.pth``) and saving / loading our own (safetensors).

Official files are plain dicts of tensors and numbers, so they are read with
``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused with an
explanation instead of being executed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import GLIPConfig, from_dict, to_dict, variant_config


class CheckpointError(ValueError):
    """The weights file is missing, unreadable, or does not fit the model; the message says why."""


# keys the official files may carry that the model does not have, and that are safe to drop
_IGNORED_SUFFIXES = ("embeddings.position_ids",)
_IGNORED_PARTS = (".pooler.",)


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file in the same folder, flush it to disk, then rename
    it over ``path``: readers never see a half-written file, and a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


atomic_write = _atomic_write


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError(
                f"{path}: the file holds Python objects beyond tensors and numbers ({text[:120]}); "
                "refusing to unpickle it. Re-save only its state dict, e.g. "
                "torch.save({'model': ckpt['model']}, 'clean.pth'), from a source you trust"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({text[:160]}); the file may be truncated or corrupt — download it again"
        ) from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a safetensors file; a one-line :class:`CheckpointError` if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); it may be truncated") from None


NANO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "glip-nano.safetensors"


def resolve_weights(weights: str | Path) -> Path:
    """The file of ``--weights``: a path, or ``glip-nano`` (the weights shipped in the package)."""
    return NANO_WEIGHTS if str(weights) == "glip-nano" else Path(weights)


def read_state_dict(path: str | Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The model weights of a checkpoint file with official key names (``module.`` stripped,
    ignorable keys dropped), and its metadata (our safetensors' config, or {})."""
    path = resolve_weights(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found (pass --weights PATH to an official GLIP .pth or a .safetensors)")
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
        k: v
        for k, v in state.items()
        if not k.endswith(_IGNORED_SUFFIXES) and not any(p in k for p in _IGNORED_PARTS)
    }
    if not state:
        raise CheckpointError(f"{path}: contains no weights")
    return state, meta


def detect_variant(state: dict[str, torch.Tensor]) -> str:
    """Guess the variant from the keys and shapes of an official state dict."""
    embed = state.get("backbone.body.patch_embed.proj.weight")
    if embed is None:
        raise CheckpointError("the weights have no Swin backbone (backbone.body.patch_embed.proj.weight): not a GLIP checkpoint")
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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> KeyReport:
    """Load ``state`` into ``model``; every key must match by name and shape, else a
    :class:`CheckpointError` with a compact report (and a hint when the file is another variant)."""
    report = compare_state(model, state)
    if not report.ok:
        hint = ""
        try:
            found = detect_variant(state)
            own = getattr(getattr(model, "cfg", None), "variant", None)
            if own and found not in (own, "unknown"):
                hint = f" — the file looks like {found}, the model is {own}: pass --variant {found} or leave --variant out"
        except CheckpointError:
            pass
        raise CheckpointError(f"{source}: does not fit the model: {report.summary()}{hint}")
    if report.adapted:
        head = model.rpn.head
        w = state["rpn.head.cls_logits.weight"]
        head.cls_logits = nn.Conv2d(w.shape[1], w.shape[0], kernel_size=1)
    model.load_state_dict(state, strict=True)
    return report


def save_model(model: nn.Module, path: str | Path, metadata: dict | None = None, state: dict | None = None) -> None:
    """Save weights as safetensors (atomically) with the model config in the metadata; a language
    encoder that an installed package supplies (``cfg.language.pretrained``) is left out."""
    from safetensors.torch import save_file

    state = state if state is not None else model.state_dict()
    if model.cfg.language.pretrained:  # the installed encoder package supplies these
        state = {k: v for k, v in state.items() if not k.startswith("language_backbone.")}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": "glip-transfer", "glip_config": json.dumps(to_dict(model.cfg))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    _atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


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
    """Build the model of ``variant`` (detected from the file when None) and load ``weights``.

    Returns ``(model, report)``; ``model`` is in eval mode on the CPU.
    """
    from .config import override_dataclass
    from .model.glip import build_glip

    state, meta = read_state_dict(weights, use_ema=use_ema)
    cfg = config_from_metadata(meta)
    if cfg is None or (variant and variant != cfg.variant):
        found = variant or detect_variant(state)
        if found == "unknown":
            raise CheckpointError(f"{weights}: cannot tell which GLIP variant these weights are; pass --variant")
        cfg = variant_config(found)
    if tokenizer:
        cfg.language.tokenizer = tokenizer
    cfg = override_dataclass(cfg, overrides or [])
    model = build_glip(cfg)
    if cfg.language.pretrained and not any(k.startswith("language_backbone.") for k in state):
        from .text_encoders import packaged_language_state

        state = {**state, **packaged_language_state(cfg.language.pretrained)}
    report = load_weights(model, state, str(weights))
    model.eval()
    return model, report
