"""``glip zeroshot eval`` end to end on a small COCO dataset made by the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from glip_transfer import inference
from glip_transfer.cli import app

runner = CliRunner()
CATEGORIES = [{"id": 3, "name": "red_square"}, {"id": 7, "name": "blue circle (round)"}, {"id": 9, "name": "cat"}]


def make_dataset(root, n_images=5):
    """Images with a red square and a blue disc, and their COCO annotations."""
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i in range(n_images):
        canvas = np.full((96, 128, 3), 230, np.uint8)
        x, y = int(rng.integers(0, 60)), int(rng.integers(0, 40))
        canvas[y : y + 30, x : x + 30] = (220, 20, 20)
        image = Image.fromarray(canvas)
        image.save(root / "images" / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": 128, "height": 96})
        anns.append(
            {"id": 1000 + i, "image_id": 100 + i, "category_id": 3, "bbox": [x, y, 30, 30], "area": 900, "iscrowd": 0}
        )
    ann = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "ann.json").write_text(json.dumps(ann))
    return root / "ann.json", root / "images"


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights  # scores above the 0.05 candidate threshold: non-empty outputs


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def zeroshot(weights, vocab_dir, *args):
    return runner.invoke(
        app,
        [
            "zeroshot",
            "eval",
            *map(str, args),
            "--weights",
            str(weights),
            "--tokenizer",
            str(vocab_dir),
            "--device",
            "cpu",
            "--set",
            "evaluation.min_size=96",
            "--set",
            "evaluation.max_size=128",
        ],
        catch_exceptions=False,
    )


def test_eval_writes_every_file(weights, dataset, vocab_dir, tmp_path):
    ann, images = dataset
    out = tmp_path / "out"
    result = zeroshot(
        weights,
        vocab_dir,
        "--ann",
        ann,
        "--images",
        images,
        "--out",
        out,
        "--batch-size",
        "2",
        "--export-odinw",
        tmp_path / "odinw.json",
    )
    assert result.exit_code == 0, result.output
    for name in ("bbox.json", "metrics.json", "per_category.csv", "report.md"):
        assert (out / name).exists(), name
    assert not (out / "partial_results.jsonl").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["AP"] <= 1 and "AP50" in metrics and "AR100" in metrics
    results = json.loads((out / "bbox.json").read_text())
    assert {r["category_id"] for r in results} <= {3, 7, 9}
    assert {r["image_id"] for r in results} == {100, 101, 102, 103, 104}
    # the caption follows the official clean-up: "(round)" removed, "_" -> " "
    assert metrics["captions"] == ["red square. blue circle . cat"]
    assert list(json.loads((tmp_path / "odinw.json").read_text())) == ["ann"]
    assert "AP50" in result.output and "red_square" in result.output


def test_interrupted_eval_resumes_to_the_same_results(weights, dataset, vocab_dir, tmp_path, monkeypatch):
    ann, images = dataset
    full = tmp_path / "full"
    assert zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", full).exit_code == 0

    calls = {"n": 0}
    original = inference.detect_batch

    def dies_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    out = tmp_path / "cut"
    monkeypatch.setattr(inference, "detect_batch", dies_after_two)
    result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out)
    assert result.exit_code == 130
    lines = (out / "partial_results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and not (out / "metrics.json").exists()

    monkeypatch.setattr(inference, "detect_batch", original)
    again = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    key = lambda r: (r["image_id"], r["category_id"], r["score"])  # noqa: E731
    a = sorted(json.loads((full / "bbox.json").read_text()), key=key)
    b = sorted(json.loads((out / "bbox.json").read_text()), key=key)
    assert a == b
    assert json.loads((full / "metrics.json").read_text())["AP"] == json.loads((out / "metrics.json").read_text())["AP"]
    finished = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out)
    assert finished.exit_code == 2 and "--force" in finished.output


def test_recipe_with_data_root(weights, dataset, vocab_dir, tmp_path):
    ann, images = dataset
    recipe = {
        "name": "toy",
        "splits": {"val": {"ann_file": "data/ann.json", "img_dir": "data/images"}},
        "categories": [
            {"id": 3, "name": "red_square"},
            {"id": 7, "name": "blue circle (round)"},
            {"id": 9, "name": "cat"},
        ],
        "evaluation": {"detections_per_img": 5},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = zeroshot(weights, vocab_dir, "--recipe", path, "--data-root", tmp_path, "--out", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "bbox.json").read_text())
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 5


def test_missing_images_are_skipped_and_counted(weights, dataset, vocab_dir, tmp_path):
    ann, images = dataset
    (images / "0.png").unlink()
    result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "1 image(s)" in result.output and "missing" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--recipe", "no-such-recipe"], "no-such-recipe"),
        (["--recipe", "coco", "--data-root", "/nonexistent"], "check --data-root"),
        ([], "give --recipe"),
    ],
)
def test_bad_arguments_are_one_line_errors(weights, vocab_dir, args, message):
    result = zeroshot(weights, vocab_dir, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_malformed_annotations_name_the_file(weights, dataset, vocab_dir, tmp_path):
    ann, images = dataset
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [1, 1, 0, 5]
    ann.write_text(json.dumps(data))
    result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "ann.json" in result.output


def test_empty_dataset(weights, vocab_dir, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "a.json").write_text(json.dumps({"images": [], "annotations": [], "categories": CATEGORIES}))
    result = zeroshot(
        weights, vocab_dir, "--ann", tmp_path / "a.json", "--images", tmp_path / "img", "--out", tmp_path / "o"
    )
    assert result.exit_code == 2 and "a.json" in result.output


def test_help_fits_80_columns():
    result = CliRunner().invoke(app, ["zeroshot", "eval", "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_results_independent_of_batch_size_on_mixed_sizes(weights, vocab_dir, tmp_path):
    """Images of several sizes: --batch-size 4 gives batch 1's detections, written in dataset order."""
    from test_inference import assert_same_results, mixed_size_dataset

    ann, images = mixed_size_dataset(tmp_path / "mixed")
    order = [image["id"] for image in json.loads(ann.read_text())["images"]]
    results = {}
    for batch_size in (1, 4):
        out = tmp_path / f"b{batch_size}"
        result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, "--batch-size", batch_size)
        assert result.exit_code == 0, result.output
        results[batch_size] = json.loads((out / "bbox.json").read_text())
        assert list(dict.fromkeys(r["image_id"] for r in results[batch_size])) == order
    assert len(results[1]) > 0
    assert_same_results(results[1], results[4])
