"""What produced a result: the ``provenance`` record that ``metrics.json`` and ``report.md``
(``glip zeroshot eval``), ``result.json`` and ``config.json`` (``glip finetune`` / ``pretrain``)
carry, so that any number can be reproduced from its file alone.

A record holds the command line, the date, the versions (glip_transfer, torch, transformers,
Python), the device, the weights (as given, the file, its sha256: the same for an official
``.pth`` and its converted copy), the adapter (file and sha256), the variant, every ``--set``
override, the recipe, split and annotation file (with its sha256), the caption(s) and a hash of
their token ids, the effective evaluation settings (sizes, thresholds, detections per image,
batch size, precision), the effective model config and, for training, the training settings.

The same record guards resuming (one concept, not two): :func:`identity` keeps the part of a
record that decides the outputs, and :func:`changes` lists what differs between two of them.
``glip zeroshot eval --resume`` refuses partial results whose :data:`DETECTION` identity
differs; ``glip finetune --resume`` applies the few settings in
:data:`glip_transfer.training.config.APPLIED_ON_RESUME` and refuses any other difference of its
:data:`TRAINING` identity.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

RECORD_FORMAT = 1

DETECTION: tuple[str, ...] = (
    "weights.sha256",
    "adapter.sha256",
    "variant",
    "captions",
    "tokens_sha256",
    "split",
    "annotations.sha256",
    "evaluation",
    "model",
)
"""What decides the detections of ``glip zeroshot eval`` (prefixes of flattened keys)."""

TRAINING: tuple[str, ...] = (
    "weights.sha256",
    "variant",
    "mode",
    "captions",
    "tokens_sha256",
    "data",
    "evaluation",
    "model",
    "train",
)
"""What decides a training run's weights and its model selection (prefixes of flattened keys)."""

NOT_DECIDING: tuple[str, ...] = (
    "evaluation.batch_size",  # results do not depend on the batch size (images batched by padded size)
    "evaluation.amp",  # what decides is evaluation.precision (AMP is a no-op on a CPU)
    "model.language.tokenizer",  # where the vocabulary came from; tokens_sha256 says what it made
)
"""Keys inside the prefixes above that change nothing in the outputs."""


# --------------------------------------------------------------------------- parts of a record


def versions() -> dict[str, str]:
    """Versions of what computed the numbers."""
    out = {"python": platform.python_version()}
    for name, module in (("glip_transfer", "glip_transfer"), ("torch", "torch"), ("transformers", "transformers")):
        imported = sys.modules.get(module)
        version = getattr(imported, "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as dist_version

                version = dist_version(module.replace("_", "-"))
            except Exception:  # noqa: BLE001 - not installed: say so
                version = "not installed"
        out[name] = str(version)
    return out


def now() -> str:
    """The current time, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_line() -> list[str]:
    """The command as typed (``glip`` and its arguments)."""
    return ["glip", *sys.argv[1:]]


def file_record(path: str | os.PathLike) -> dict[str, str]:
    """``{"path", "sha256"}`` of a file (the sha256 is computed once per process)."""
    from .checkpoint import file_sha256

    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def weights_record(weights: str | os.PathLike | None, model=None) -> dict[str, Any]:
    """``{"given", "path", "sha256"}``: the ``--weights`` as given (a name or a file), the file it
    resolved to, and the weights' identity (:func:`glip_transfer.training.artifacts.base_hash`:
    equal for an official ``.pth`` and its model-only copy; ``state:...`` for random weights)."""
    from .training.artifacts import base_hash

    if weights is None:
        return {"given": None, "path": None, "sha256": base_hash(None, model)}
    from .checkpoint import resolve_weights

    return {"given": str(weights), "path": str(resolve_weights(weights).resolve()), "sha256": base_hash(weights)}


def adapter_record(adapter: str | os.PathLike | None) -> dict[str, Any] | None:
    """``{"path", "kind", "sha256"}`` of an adapter (the sha256 of its tensor file), or None."""
    if adapter is None:
        return None
    from .checkpoint import file_sha256
    from .training.artifacts import LORA_WEIGHTS, read_artifact

    _, _, found, kind = read_artifact(adapter)
    file = found / LORA_WEIGHTS if found.is_dir() else found
    return {"path": str(Path(found).resolve()), "kind": kind.value, "sha256": file_sha256(file)}


def tokens_sha256(input_ids: Iterable) -> str:
    """sha256 of the prompt's token ids (each chunk's ``[1, T]`` tensor, padding dropped)."""
    h = hashlib.sha256()
    for ids in input_ids:
        values = [int(v) for v in ids.reshape(-1).tolist()]
        while values and values[-1] == 0:
            values.pop()
        h.update(repr(values).encode())
    return h.hexdigest()


def effective_evaluation(evaluation, model_cfg, *, batch_size: int, precision: str) -> dict[str, Any]:
    """The evaluation settings in force: the :class:`~glip_transfer.recipes.EvaluationConfig`
    (split, metric, chunking, AMP) with the sizes and thresholds the model actually runs with (its
    config after the recipe's and ``--set model.*`` overrides), the batch size and the precision."""
    post, inp = model_cfg.postprocess, model_cfg.input
    return {
        "split": evaluation.split,
        "metric": evaluation.metric,
        "chunk_size": evaluation.chunk_size,
        "min_size": inp.min_size,
        "max_size": inp.max_size,
        "detections_per_img": post.detections_per_img,
        "pre_nms_thresh": post.pre_nms_thresh,
        "pre_nms_top_n": post.pre_nms_top_n,
        "nms_thresh": post.nms_thresh,
        "min_box_size": post.min_size,
        "score_agg": post.score_agg,
        "batch_size": batch_size,
        "amp": evaluation.amp,
        "precision": precision,
    }


def record(**parts: Any) -> dict[str, Any]:
    """A provenance record: the command, date, versions and ``parts`` (weights, adapter, variant,
    overrides, recipe, captions, evaluation, model, train, device ...)."""
    return {"format": RECORD_FORMAT, "command": command_line(), "date": now(), "versions": versions(), **parts}


def evaluation_record(
    *,
    weights,
    model,
    adapter,
    recipe,
    split: str,
    ann_file,
    img_dir,
    encoded,
    evaluation,
    batch_size: int,
    device,
    overrides: Iterable[str],
) -> dict[str, Any]:
    """The record of an evaluation (``glip zeroshot eval``): ``model`` loaded from ``weights``
    with ``adapter`` applied, prompted with ``encoded`` (an :class:`~glip_transfer.inference.EncodedPrompt`)
    on ``split`` of ``recipe`` under the :class:`~glip_transfer.recipes.EvaluationConfig` ``evaluation``."""
    from .config import to_dict
    from .runtime import precision_name

    return record(
        kind="evaluation",
        device=str(device),
        weights=weights_record(weights, model),
        adapter=adapter_record(adapter),
        variant=model.cfg.variant,
        overrides=list(overrides),
        recipe=recipe.name,
        split=split,
        annotations=file_record(ann_file),
        images=str(Path(img_dir).resolve()),
        captions=list(encoded.captions),
        tokens_sha256=tokens_sha256(encoded.input_ids),
        evaluation=effective_evaluation(
            evaluation, model.cfg, batch_size=batch_size, precision=precision_name(device, evaluation.amp)
        ),
        model=to_dict(model.cfg),
    )


# --------------------------------------------------------------------------- identity and changes


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            nested = flatten(value, name + ".")
            out.update(nested if nested else {name: {}})
        else:
            out[name] = value
    return out


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def identity(rec: Mapping[str, Any], keys: Iterable[str] = DETECTION) -> dict[str, Any]:
    """The flattened part of a record under ``keys`` (prefixes) that decides the outputs."""
    keys = tuple(keys)
    return {k: v for k, v in flatten(rec).items() if _under(k, keys) and not _under(k, NOT_DECIDING)}


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` of two identities (a key missing on one side counts as None; lists
    and tuples compare as lists)."""

    def norm(v: Any) -> Any:
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    out = {}
    for key in sorted(set(old) | set(new)):
        a, b = norm(old.get(key)), norm(new.get(key))
        if a != b:
            out[key] = (old.get(key), new.get(key))
    return out


def describe(diff: Mapping[str, tuple[Any, Any]], limit: int = 3) -> str:
    """``key old → new`` for the first ``limit`` changes, in one line."""
    shown = [f"{key} {_show(a)} → {_show(b)}" for key, (a, b) in list(diff.items())[:limit]]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(shown) + more


def markdown(rec: Mapping[str, Any]) -> str:
    """The record as a Markdown section (for ``report.md``): the command, then every value."""
    lines = ["## Provenance", ""]
    command = rec.get("command")
    if command:
        lines += ["```", " ".join(_quote(a) for a in command), "```", ""]
    lines += ["| key | value |", "| --- | --- |"]
    for key, value in flatten({k: v for k, v in rec.items() if k != "command"}).items():
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        lines.append(f"| {key} | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))
