"""The tokenizer loader: folders, vocab files, one-line errors; the default tokenizer's choice."""

from __future__ import annotations

import pytest

from glip_transfer.prompts import PromptError
from glip_transfer.tokenizer import DEFAULT_TOKENIZER, default_tokenizer, load_tokenizer


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_load_tokenizer_from_folder_and_vocab_file(tokenizer, vocab_dir):
    assert tokenizer.is_fast and len(tokenizer) == 30522
    assert load_tokenizer(str(vocab_dir / "vocab.txt"))("person").input_ids == [101, 2711, 102]


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(PromptError) as e:
        load_tokenizer(str(tmp_path / "missing"))
    assert "--tokenizer DIR" in one_line(e) and "missing" in str(e.value)
    with pytest.raises(PromptError) as e:
        load_tokenizer(str(tmp_path))
    assert "no vocab.txt" in one_line(e)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PromptError):
        load_tokenizer(str(tmp_path / "notes.txt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptError) as e:
        load_tokenizer("glip-transfer-test/no-such-tokenizer")
    assert "glip-transfer-test/no-such-tokenizer" in one_line(e) and "--tokenizer DIR" in str(e.value)


def test_default_tokenizer_order(monkeypatch):
    monkeypatch.delenv("GLIP_TOKENIZER", raising=False)
    assert default_tokenizer() == DEFAULT_TOKENIZER
    assert default_tokenizer(None, "model-own") == "model-own"
    monkeypatch.setenv("GLIP_TOKENIZER", "/env/vocab")
    assert default_tokenizer(None, "model-own") == "/env/vocab"
    assert default_tokenizer("/given", "model-own") == "/given"
