"""Weights by name (``glip_transfer.hub``) and the fast loader, end to end through the real ``glip``.

The hub is a local HTTP server (``hub_server.FakeHub``) serving a small checkpoint in the
official layout (test-tiny weights under ``model`` and ``model_ema``, an optimizer-state payload,
``iteration``) under the official file name; each download test runs ``glip`` in a fresh process
with ``HF_ENDPOINT`` pointed at it and ``HF_HOME`` in a temporary folder, as a user would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from glip_transfer.checkpoint import (
    CheckpointError,
    load_model,
    read_safetensors_metadata,
    resolve_weights,
    save_model,
    weights_sha256,
)
from glip_transfer.cli import app
from glip_transfer.config import variant_config
from glip_transfer.hub import WEIGHTS, converted_name, model_only_copy, weights_names
from glip_transfer.model.glip import build_glip
from hub_server import FakeHub, hub_env, hub_in_process

GLIP_T = "glip_tiny_model_o365_goldg.pth"
runner = CliRunner()


def glip_command() -> list[str]:
    exe = shutil.which("glip", path=os.path.dirname(sys.executable)) or shutil.which("glip")
    return [exe] if exe else [sys.executable, "-m", "glip_transfer"]


def glip(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(glip_command() + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)


def one_line_error(result) -> str:
    """The error line of a failed run: exit code 2, one line, no stack trace."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_glip(variant_config("test-tiny"))
    with torch.no_grad():
        model.rpn.head.bias0.fill_(2.0)  # every location scores: non-empty detections
    return model.eval()


def official_bytes(model) -> bytes:
    """A checkpoint in the official layout: ``module.``-prefixed ``model`` and ``model_ema``,
    optimizer state (> 10 MB, so a cut download has a first chunk to resume after), scheduler,
    iteration, BERT's stale ``position_ids``."""
    state = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    state["module.language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    g = torch.Generator().manual_seed(1)
    optimizer = {"state": {0: {"exp_avg": torch.randn(2_500_000, generator=g), "step": torch.tensor(1234.0)}},
                 "param_groups": [{"lr": 1e-4, "params": [0]}]}  # fmt: skip
    buf = io.BytesIO()
    torch.save({"model": state, "model_ema": ema, "optimizer": optimizer, "scheduler": {"last_epoch": 3}, "iteration": 1234}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def official(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("official") / GLIP_T
    path.write_bytes(official_bytes(tiny_model))
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "rgb.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path)
    return path


def predict_args(weights, image, vocab_dir, out_json) -> list:
    return ["predict", image, "--weights", weights, "--variant", "test-tiny", "--classes", "cat,dog", "--threshold", "0",
            "--tokenizer", vocab_dir, "--device", "cpu", "--min-size", "128", "--max-size", "200", "--json", out_json]  # fmt: skip


def blobs(hf_home: Path) -> list[Path]:
    folder = hf_home / "hub" / "models--GLIPModel--GLIP" / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


# --------------------------------------------------------------------------- through a fake hub, real processes


def test_glip_t_downloads_once_then_runs_from_the_cache(official, image, vocab_dir, tmp_path):
    """``HF_ENDPOINT`` / ``HF_HOME`` as a user sets them; the second run has no server."""
    hf_home = tmp_path / "hf"
    data = official.read_bytes()
    with FakeHub() as hub:
        hub.add(GLIP_T, data)
        env = hub_env(hf_home, hub.url)
        first = glip(env, *predict_args("glip-t", image, vocab_dir, tmp_path / "a.json"))
        assert first.returncode == 0, first.stderr
        assert hub.gets(GLIP_T) == [None]
    # the first load wrote the model-only copy next to the cached file
    snapshot = next((hf_home / "hub" / "models--GLIPModel--GLIP" / "snapshots").iterdir())
    copy = snapshot / converted_name(GLIP_T)
    assert (snapshot / GLIP_T).is_symlink() and copy.is_file()
    assert copy.stat().st_size < len(data) / 2
    meta = read_safetensors_metadata(copy)
    assert meta["base_sha256"] == hashlib.sha256(data).hexdigest() and meta["weights"] == "model"
    # server gone: the cache answers, nothing is asked
    second = glip(env, *predict_args("glip-t", image, vocab_dir, tmp_path / "b.json"))
    assert second.returncode == 0, second.stderr
    # the same detections from the .pth itself (a local path), in process
    third = runner.invoke(app, [str(a) for a in predict_args(official, image, vocab_dir, tmp_path / "c.json")])
    assert third.exit_code == 0, third.output
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text())[0]["detections"] for n in "abc")
    assert a and a == b == c


def test_offline_with_an_empty_cache_is_one_line(tmp_path):
    env = hub_env(tmp_path / "hf", "http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    line = one_line_error(glip(env, "inspect", "glip-t"))
    assert GLIP_T in line and "HF_HUB_OFFLINE" in line and "--weights PATH" in line
    assert f"http://127.0.0.1:9/GLIPModel/GLIP/resolve/main/{GLIP_T}" in line


# --------------------------------------------------------------------------- through a fake hub, in process


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as fake, hub_in_process(monkeypatch, fake.url, tmp_path / "hf"):
        yield fake


def cli_error(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return " ".join(result.output.split())  # the line, unwrapped


def test_weights_list_shows_what_is_cached(hub, official, tmp_path):
    hub.add(GLIP_T, official.read_bytes())
    before = {row["name"]: row for row in json.loads(runner.invoke(app, ["weights", "list", "--json"]).stdout)}
    assert not before["glip-t"]["cached"] and before["glip-t"]["path"] is None
    path = resolve_weights("glip-t")
    listed = {row["name"]: row for row in json.loads(runner.invoke(app, ["weights", "list", "--json"]).stdout)}
    assert listed["glip-t"]["cached"] and listed["glip-t"]["path"] == str(path) and path.name == converted_name(GLIP_T)
    assert listed["glip-l"] == {"name": "glip-l", "file": "glip_large_model.pth", "variant": "glip-l",
                                "bytes": 6_896_153_761, "cached": False, "path": None}  # fmt: skip
    assert resolve_weights("glip-t", model_only=False).name == GLIP_T and hub.gets(GLIP_T) == [None]
    table = runner.invoke(app, ["weights", "list"])
    assert table.exit_code == 0 and "glip-t (default)" in table.output


def test_a_cut_download_resumes_with_a_range_request(hub, official, tmp_path):
    data = official.read_bytes()
    assert len(data) > 12 << 20
    hub.add(GLIP_T, data, cut_once_at=len(data) - (1 << 20))
    result = runner.invoke(app, ["inspect", "glip-t", "--variant", "test-tiny", "--json"])
    assert result.exit_code == 0, result.output
    ranges = hub.gets(GLIP_T)
    assert ranges[0] is None and len(ranges) == 2 and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0  # resumed, not restarted
    info = json.loads(result.stdout)
    assert info["detected_variant"] == "test-tiny" and info["keys"]["ok"]
    assert info["path"].endswith(converted_name(GLIP_T))
    [blob] = blobs(tmp_path / "hf")
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("fault,message", [({"etag": hashlib.sha256(b"other").hexdigest()}, "sha256"),
                                           ({"short_by": 1000}, "size does not match")])  # fmt: skip
def test_a_download_that_does_not_match_is_refused_and_removed(hub, official, tmp_path, fault, message):
    hub.add(GLIP_T, official.read_bytes(), **fault)
    line = cli_error("inspect", "glip-t")
    assert message in line and "refused" in line and GLIP_T in line and "removed" in line
    assert blobs(tmp_path / "hf") == []  # neither the file nor a partial one is left
    snapshots = tmp_path / "hf" / "hub" / "models--GLIPModel--GLIP" / "snapshots"
    assert not [p for p in snapshots.rglob("*") if p.is_file() or p.is_symlink()] if snapshots.exists() else True


def test_an_unwritable_cache_names_the_folder(official, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with FakeHub() as fake, hub_in_process(monkeypatch, fake.url, blocker / "hf"):
        fake.add(GLIP_T, official.read_bytes())
        line = cli_error("inspect", "glip-t")
    assert "cannot write" in line and str(blocker) in line and "HF_HOME" in line


def test_unreachable_or_missing_on_the_hub(monkeypatch, tmp_path, image, vocab_dir):
    with FakeHub() as fake, hub_in_process(monkeypatch, fake.url, tmp_path / "hf"):  # serves nothing
        line = cli_error("inspect", "glip-l")
    assert "glip_large_model.pth" in line and "404" in line
    with hub_in_process(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf"):  # nothing listens on port 9
        line = cli_error(*predict_args("glip-t", image, vocab_dir, tmp_path / "d.json"))
    assert "unreachable" in line and GLIP_T in line and "--weights PATH" in line
    assert f"http://127.0.0.1:9/GLIPModel/GLIP/resolve/main/{GLIP_T}" in line
    assert not (tmp_path / "d.json").exists()


# --------------------------------------------------------------------------- names and paths, in process


def test_unknown_name_lists_the_names(image, vocab_dir, tmp_path):
    result = runner.invoke(app, [str(a) for a in predict_args("glip-x", image, vocab_dir, tmp_path / "d.json")])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "glip-x" in line and ", ".join(weights_names()) in line
    with pytest.raises(CheckpointError, match="glip-t downloads"):
        resolve_weights("somewhere/" + GLIP_T)  # a missing official file name: the name that fetches it


def test_registry_entries():
    assert weights_names()[0] == "glip-t" and len(set(weights_names())) == len(WEIGHTS)
    by_name = {w.name: w for w in WEIGHTS}
    assert by_name["glip-t"].file == GLIP_T and by_name["glip-t-cc"].file == "glip_tiny_model_o365_goldg_cc_sbu.pth"
    assert by_name["glip-nano"].packaged and by_name["glip-nano"].repo is None
    assert all(w.repo == "GLIPModel/GLIP" for w in WEIGHTS if not w.packaged)


def test_packaged_glip_nano_is_never_downloaded():
    from glip_transfer.hub import PACKAGED_DIR

    if (PACKAGED_DIR / "glip-nano.safetensors").is_file():
        assert resolve_weights("glip-nano") == PACKAGED_DIR / "glip-nano.safetensors"
    else:
        with pytest.raises(CheckpointError, match="not in this installation"):
            resolve_weights("glip-nano")


def test_model_only_copy_is_exact_and_keeps_the_identity(official, tiny_model, tmp_path):
    raw = tmp_path / GLIP_T
    shutil.copy(official, raw)
    copy = model_only_copy(raw)
    assert copy == tmp_path / converted_name(GLIP_T)
    assert weights_sha256(copy) == weights_sha256(raw) == hashlib.sha256(raw.read_bytes()).hexdigest()
    a, _ = load_model(raw)
    b, _ = load_model(copy)
    for (k, v), (k2, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and v.dtype == w.dtype and torch.equal(v, w), k
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    assert not any(t.is_meta for t in [*a.parameters(), *a.buffers()])
    assert model_only_copy(raw) == copy  # written once


def test_model_only_copy_in_a_read_only_folder_warns_and_uses_the_pth(official, tmp_path, monkeypatch):
    import tempfile

    raw = tmp_path / GLIP_T
    shutil.copy(official, raw)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.warns(UserWarning, match="cannot write .*loading glip_tiny_model_o365_goldg.pth itself"):
        assert model_only_copy(raw) == raw
    assert not (tmp_path / converted_name(GLIP_T)).exists()


def test_loaded_parameters_are_copy_on_write(official, tmp_path):
    """The memory-mapped tensors become the parameters; training them never touches the file."""
    raw = tmp_path / GLIP_T
    shutil.copy(official, raw)
    before = raw.read_bytes()
    model, _ = load_model(raw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert raw.read_bytes() == before
    assert isinstance(next(model.parameters()), torch.nn.Parameter) and next(model.parameters()).requires_grad


# --------------------------------------------------------------------------- glip weights convert


def convert(*args):
    return runner.invoke(app, ["weights", "convert", *[str(a) for a in args]])


def test_convert_writes_a_model_only_file_every_command_reads(official, tiny_model, image, vocab_dir, tmp_path):
    out = tmp_path / "t.safetensors"
    result = convert(official, out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size < official.stat().st_size / 2
    meta = read_safetensors_metadata(out)
    assert meta["format"] == "glip-transfer" and json.loads(meta["glip_config"])["variant"] == "test-tiny"
    assert meta["base_sha256"] == hashlib.sha256(official.read_bytes()).hexdigest()
    # identical inspect and predict outputs from the .pth and the converted file
    inspected = [json.loads(runner.invoke(app, ["inspect", str(w), "--json"]).stdout) for w in (official, out)]
    for info in inspected:
        info.pop("path"), info.pop("format")
    assert inspected[0] == inspected[1]
    outs = []
    for i, w in enumerate((official, out)):
        r = runner.invoke(app, [str(a) for a in predict_args(w, image, vocab_dir, tmp_path / f"{i}.json")])
        assert r.exit_code == 0, r.output
        outs.append(json.loads((tmp_path / f"{i}.json").read_text())[0]["detections"])
    assert outs[0] and outs[0] == outs[1]
    # nothing overwritten without --force
    again = convert(official, out)
    assert again.exit_code == 2 and "--force" in again.output
    assert convert(official, out, "--force").exit_code == 0


def test_convert_half_and_ema(official, tiny_model, tmp_path):
    full, half, ema = tmp_path / "f.safetensors", tmp_path / "h.safetensors", tmp_path / "e.safetensors"
    for out, extra in ((full, []), (half, ["--half"]), (ema, ["--ema"])):
        assert convert(official, out, *extra).exit_code == 0
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert "base_sha256" not in read_safetensors_metadata(half) and "base_sha256" not in read_safetensors_metadata(ema)
    model_half, _ = load_model(half)
    model_ema, _ = load_model(ema)
    key = "backbone.body.patch_embed.proj.weight"
    reference = tiny_model.state_dict()[key]
    assert model_half.state_dict()[key].dtype == torch.float32
    assert torch.allclose(model_half.state_dict()[key], reference, atol=1e-3)
    assert torch.allclose(model_ema.state_dict()[key], reference + 0.01)
    anchors = "rpn.anchor_generator.cell_anchors.0"
    assert torch.equal(model_half.state_dict()[anchors], tiny_model.state_dict()[anchors])  # buffers stay float32


def test_convert_refuses_what_is_not_glip(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, bad)
    result = convert(bad, tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "not a GLIP checkpoint" in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_safetensors_written_by_save_model_still_load(tiny_model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path)
    model, report = load_model(path)
    assert report.ok and model.cfg.variant == "test-tiny"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_model.state_dict().items())
