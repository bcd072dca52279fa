"""The synthetic grounding corpus: deterministic bytes, exact spans and boxes, held-out vocabulary,
the layout the recipes name, and ``glip data synth`` end to end."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from glip_transfer.cli import app
from glip_transfer.data import load_coco
from glip_transfer.synth import HELD_OUT_PAIRS, HELD_OUT_SHAPES, SPLITS, SynthError, ensure, generate, read_manifest
from glip_transfer.synth.captions import Vocabulary, category_list, describe
from glip_transfer.synth.scene import ObjectSpec, SceneStyle, render_scene
from glip_transfer.synth.shapes import COLOURS, SHAPES
from glip_transfer.training.data import is_grounding_file

SMALL = {"train": 6, "val": 3}
SMALL_TARGET = {"train": 12, "val": 3, "test": 3}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_arguments_same_bytes_and_seed_changes_them(tmp_path):
    a = generate(tmp_path / "a", "pretrain", seed=5, subsets=SMALL)
    generate(tmp_path / "b", "pretrain", seed=5, subsets=SMALL)
    generate(tmp_path / "c", "pretrain", seed=6, subsets=SMALL)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert fa.keys() == fc.keys() and fa["train/000001.jpg"] != fc["train/000001.jpg"]
    assert a["subsets"] == SMALL and read_manifest(tmp_path / "a") == a


def test_an_image_does_not_depend_on_how_many_are_generated(tmp_path):
    generate(tmp_path / "a", "shifted", seed=1, subsets={"train": 2, "val": 1, "test": 1})
    generate(tmp_path / "b", "shifted", seed=1, subsets={"train": 4, "val": 1, "test": 1})
    assert (tmp_path / "a/train/000002.jpg").read_bytes() == (tmp_path / "b/train/000002.jpg").read_bytes()


def test_grounding_file_spans_name_their_objects(tmp_path):
    generate(tmp_path, "pretrain", seed=0, subsets={"train": 40, "val": 2})
    coco = load_coco(tmp_path / "train.json")
    assert is_grounding_file(coco)
    assert [c["name"] for c in coco.categories.values()] == [
        "circle",
        "square",
        "triangle",
        "star",
        "hexagon",
        "diamond",
        "cross",
        "ring",
    ]
    for ann in coco.annotations:
        caption = coco.images[ann["image_id"]]["caption"]
        assert ann["tokens_positive"], "every annotated object is named"
        for start, end in ann["tokens_positive"]:
            phrase = caption[start:end]
            words = phrase.split()
            assert words[-1] in (SHAPES[ann["shape"]].name, SHAPES[ann["shape"]].plural)
            if len(words) > 1:
                assert words[-2] == ann["colour"]
        image = coco.images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"] and w > 0 and h > 0


def test_held_out_words_and_pairs_never_appear_in_pretraining(tmp_path):
    generate(tmp_path, "pretrain", seed=3, subsets={"train": 80, "val": 2})
    data = json.loads((tmp_path / "train.json").read_text())
    text = " ".join(i["caption"] for i in data["images"])
    for word in HELD_OUT_SHAPES:
        assert not re.search(rf"\b{word}", text), word
    for colour, shape in HELD_OUT_PAIRS:
        assert f"{colour} {shape}" not in text
        assert not any(a["colour"] == colour and a["shape"] == shape for a in data["annotations"])
    assert ". " in text and " and " in text  # both caption styles occur


def test_targets_have_their_categories_and_few_shot_files(tmp_path):
    generate(tmp_path / "novel", "novel", seed=0, subsets=SMALL_TARGET)
    novel = load_coco(tmp_path / "novel/test.json")
    assert [c["name"] for c in novel.categories.values()] == [f"{c} {s}" for c, s in HELD_OUT_PAIRS]
    generate(tmp_path / "shifted", "shifted", seed=0, subsets=SMALL_TARGET)
    shifted = load_coco(tmp_path / "shifted/train.json")
    assert [c["name"] for c in shifted.categories.values()] == list(HELD_OUT_SHAPES)
    assert {i["background"] for i in shifted.images.values()} <= {"dots", "grid", "waves"}
    files = sorted(p.name for p in (tmp_path / "shifted/few_shot").iterdir())
    assert len(files) == 12 and "train_shot3_seed30.json" in files
    one = load_coco(tmp_path / "shifted/few_shot/train_shot1_seed3.json")
    assert set(one.images) <= set(shifted.images) and 1 <= len(one.images) <= len(shifted.categories)


def test_objects_stay_mostly_visible_and_boxes_are_exact():
    rng = np.random.default_rng(0)
    style = SceneStyle(width=96, height=96, extent=(0.3, 0.5), clutter=(0, 0), pixel_noise=0.0)
    scene = render_scene(
        rng, style, [ObjectSpec("square", "red"), ObjectSpec("circle", "blue"), ObjectSpec("star", "white")]
    )
    pixels = np.asarray(scene.image).astype(int)
    for obj in scene.objects:
        x, y, w, h = obj.box
        assert obj.area <= w * h
        inside = pixels[y : y + h, x : x + w]
        colour = np.array(COLOURS[obj.colour].rgb)
        assert (np.abs(inside - colour).max(axis=-1) < 40).any()


def test_captions_describe_and_list():
    rng = np.random.default_rng(1)
    style = SceneStyle(width=128, height=128, clutter=(0, 0))
    scene = render_scene(
        rng, style, [ObjectSpec("circle", "red"), ObjectSpec("circle", "red"), ObjectSpec("star", "blue")]
    )
    cap = describe(rng, scene.objects, ["", "", "small"], scene.background)
    assert "red circles" in cap.text or "red circle" in cap.text
    listed = category_list(
        np.random.default_rng(2), scene.objects, Vocabulary((("red", "circle"), ("blue", "star"), ("green", "cross")))
    )
    for obj, spans in zip(scene.objects, listed.spans):
        assert all(listed.text[s:e] in (f"{obj.colour} {obj.shape}", obj.shape) for s, e in spans)


def test_refuses_a_non_empty_folder_without_force(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SynthError, match="not empty"):
        generate(tmp_path, "pretrain", subsets=SMALL)
    generate(tmp_path, "pretrain", subsets=SMALL, force=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(SynthError, match="unknown synthetic split"):
        generate(tmp_path / "x", "nope")


def test_ensure_generates_once_and_refuses_other_arguments(tmp_path, monkeypatch):
    monkeypatch.setitem(SPLITS, "novel", dataclasses.replace(SPLITS["novel"], subsets=SMALL_TARGET))
    said = []
    assert ensure(tmp_path / "n", "novel", notify=said.append) is True
    assert len(said) == 1 and "first use" in said[0]
    assert ensure(tmp_path / "n", "novel") is False
    with pytest.raises(SynthError, match="seed"):
        ensure(tmp_path / "n", "novel", seed=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(SynthError, match="other files"):
        ensure(tmp_path / "other", "novel")


def test_cli_synth(tmp_path):
    runner = CliRunner()
    out = tmp_path / "corpus"
    result = runner.invoke(
        app, ["data", "synth", "--out", str(out), "--split", "pretrain", "--images", "3", "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "train.json").is_file() and len(list((out / "train").iterdir())) == 3
    again = runner.invoke(app, ["data", "synth", "--out", str(out), "--split", "pretrain", "--images", "3"])
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output
