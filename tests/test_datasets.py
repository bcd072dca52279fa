"""Datasets by name (``glip_transfer.datasets``, ``glip data``): which zip a recipe needs, safe and
atomic extraction, and ``glip data download`` end to end against a local fake hub."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from glip_transfer.checkpoint import save_model
from glip_transfer.cli import app
from glip_transfer.config import variant_config
from glip_transfer.datasets import (
    ODINW_DATASETS,
    DatasetError,
    default_data_root,
    download_hint,
    extract_dataset,
    plan_downloads,
    recipe_dataset,
    recipe_files,
    unsafe_member,
)
from glip_transfer.model.glip import build_glip
from glip_transfer.recipes import RecipeError, list_recipes, load_recipe
from hub_server import FakeHub, hub_env, hub_in_process, odinw_zip

RABBITS = "odinw35/cottontailrabbits"  # files under odinw/CottontailRabbits/{train,valid,test}
ZIP = "odinw_35/CottontailRabbits.zip"
runner = CliRunner()


def zip_of(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def corrupt(data: bytes, member: str) -> bytes:
    """The zip with a byte of ``member``'s compressed data flipped (its CRC no longer matches)."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(member)
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"), int.from_bytes(
        data[info.header_offset + 28 : info.header_offset + 30], "little"
    )
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def looks_complete(parent: Path, name: str) -> bool:
    return (parent / name).exists()


# --------------------------------------------------------------------------- recipes -> zips


def test_every_odinw_recipe_names_one_official_zip():
    recipes = [r for r in list_recipes() if r.name.startswith(("odinw13/", "odinw35/"))]
    assert len(recipes) == 49
    for r in recipes:
        assert recipe_dataset(r) in ODINW_DATASETS, r.name
    assert recipe_dataset(load_recipe("coco")) is None
    assert recipe_dataset(load_recipe("odinw35/aquarium")) == "Aquarium"
    plans = plan_downloads("odinw35")
    assert len(plans) == 32 and len({p.name for p in plans}) == 32  # 36 configs share 32 zips
    [plantdoc] = [p for p in plans if p.name == "plantdoc"]
    assert len(plantdoc.recipes) == 2  # 100x100 and 416x416 come from one zip
    assert len(plan_downloads("odinw13")) == 13
    with pytest.raises(RecipeError, match="not an ODinW dataset of the hub"):
        plan_downloads("coco")


def test_default_data_root(monkeypatch):
    monkeypatch.delenv("GLIP_DATA", raising=False)
    assert default_data_root() == Path("DATASET")
    monkeypatch.setenv("GLIP_DATA", "/data/glip")
    assert default_data_root() == Path("/data/glip")
    rec = load_recipe(RABBITS)
    assert download_hint(rec, "/data/glip") == "; fetch it with: glip data download odinw35/cottontailrabbits"
    assert download_hint(rec, "other") == "; fetch it with: glip data download odinw35/cottontailrabbits --data-root other"
    assert download_hint(load_recipe("coco"), "other") == ""


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "members,symlinks,why",
    [
        ({"Rabbits/../../evil.txt": b"x"}, None, "'..'"),
        ({"/etc/evil.txt": b"x"}, None, "absolute"),
        ({"C:/evil.txt": b"x"}, None, "absolute"),
        ({"Rabbits/ok.txt": b"x"}, {"Rabbits/link": "/etc/passwd"}, "symbolic link"),
    ],
)
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, members, symlinks, why):
    path = tmp_path / "a.zip"
    path.write_bytes(zip_of(members, symlinks))
    parent = tmp_path / "odinw"
    parent.mkdir()
    with pytest.raises(DatasetError, match=why):
        extract_dataset(path, parent, "Rabbits", [])
    assert list(parent.iterdir()) == [] and not (tmp_path / "evil.txt").exists()
    assert all(unsafe_member(i) is None for i in zipfile.ZipFile(io.BytesIO(zip_of({"a/b c/d.json": b"{}"}))).infolist())


def test_corrupt_or_incomplete_archives_leave_nothing_that_looks_complete(tmp_path):
    parent = tmp_path / "odinw"
    parent.mkdir()
    good = zip_of({"Rabbits/train/a.json": b"{}" * 2000, "Rabbits/train/x.jpg": bytes(range(256)) * 50})
    bad = tmp_path / "bad.zip"
    bad.write_bytes(corrupt(good, "Rabbits/train/x.jpg"))
    with pytest.raises(DatasetError, match="corrupt member"):
        extract_dataset(bad, parent, "Rabbits", ["Rabbits/train/a.json"])
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="not a readable zip"):
        extract_dataset(bad, parent, "Rabbits", [])
    bad.write_bytes(good)
    with pytest.raises(DatasetError, match="lacks Rabbits/valid/a.json"):
        extract_dataset(bad, parent, "Rabbits", ["Rabbits/train/a.json", "Rabbits/valid/a.json"])
    with pytest.raises(DatasetError, match="holds no Other/ folder"):
        extract_dataset(bad, parent, "Other", [])
    assert list(parent.iterdir()) == []  # no folder, no temporary leftovers
    dest = extract_dataset(bad, parent, "Rabbits", ["Rabbits/train/a.json"])
    assert dest == parent / "Rabbits" and (dest / "train" / "x.jpg").read_bytes() == bytes(range(256)) * 50
    # a re-extraction replaces the folder (what --force asks for)
    (dest / "stale.txt").write_text("old")
    extract_dataset(bad, parent, "Rabbits", [])
    assert not (dest / "stale.txt").exists() and [p.name for p in parent.iterdir()] == ["Rabbits"]


# --------------------------------------------------------------------------- glip data download


@pytest.fixture(scope="module")
def rabbits_zip() -> bytes:
    return odinw_zip(load_recipe(RABBITS), "CottontailRabbits")


def test_download_extract_skip_and_evaluate(rabbits_zip, tmp_path, vocab_dir):
    """``glip data download`` in a real process (``HF_ENDPOINT`` / ``HF_HOME``), then the recipe runs."""
    from test_hub import glip

    root = tmp_path / "DATASET"
    with FakeHub() as hub:
        hub.add(ZIP, rabbits_zip)
        env = hub_env(tmp_path / "hf", hub.url)
        result = glip(env, "data", "download", RABBITS, "--data-root", root)
        assert result.returncode == 0, result.stderr
        assert hub.gets(ZIP) == [None]
        rec = load_recipe(RABBITS)
        assert all((root / p).exists() for p in recipe_files(rec))
        assert sorted(p.name for p in (root / "odinw").iterdir()) == ["CottontailRabbits"]  # zip and temporaries gone
        again = glip({**env, "GLIP_DATA": str(root)}, "data", "download", "odinw13/cottontailrabbits")
        assert again.returncode == 0 and "present (skipped)" in again.stdout, again.stdout + again.stderr
        assert hub.gets(ZIP) == [None]  # nothing fetched the second time
    listed = {r["recipe"]: r for r in json.loads(runner.invoke(app, ["data", "list", "--json", "--data-root", str(root)]).stdout)}
    assert listed["odinw35/CottontailRabbits"]["present"] and listed["odinw13/CottontailRabbits"]["present"]
    assert not listed["odinw35/Aquarium_Aquarium_Combined.v2-raw-1024.coco"]["present"]
    assert listed["odinw35/Aquarium_Aquarium_Combined.v2-raw-1024.coco"]["download"].startswith("glip data download odinw35/aquarium")
    # the extracted layout is what the recipe reads: a zero-shot evaluation runs on it
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_model(build_glip(variant_config("test-tiny")), weights)
    ev = runner.invoke(app, ["zeroshot", "eval", "--recipe", RABBITS, "--data-root", str(root), "--weights", str(weights),
                             "--tokenizer", str(vocab_dir), "--device", "cpu", "--set", "evaluation.min_size=64",
                             "--set", "evaluation.max_size=96", "--out", str(tmp_path / "run")])  # fmt: skip
    assert ev.exit_code == 0, ev.output
    assert (tmp_path / "run" / "metrics.json").exists()


def test_refused_archives_through_the_command(rabbits_zip, monkeypatch, tmp_path):
    root = tmp_path / "DATASET"
    evil = zip_of({"CottontailRabbits/ok.txt": b"x", "../../evil.txt": b"x"})
    with FakeHub() as hub, hub_in_process(monkeypatch, hub.url, tmp_path / "hf"):
        hub.add(ZIP, corrupt(rabbits_zip, next(n for n in zipfile.ZipFile(io.BytesIO(rabbits_zip)).namelist() if n.endswith(".jpg"))))
        result = runner.invoke(app, ["data", "download", RABBITS, "--data-root", str(root)])
        assert result.exit_code == 2 and "corrupt member" in result.output and "Traceback" not in result.output
        assert not looks_complete(root / "odinw", "CottontailRabbits")
        assert [p.name for p in (root / "odinw").iterdir()] == []  # the refused zip is not kept for reuse
        hub.add(ZIP, evil)
        result = runner.invoke(app, ["data", "download", RABBITS, "--data-root", str(root)])
        assert result.exit_code == 2 and "'..' path" in " ".join(result.output.split())
        assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
        assert not looks_complete(root / "odinw", "CottontailRabbits")
        # a folder that is there but incomplete is not silently used, nor replaced without --force
        (root / "odinw" / "CottontailRabbits").mkdir()
        hub.add(ZIP, rabbits_zip)
        result = runner.invoke(app, ["data", "download", RABBITS, "--data-root", str(root)])
        assert result.exit_code == 2 and "--force" in result.output
        result = runner.invoke(app, ["data", "download", RABBITS, "--data-root", str(root), "--force"])
        assert result.exit_code == 0, result.output
        assert all((root / p).exists() for p in recipe_files(load_recipe(RABBITS)))


def test_missing_recipe_files_name_the_download_command(tmp_path, vocab_dir):
    weights = tmp_path / "w.safetensors"
    result = runner.invoke(app, ["zeroshot", "eval", "--recipe", "odinw35/aquarium", "--data-root", str(tmp_path / "empty"),
                                 "--weights", str(weights)])  # fmt: skip
    line = " ".join(result.output.split())
    assert result.exit_code == 2
    assert f"fetch it with: glip data download odinw35/aquarium --data-root {tmp_path / 'empty'}" in line
    result = runner.invoke(app, ["finetune", "--recipe", "odinw13/aquarium", "--variant", "test-tiny", "--data-root",
                                 str(tmp_path / "empty"), "--tokenizer", str(vocab_dir), "--dry-run"])  # fmt: skip
    line = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"fetch it with: glip data download odinw13/aquarium --data-root {tmp_path / 'empty'}" in line
