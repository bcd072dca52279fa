"""The Python API (``glip_transfer.load`` -> ``Detector``): the same detections as ``glip predict
--json`` and the same metrics as ``glip zeroshot eval``, on test-tiny weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import glip_transfer
from glip_transfer.cli import app
from glip_transfer.config import ConfigError
from glip_transfer.data import DataError
from glip_transfer.prompts import PromptError
from test_zeroshot_cli import make_dataset

runner = CliRunner()
SIZES = dict(min_size=128, max_size=200)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api_images")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(folder / "b.png")
    return folder


@pytest.fixture(scope="module")
def detector(tiny_weights, vocab_dir):
    return glip_transfer.load(tiny_weights, device="cpu", tokenizer=vocab_dir)


def test_package_import_is_light_and_exports_load():
    assert glip_transfer.load is glip_transfer.api.load
    assert "load" in glip_transfer.__all__


def test_predict_matches_the_cli_json(detector, tiny_weights, vocab_dir, image_dir, tmp_path):
    paths = [image_dir / "a.png", image_dir / "b.png"]
    api = detector.predict(paths, classes=["cat", "red car"], threshold=0.2, max_detections=9, **SIZES)
    out = tmp_path / "d.json"
    args = ["predict", *map(str, paths), "--classes", "cat, red car", "--threshold", "0.2", "--max-detections", "9"]
    args += ["--min-size", "128", "--max-size", "200", "--weights", str(tiny_weights), "--tokenizer", str(vocab_dir)]
    result = runner.invoke(app, args + ["--device", "cpu", "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cli = json.loads(out.read_text())
    assert [r["detections"] for r in cli] == api
    assert all(0 < len(dets) <= 9 for dets in api)
    for dets in api:
        assert set(dets[0]) == {"box", "score", "label"}
        assert all(d["score"] >= 0.2 and d["label"] in ("cat", "red car") for d in dets)


def test_paths_pil_images_and_arrays_give_the_same_detections(detector, image_dir):
    path = image_dir / "a.png"
    from_path = detector.predict(path, classes="cat,dog", threshold=0.1, **SIZES)
    pil = Image.open(path).convert("RGB")
    assert isinstance(from_path, list) and isinstance(from_path[0], dict)  # one image: its list alone
    assert detector.predict(pil, classes="cat,dog", threshold=0.1, **SIZES) == from_path
    assert detector.predict(np.asarray(pil), classes=["cat", "dog"], threshold=0.1, **SIZES) == from_path
    assert detector.predict([str(path), pil], classes="cat,dog", threshold=0.1, **SIZES) == [from_path, from_path]
    with pytest.raises(DataError, match="uint8"):
        detector.predict(np.zeros((4, 4, 3), np.float32), classes="cat")


def test_text_features_are_computed_once_per_prompt(detector, image_dir, monkeypatch):
    calls = []
    encode = detector.model.encode_text
    monkeypatch.setattr(detector.model, "encode_text", lambda *a: calls.append(1) or encode(*a))
    for _ in range(3):
        detector.predict(image_dir / "b.png", prompt="a striped cat. a dog", **SIZES)
    assert len(calls) == 1
    detector.predict(image_dir / "b.png", prompt="a red car", **SIZES)
    assert len(calls) == 2


def test_free_text_phrases_label_the_detections(detector, image_dir):
    dets = detector.predict(image_dir / "a.png", prompt="a striped cat next to a dog", phrases=["striped cat"], **SIZES)
    assert dets and {d["label"] for d in dets} == {"striped cat"}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(classes="cat", threshold=1.5), ConfigError, "threshold=1.5"),
        (dict(classes="cat", threshold=float("nan")), ConfigError, "threshold=nan"),
        (dict(classes="cat", max_detections=0), ConfigError, "max_detections=0"),
        (dict(classes="cat", min_size=0), ConfigError, "min_size=0"),
        (dict(classes="cat", min_size=512, max_size=128), ConfigError, "min_size=512 is larger"),
        (dict(classes="cat", prompt="a cat"), PromptError, "exactly one"),
        (dict(classes=" , "), PromptError, "names no category"),
        (dict(prompt="a cat", phrases=["dog"]), PromptError, "dog"),
    ],
)
def test_bad_arguments_are_one_line_errors(detector, image_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        detector.predict(image_dir / "a.png", **kwargs)


def test_load_checks_before_reading_weights(tmp_path, vocab_dir):
    from glip_transfer.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="glip-t"):
        glip_transfer.load("glip-xl", tokenizer=vocab_dir)
    with pytest.raises(CheckpointError, match="not found"):
        glip_transfer.load(tmp_path / "missing.pth", tokenizer=vocab_dir)


def test_evaluate_matches_zeroshot_eval(detector, tiny_weights, vocab_dir, tmp_path):
    ann, images = make_dataset(tmp_path / "data")
    sets = ["evaluation.min_size=96", "evaluation.max_size=128"]
    metrics = detector.evaluate(ann, images=images, overrides=sets, progress=False)
    out = tmp_path / "out"
    args = ["zeroshot", "eval", "--ann", str(ann), "--images", str(images), "--out", str(out)]
    args += ["--weights", str(tiny_weights), "--tokenizer", str(vocab_dir), "--device", "cpu"]
    result = runner.invoke(app, args + ["--set", sets[0], "--set", sets[1]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "metrics.json").read_text())
    for key in ("AP", "AP50", "AR100", "num_images", "captions"):
        assert metrics[key] == written[key], key
    assert metrics["num_images"] == 5
    with pytest.raises(ConfigError, match="model settings are fixed"):
        detector.evaluate(ann, images=images, overrides=["model.postprocess.nms_thresh=0.5"])


def test_evaluate_warns_when_images_hold_more_boxes_than_kept(detector, tmp_path):
    ann, images = make_dataset(tmp_path / "data", n_images=2)
    sets = ["evaluation.min_size=96", "evaluation.max_size=128", "evaluation.detections_per_img=1"]
    data = json.loads(ann.read_text())
    data["annotations"].append({**data["annotations"][0], "id": 9999})
    ann.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="more ground-truth boxes than the 1 detections kept"):
        metrics = detector.evaluate(ann, images=images, overrides=sets, progress=False)
    assert metrics["num_images"] == 2
