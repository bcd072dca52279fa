"""``glip zeroshot eval`` end to end on a small COCO dataset made by the test."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
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
    assert len(lines) == 3 and not (out / "metrics.json").exists()  # the run's provenance, then two batches
    assert "provenance" in json.loads(lines[0])

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


def test_missing_images_are_left_out_of_the_metrics(weights, dataset, vocab_dir, tmp_path):
    """An image listed but missing on disk is not run, and its ground truth does not count: the
    metrics describe exactly the images evaluated, and say which were skipped."""
    from glip_transfer.evaluation import coco_evaluate

    ann, images = dataset
    (images / "0.png").unlink()
    out = tmp_path / "o"
    result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 of 5 images listed in ann.json are missing" in text and "4 of 5 images evaluated" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4
    assert metrics["num_skipped_images"] == 1 and metrics["skipped_images"] == ["0.png"]
    data = json.loads(ann.read_text())
    data["images"] = [i for i in data["images"] if i["id"] != 100]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 100]
    (tmp_path / "four.json").write_text(json.dumps(data))
    results = json.loads((out / "bbox.json").read_text())
    assert metrics["AP"] == coco_evaluate(tmp_path / "four.json", results)["AP"]
    report = (out / "report.md").read_text()
    assert "4 of 5 images evaluated" in report and "0.png" in report


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


def interrupt_after_two_batches(weights, vocab_dir, ann, images, out, monkeypatch, *args):
    original = inference.detect_batch
    calls = {"n": 0}

    def dies_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(inference, "detect_batch", dies_after_two)
    result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, *args)
    monkeypatch.setattr(inference, "detect_batch", original)
    assert result.exit_code == 130
    return result


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--set", "evaluation.detections_per_img=50"], "evaluation.detections_per_img 100 → 50"),
        (["--set", "model.postprocess.nms_thresh=0.5"], "evaluation.nms_thresh 0.6 → 0.5"),
        (["--set", "model.postprocess.pre_nms_thresh=0.2"], "evaluation.pre_nms_thresh 0.05 → 0.2"),
        (["other weights"], "weights.sha256"),
        (["adapter"], "adapter.sha256 None →"),
        (["renamed category"], "captions ['red square. blue circle . cat'] → ['red square. blue circle . dog']"),
    ],
)
def test_resume_refuses_partial_results_of_other_settings(
    weights, dataset, vocab_dir, tmp_path, monkeypatch, change, expected
):
    """Partial results record what decides the detections; a resume that differs is refused in one
    line naming the change, and --force starts over."""
    from glip_transfer.checkpoint import read_state_dict
    from glip_transfer.training.artifacts import base_hash, save_prompt_artifact

    ann, images = dataset
    out = tmp_path / "cut"
    interrupt_after_two_batches(weights, vocab_dir, ann, images, out, monkeypatch)
    before = (out / "partial_results.jsonl").read_text()
    run_weights, args = weights, list(change)
    if change == ["other weights"]:
        state, _ = read_state_dict(weights)
        from safetensors.torch import save_file

        state = {k: v.clone() for k, v in state.items()}
        state["rpn.head.bias0"] += 1.0
        run_weights = tmp_path / "other.safetensors"
        save_file(state, run_weights, metadata={"format": "glip-transfer"})
        args = []
    elif change == ["adapter"]:
        adapter = tmp_path / "prompt.safetensors"
        save_prompt_artifact(
            adapter, torch.zeros(256, 32), caption="red square. blue circle . cat", recipe=None, base=base_hash(weights)
        )
        args = ["--adapter", adapter]
    elif change == ["renamed category"]:
        data = json.loads(ann.read_text())
        data["categories"][2]["name"] = "dog"
        ann.write_text(json.dumps(data))
        args = []
    refused = zeroshot(run_weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, "--resume", *args)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2, refused.output
    assert "cannot resume: its partial results were made with other settings" in text and expected in text
    assert "--force to start over" in text and "Traceback" not in refused.output
    assert (out / "partial_results.jsonl").read_text() == before  # nothing lost
    forced = zeroshot(run_weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, "--force", *args)
    assert forced.exit_code == 0, forced.output
    assert not (out / "partial_results.jsonl").exists()


def test_resume_with_only_the_batch_size_changed_is_allowed(weights, dataset, vocab_dir, tmp_path, monkeypatch):
    ann, images = dataset
    out = tmp_path / "cut"
    interrupt_after_two_batches(weights, vocab_dir, ann, images, out, monkeypatch)
    resumed = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, "--resume", "-b", "3")
    assert resumed.exit_code == 0, resumed.output
    provenance = json.loads((out / "metrics.json").read_text())["provenance"]
    assert provenance["evaluation"]["batch_size"] == 3 and provenance["started"] <= provenance["date"]


def test_partial_results_without_a_record_are_refused(weights, dataset, vocab_dir, tmp_path):
    ann, images = dataset
    out = tmp_path / "old"
    out.mkdir()
    (out / "partial_results.jsonl").write_text(json.dumps({"image_ids": [100], "results": []}) + "\n")
    refused = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, "--resume")
    assert refused.exit_code == 2 and "does not record the settings" in refused.output


def test_metrics_and_report_carry_the_provenance(weights, dataset, vocab_dir, tmp_path):
    from glip_transfer.checkpoint import weights_sha256

    ann, images = dataset
    out = tmp_path / "out"
    result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, "-b", "2")
    assert result.exit_code == 0, result.output
    prov = json.loads((out / "metrics.json").read_text())["provenance"]
    assert prov["weights"] == {"given": str(weights), "path": str(weights.resolve()), "sha256": weights_sha256(weights)}
    assert prov["adapter"] is None and prov["variant"] == "test-tiny" and prov["device"] == "cpu"
    assert prov["captions"] == ["red square. blue circle . cat"] and len(prov["tokens_sha256"]) == 64
    assert prov["overrides"] == ["evaluation.min_size=96", "evaluation.max_size=128"]
    assert prov["annotations"]["path"] == str(ann.resolve()) and prov["split"] == "val" and prov["recipe"] == "ann"
    assert prov["evaluation"] == {
        "split": "val", "metric": "coco", "chunk_size": None, "min_size": 96, "max_size": 128,
        "detections_per_img": 100, "pre_nms_thresh": 0.05, "pre_nms_top_n": 1000, "nms_thresh": 0.6,
        "min_box_size": 0.0, "score_agg": "MEAN", "batch_size": 2, "amp": False, "precision": "float32",
    }  # fmt: skip
    assert prov["model"]["input"]["min_size"] == 96 and prov["model"]["variant"] == "test-tiny"
    assert set(prov["versions"]) == {"glip_transfer", "torch", "transformers", "python"}
    assert prov["command"][:3] == ["glip", "zeroshot", "eval"] or prov["command"][0] == "glip"
    assert prov["date"].endswith("Z")
    report = (out / "report.md").read_text()
    assert "## Provenance" in report and prov["weights"]["sha256"] in report and "evaluation.nms_thresh | 0.6" in report


def test_default_output_is_named_after_the_dataset_folder(weights, vocab_dir, tmp_path, monkeypatch):
    """Roboflow exports name every annotation file _annotations.coco.json: the default --out comes
    from the dataset folder and split, so two datasets do not collide."""
    monkeypatch.chdir(tmp_path)
    for name in ("trees", "fish"):
        ann, images = make_dataset(tmp_path / name / "valid", n_images=1)
        roboflow = ann.with_name("_annotations.coco.json")
        ann.rename(roboflow)
        result = zeroshot(weights, vocab_dir, "--ann", roboflow, "--images", images)
        assert result.exit_code == 0, result.output
        assert (tmp_path / "runs" / "zeroshot" / f"{name}_valid" / "metrics.json").exists()
    again = zeroshot(weights, vocab_dir, "--ann", roboflow, "--images", images)
    assert again.exit_code == 2 and "holds a finished evaluation" in again.output


def test_output_problems_are_one_line_before_the_model_loads(weights, dataset, vocab_dir, tmp_path, monkeypatch):
    import glip_transfer.commands.zeroshot as command

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(command, "load_model", must_not_load)
    ann, images = dataset
    (tmp_path / "a_file").write_text("mine")
    result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", tmp_path / "a_file")
    assert result.exit_code == 2 and "is a file; give a folder" in result.output
    assert (tmp_path / "a_file").read_text() == "mine"
    (tmp_path / "export.json").write_text("mine")
    for target, message in ((tmp_path / "export.json", "exists: pass --force"), (tmp_path, "is a folder")):
        result = zeroshot(
            weights, vocab_dir, "--ann", ann, "--images", images, "--out", tmp_path / "o", "--export-odinw", target
        )
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert (tmp_path / "export.json").read_text() == "mine"


def test_a_second_run_on_the_same_folder_is_refused(weights, dataset, vocab_dir, tmp_path):
    from glip_transfer.runlock import RunLock

    ann, images = dataset
    out = tmp_path / "busy"
    with RunLock(out, command="glip zeroshot eval"):
        result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out)
        assert [p.name for p in out.iterdir()] == [".glip.lock"]  # the refused run wrote nothing
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "is in use by another glip run" in text and "Traceback" not in result.output
    assert "(glip zeroshot eval" in text


def test_a_full_disk_is_one_line_and_keeps_the_partial_results(weights, dataset, vocab_dir, tmp_path):
    """A real write failure in a child process (a file-size limit: write(2) fails as on a full
    disk): one line, exit 2, the batches written so far kept, and --resume finishes the run."""
    import subprocess
    import sys

    ann, images = dataset
    out = tmp_path / "out"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (12000, 12000))\n"
        "from glip_transfer.cli import main\n"
        "sys.argv = ['glip'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = ["zeroshot", "eval", "--ann", ann, "--images", images, "--out", out, "--weights", weights]
    args += ["--tokenizer", vocab_dir, "--device", "cpu", "--set", "evaluation.min_size=96"]
    args += ["--set", "evaluation.max_size=128", "--workers", "0"]
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env={**os.environ, "GLIP_PROGRESS": "0"}
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "File too large" in error[0] and "continue with --resume" in error[0], done.stderr
    kept = (out / "partial_results.jsonl").read_text().splitlines()
    assert len(kept) >= 2 and not (out / "metrics.json").exists()
    resumed = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", out, "--resume", "--workers", "0")
    assert resumed.exit_code == 0, resumed.output
    assert len({r["image_id"] for r in json.loads((out / "bbox.json").read_text())}) == 5


def test_brackets_in_messages_survive(weights, dataset, vocab_dir, tmp_path):
    """Messages from data are plain text, not Rich markup."""
    ann, images = dataset
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = "wide"
    ann.write_text(json.dumps(data))
    result = zeroshot(weights, vocab_dir, "--ann", ann, "--images", images, "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "a bbox is [x, y, width, height], four finite numbers" in " ".join(result.output.split())


def test_images_with_more_boxes_than_kept_detections_are_warned_about(weights, dataset, vocab_dir, tmp_path):
    ann, images = dataset
    data = json.loads(ann.read_text())
    for k in range(3):
        data["annotations"].append(
            {"id": 5000 + k, "image_id": 102, "category_id": 7, "bbox": [k * 10, 0, 8, 8], "iscrowd": 0}
        )
    ann.write_text(json.dumps(data))
    result = zeroshot(
        weights, vocab_dir, "--ann", ann, "--images", images, "--out", tmp_path / "o",
        "--set", "evaluation.detections_per_img=3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 image(s) have more ground-truth boxes than the 3 detections kept per image (most: 4 in 2.png)" in text
    assert "--set evaluation.detections_per_img=100" in text
