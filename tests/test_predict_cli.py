"""``glip predict`` and ``glip inspect`` end to end on a small model, including bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from glip_transfer.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tiny_weights):
    """test-tiny with every location above the thresholds (non-empty outputs); ``tiny.pth`` beside it."""
    return tiny_weights


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((120, 160), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    return folder


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def predict(weights, vocab_dir, *args):
    return run(
        "predict",
        *args,
        "--weights",
        weights,
        "--tokenizer",
        vocab_dir,
        "--device",
        "cpu",
        "--min-size",
        "128",
        "--max-size",
        "200",
    )


def test_predict_classes_writes_json_and_pngs(weights, images, vocab_dir, tmp_path):
    out = tmp_path / "vis"
    result = predict(
        weights,
        vocab_dir,
        images,
        "--classes",
        "cat, dog ,red car",
        "--threshold",
        "0",
        "--out",
        out,
        "--json",
        tmp_path / "d.json",
        "--batch-size",
        "2",
        "--max-detections",
        "7",
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["image"].split("/")[-1] for r in data] == ["deep16.png", "gray.png", "rgb.jpg", "rgba.png", "rotated.jpg"]
    for record in data:
        assert 0 < len(record["detections"]) <= 7
        scores = [d["score"] for d in record["detections"]]
        assert scores == sorted(scores, reverse=True)
        for d in record["detections"]:
            assert d["label"] in {"cat", "dog", "red car"}
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]
    # the EXIF-rotated photo is shown upright: width and height swap
    rotated = next(r for r in data if r["image"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (120, 160)
    assert sorted(p.name for p in out.iterdir()) == ["deep16.png", "gray.png", "rgb.png", "rgba.png", "rotated.png"]


def test_predict_free_text_with_phrases(weights, images, vocab_dir, tmp_path):
    result = predict(
        weights,
        vocab_dir,
        images / "rgb.jpg",
        "--prompt",
        "a man riding a red bicycle",
        "--phrase",
        "man",
        "--phrase",
        "red bicycle",
        "--threshold",
        "0",
        "--json",
        tmp_path / "d.json",
    )
    assert result.exit_code == 0, result.output
    labels = {d["label"] for d in json.loads((tmp_path / "d.json").read_text())[0]["detections"]}
    assert labels <= {"man", "red bicycle"} and labels


def test_predict_same_result_from_official_pth(weights, images, vocab_dir, tmp_path):
    outs = []
    for w in (weights, weights.with_suffix(".pth")):
        path = tmp_path / f"{w.suffix[1:]}.json"
        assert (
            predict(w, vocab_dir, images / "rgb.jpg", "--classes", "cat", "--threshold", "0", "--json", path).exit_code
            == 0
        )
        outs.append(json.loads(path.read_text())[0]["detections"])
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--classes", " , ,"], "names no category"),
        (["--classes", "a", "--prompt", "b"], "exactly one of"),
        ([], "exactly one of"),
        (["--prompt", "a dog", "--phrase", "cat"], "cat"),
        (["--phrase", "cat", "--classes", "cat"], "--phrase needs --prompt"),
    ],
)
def test_predict_bad_prompt_arguments(weights, images, vocab_dir, args, message):
    result = predict(weights, vocab_dir, images / "rgb.jpg", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_name_that_tokenizes_to_nothing_is_reported(weights, images, vocab_dir, tmp_path):
    # U+0301 (a lone combining accent) is stripped by BERT's normaliser: no token at all
    result = predict(
        weights,
        vocab_dir,
        images / "rgb.jpg",
        "--classes",
        "cat,\u0301",
        "--threshold",
        "0",
        "--json",
        tmp_path / "d.json",
    )
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "cannot be detected" in " ".join(result.output.split())
    labels = {d["label"] for d in json.loads((tmp_path / "d.json").read_text())[0]["detections"]}
    assert labels == {"cat"}


def test_missing_and_corrupt_images(weights, images, vocab_dir, tmp_path):
    result = predict(weights, vocab_dir, tmp_path / "nope.jpg", "--classes", "cat")
    assert result.exit_code == 2 and "nope.jpg: no such file or folder" in result.output
    broken = tmp_path / "broken.jpg"
    data = (images / "rgb.jpg").read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    result = predict(weights, vocab_dir, broken, images / "rgb.jpg", "--classes", "cat", "--json", tmp_path / "d.json")
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output and "skipped" in result.output
    assert len(json.loads((tmp_path / "d.json").read_text())) == 1
    result = predict(weights, vocab_dir, broken, "--classes", "cat")
    assert result.exit_code == 2


def test_bad_checkpoints(weights, images, vocab_dir, tmp_path):
    truncated = tmp_path / "cut.pth"
    data = weights.with_suffix(".pth").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path, message in ((truncated, "truncated or corrupt"), (tmp_path / "none.pth", "file not found")):
        result = predict(path, vocab_dir, images / "rgb.jpg", "--classes", "cat")
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    result = predict(
        weights.with_suffix(".pth"), vocab_dir, images / "rgb.jpg", "--classes", "cat", "--variant", "glip-t"
    )
    assert result.exit_code == 2
    assert "looks like test-tiny" in " ".join(result.output.split())


def test_inspect(weights):
    result = run("inspect", weights.with_suffix(".pth"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["detected_variant"] == "test-tiny" and info["keys"]["ok"]
    assert sum(info["parameters_by_part"].values()) == info["parameters"]
    table = run("inspect", weights)
    assert table.exit_code == 0 and "all" in table.output and "match" in table.output


def test_predict_independent_of_batch_size_on_mixed_sizes(weights, vocab_dir, tmp_path):
    """Images of several sizes, batched 3 at a time (and loaded by 2 workers): each image's
    detections equal batch 1's, records in input order."""
    from test_inference import mixed_size_dataset

    _, folder = mixed_size_dataset(tmp_path / "mixed")
    data = {}
    for batch_size, workers in ((1, 0), (3, 2)):
        out = tmp_path / f"b{batch_size}.json"
        result = predict(weights, vocab_dir, folder, "--classes", "red square,dog", "--threshold", "0", "--json", out,
                         "--batch-size", batch_size, "--workers", workers)  # fmt: skip
        assert result.exit_code == 0, result.output
        data[batch_size] = json.loads(out.read_text())
    assert [r["image"] for r in data[1]] == [r["image"] for r in data[3]] == sorted(str(p) for p in folder.iterdir())
    from glip_transfer.model.postprocess import Detections, match_detections

    def dets(record):
        ds = record["detections"]
        labels = torch.tensor([["red square", "dog"].index(d["label"]) for d in ds])
        return Detections(torch.tensor([d["box"] for d in ds]), torch.tensor([d["score"] for d in ds]), labels, labels)

    for a, b in zip(data[1], data[3]):
        m = match_detections(dets(a), dets(b), iou_threshold=0.99, score_tol=1e-4)
        assert m["matched"] == m["a"] == m["b"] > 0 and m["max_box_diff"] <= 0.02, m


@pytest.fixture()
def no_model(monkeypatch):
    """Loading weights fails the test: the checks under test must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the input was checked")

    monkeypatch.setattr("glip_transfer.api.load_model", refuse)


def test_json_dash_writes_to_stdout(weights, images, vocab_dir):
    result = predict(weights, vocab_dir, images / "rgb.jpg", "--classes", "cat", "--threshold", "0", "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data[0]["image"].endswith("rgb.jpg") and data[0]["detections"]
    assert "detection(s)" in result.stderr  # the summary goes to stderr, the JSON alone to stdout


def test_existing_outputs_need_force(weights, images, vocab_dir, tmp_path, monkeypatch):
    dets = tmp_path / "dets.json"
    dets.write_text("mine")
    vis = tmp_path / "vis"
    vis.mkdir()
    (vis / "rgb.png").write_bytes(b"mine")
    monkeypatch.setattr("glip_transfer.api.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    for args, name in ((["--json", dets], "dets.json"), (["--out", vis], "rgb.png")):
        result = predict(weights, vocab_dir, images / "rgb.jpg", "--classes", "cat", *args)
        assert result.exit_code == 2, result.output
        assert name in result.output and "--force" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert dets.read_text() == "mine" and (vis / "rgb.png").read_bytes() == b"mine"
    monkeypatch.undo()
    result = predict(
        weights, vocab_dir, images / "rgb.jpg", "--classes", "cat", "--json", dets, "--out", vis, "--force"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(dets.read_text())[0]["image"].endswith("rgb.jpg")
    assert (vis / "rgb.png").read_bytes()[:4] == b"\x89PNG"
    # /dev/null is written in place, never refused
    assert predict(weights, vocab_dir, images / "rgb.jpg", "--classes", "cat", "--json", "/dev/null").exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "1.5"], "--threshold 1.5: a score threshold must be between 0 and 1"),
        (["--threshold", "nan"], "--threshold nan"),
        (["--threshold", "-0.1"], "--threshold -0.1"),
        (["--max-detections", "0"], "--max-detections 0: must be a whole number >= 1"),
        (["--max-detections", "-1"], "--max-detections -1"),
        (["--min-size", "0"], "--min-size 0: must be a whole number >= 1"),
        (["--min-size", "-5"], "--min-size -5"),
        (["--max-size", "0"], "--max-size 0"),
        (["--min-size", "512", "--max-size", "128"], "--min-size 512 is larger than --max-size 128"),
        (["--out", "FILE"], "is a file: give a folder"),
        (["--json", "FOLDER"], "is a folder: give a file name"),
        (["--tokenizer", "NO_TOKENIZER"], "NO_TOKENIZER"),
        (["--adapter", "NO_ADAPTER"], "adapter not found"),
        (["--weights", "glip-xl"], "glip-xl"),
    ],
)
def test_bad_options_fail_in_one_line_before_loading(weights, images, vocab_dir, tmp_path, no_model, args, message):
    (tmp_path / "a_file").write_text("x")
    replace = {
        "FILE": tmp_path / "a_file",
        "FOLDER": tmp_path,
        "NO_TOKENIZER": tmp_path / "no_tokenizer",
        "NO_ADAPTER": tmp_path / "none.safetensors",
    }
    args = [replace.get(a, a) for a in args]
    message = message.replace("NO_TOKENIZER", "no_tokenizer")
    defaults = {"--weights": weights, "--tokenizer": vocab_dir, "--device": "cpu"}
    given = [a for a in args if str(a).startswith("--")]
    extra = [x for option, value in defaults.items() if option not in given for x in (option, value)]
    result = run("predict", images / "rgb.jpg", "--classes", "cat", *args, *extra)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text and "Traceback" not in text
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_phrase_not_in_prompt_fails_before_loading(weights, images, vocab_dir, no_model):
    result = predict(weights, vocab_dir, images / "rgb.jpg", "--prompt", "a dog on a sofa", "--phrase", "cat")
    assert result.exit_code == 2 and "cat" in result.output


def test_without_outputs_a_table_per_image_or_counts_per_class(weights, images, vocab_dir):
    small = predict(weights, vocab_dir, images / "rgb.jpg", images / "gray.png", "--classes", "cat,dog",
                    "--threshold", "0", "--max-detections", "3")  # fmt: skip
    assert small.exit_code == 0, small.output
    out = " ".join(small.stdout.split())
    assert "rgb.jpg (160x120)" in out and "gray.png (160x120)" in out
    assert "label" in out and "score" in out and "box (x1, y1, x2, y2)" in out
    assert out.count("cat") + out.count("dog") >= 6 - 1  # three rows per image (a label may wrap)
    large = predict(weights, vocab_dir, images, "--classes", "cat,dog", "--threshold", "0", "--max-detections", "20")
    assert large.exit_code == 0, large.output
    assert "100 detections in 5 images" in " ".join(large.stdout.split())
    assert "best score" in large.stdout and "box (x1" not in large.stdout
