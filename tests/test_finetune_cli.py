"""``glip finetune`` / ``glip pretrain`` end to end on small datasets made by the test (test-tiny model)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from glip_transfer.checkpoint import save_model
from glip_transfer.cli import app
from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.training.run import RunSpec, prepare, train_run
from synthetic import make_rectangles

runner = CliRunner()
SIZES = [
    "--set",
    "train.min_sizes=[96]",
    "--set",
    "train.max_size=160",
    "--set",
    "evaluation.min_size=96",
    "--set",
    "evaluation.max_size=128",
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_rectangles(
        tmp_path_factory.mktemp("data"), n_images=8, names=("red", "green", "blue"), size=(128, 96), box_range=(24, 44)
    )


@pytest.fixture(scope="module")
def base_weights(tiny_weights):
    return tiny_weights  # non-empty detections from the start


def finetune(data, vocab_dir, *args):
    ann, images = data
    return invoke(
        "finetune", "--ann", ann, "--images", images, "--tokenizer", vocab_dir, "--device", "cpu", *SIZES, *args
    )


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("full", None),
        ("prompt", 256 * 32),
        ("linear", 32 * 4 + 4 + 32 + 1 + 32 * 32 + 32 + 1 + 32 + 1),
        ("text", None),
        ("lora", None),
    ],
)
def test_dry_run_json_reports_the_trainable_parameters(data, vocab_dir, tmp_path, mode, expected):
    result = finetune(
        data, vocab_dir, "--variant", "test-tiny", "--mode", mode, "--dry-run", "--json", "--out", tmp_path / "run"
    )
    assert result.exit_code == 0, result.output
    line = [l for l in result.stdout.splitlines() if l.startswith("{")][-1]
    report = json.loads(line)
    assert set(report) == {"mode", "trainable", "total"} and report["mode"] == mode
    assert 0 < report["trainable"] <= report["total"]
    if expected is not None:
        assert report["trainable"] == expected
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_prints_the_summary(data, vocab_dir):
    result = finetune(
        data, vocab_dir, "--variant", "test-tiny", "--mode", "lora", "--dry-run", "--set", "train.lora.rank=2"
    )
    assert result.exit_code == 0, result.output
    assert "trainable parameters" in result.output and "red. green. blue" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "half"], "--mode 'half'"),
        (["--json"], "--json goes with --dry-run"),
        (["--set", "train.nope=1", "--dry-run"], "unknown key 'nope'"),
        (["--set", "train.optimizer=adam", "--dry-run"], "train.optimizer: 'adam' is not one of adamw, sgd"),
        (["--set", "train.schedule=cosine", "--dry-run"], "is not one of plateau, multistep, constant"),
        (["--set", "train.lora.targets=[nothing]", "--mode", "lora", "--dry-run"], "matched no module"),
        (["--weights", "/nonexistent.pth", "--dry-run"], "file not found"),
    ],
)
def test_bad_input_is_one_line(data, vocab_dir, args, message):
    result = finetune(data, vocab_dir, "--variant", "test-tiny", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_finished_run_is_not_overwritten_without_force(data, vocab_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--variant", "test-tiny", "--mode", "linear", "--epochs", "1", "--batch-size", "4", "--out", out]
    assert finetune(data, vocab_dir, *args).exit_code == 0
    result_file = out / "result.json"
    first = result_file.read_text()
    again = finetune(data, vocab_dir, *args)
    assert again.exit_code == 2 and "holds a finished run" in again.output
    assert result_file.read_text() == first
    resumed = finetune(data, vocab_dir, *args, "--resume")
    assert resumed.exit_code == 2 and "finished run" in resumed.output
    forced = finetune(data, vocab_dir, *args, "--force")
    assert forced.exit_code == 0, forced.output
    assert (out / "weights.safetensors").exists() and (out / "curves.png").exists()


def test_unfinished_run_needs_resume_or_force(data, vocab_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--variant", "test-tiny", "--mode", "linear", "--epochs", "2", "--batch-size", "4", "--out", out]
    ann, images = data
    spec = RunSpec(
        mode="linear",
        ann=ann,
        images=images,
        variant="test-tiny",
        out=out,
        epochs=2,
        batch_size=4,
        tokenizer=str(vocab_dir),
        progress=False,
        sets=[s for s in SIZES if s != "--set"],
    )
    stopped = train_run(prepare(spec), stop_after_steps=1)  # as if killed after step 1
    assert stopped["status"] == "stopped" and not (out / "result.json").exists()
    again = finetune(data, vocab_dir, *args)
    assert again.exit_code == 2 and "unfinished run" in again.output
    done = finetune(data, vocab_dir, *args, "--resume")
    assert done.exit_code == 0, done.output
    assert json.loads((out / "result.json").read_text())["steps"] == 4


def test_few_shot_seeds_report_mean_and_std(data, vocab_dir, tmp_path):
    ann, images = data
    out = tmp_path / "seeds"
    result = finetune(
        data,
        vocab_dir,
        "--variant",
        "test-tiny",
        "--mode",
        "prompt",
        "--shots",
        "1",
        "--seeds",
        "3,30",
        "--epochs",
        "1",
        "--val-ann",
        ann,
        "--val-images",
        images,
        "--test-ann",
        ann,
        "--test-images",
        images,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [3, 30]
    assert set(summary["test_AP"]) == {"mean", "std", "n"} and summary["test_AP"]["n"] == 2
    for seed in (3, 30):
        res = json.loads((out / f"seed_{seed}" / "result.json").read_text())
        assert res["shuffle_seed"] == seed and res["shots"] == 1 and "test" in res
        cfg = json.loads((out / f"seed_{seed}" / "config.json").read_text())
        assert cfg["train"]["copies"] == 8  # the official 1-shot copies per epoch
    assert "mean ± std" in result.output


def _zeroshot_ap(weights, adapter, ann, images, vocab_dir, out):
    result = runner.invoke(
        app,
        [
            "zeroshot",
            "eval",
            "--weights",
            str(weights),
            "--adapter",
            str(adapter),
            "--ann",
            str(ann),
            "--images",
            str(images),
            "--tokenizer",
            str(vocab_dir),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--set",
            "evaluation.min_size=96",
            "--set",
            "evaluation.max_size=128",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("mode, lr", [("prompt", "0.2"), ("lora", "3e-3")])
def test_artifact_reproduces_its_val_ap_on_the_base_model(data, vocab_dir, base_weights, tmp_path, mode, lr):
    ann, images = data
    out = tmp_path / "run"
    result = finetune(
        data,
        vocab_dir,
        "--weights",
        base_weights,
        "--mode",
        mode,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--val-ann",
        ann,
        "--val-images",
        images,
        "--out",
        out,
        "--set",
        f"train.lr={lr}",
    )
    assert result.exit_code == 0, result.output
    res = json.loads((out / "result.json").read_text())
    artifact = out / ("prompt.safetensors" if mode == "prompt" else "lora")
    assert res["artifact"] == str(artifact) and artifact.exists()
    metrics = _zeroshot_ap(base_weights, out, ann, images, vocab_dir, tmp_path / "eval")
    assert res["best_val_AP"] > 0
    assert metrics["AP"] == pytest.approx(res["best_val_AP"], abs=1e-6 if mode == "prompt" else 2e-3)
    print(mode, res["best_val_AP"], metrics["AP"])
    # refused on another base
    torch.manual_seed(5)
    other = tmp_path / "other.safetensors"
    save_model(build_glip(variant_config("test-tiny")), other)
    refused = runner.invoke(
        app,
        [
            "zeroshot",
            "eval",
            "--weights",
            str(other),
            "--adapter",
            str(out),
            "--ann",
            str(ann),
            "--images",
            str(images),
            "--tokenizer",
            str(vocab_dir),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "eval2"),
        ],
    )
    assert refused.exit_code == 2 and "made for base weights" in refused.output


def test_pretrain_on_grounding_data(tmp_path, vocab_dir):
    ann, images = make_rectangles(
        tmp_path / "g", n_images=4, names=("red", "green"), size=(128, 96), box_range=(24, 44)
    )
    data = json.loads(ann.read_text())
    for img in data["images"]:
        img["caption"] = "a red box and a green box"
    for a in data["annotations"]:
        start = data["images"][0]["caption"].index("red" if a["category_id"] == 1 else "green")
        a["tokens_positive"] = [[start, start + (3 if a["category_id"] == 1 else 5)]]
    ann.write_text(json.dumps(data))
    out = tmp_path / "pre"
    result = invoke(
        "pretrain",
        "--ann",
        ann,
        "--images",
        images,
        "--variant",
        "test-tiny",
        "--tokenizer",
        vocab_dir,
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--out",
        out,
        *SIZES,
        "--set",
        "train.warmup_iters=1",
    )
    assert result.exit_code == 0, result.output
    res = json.loads((out / "result.json").read_text())
    assert res["steps"] == 2 and res["mode"] == "full" and (out / "weights.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["kind"] == "pretrain"
        and cfg["train"]["freeze_backbone_at"] == -1
        and cfg["trainable"] == cfg["total"] - 32 * 80 - 80
    )


def test_pretrain_on_detection_data_dry_run(data, vocab_dir):
    ann, images = data
    result = invoke(
        "pretrain",
        "--ann",
        ann,
        "--images",
        images,
        "--variant",
        "test-tiny",
        "--tokenizer",
        vocab_dir,
        "--dry-run",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["mode"] == "full"


def test_recipe_run_takes_the_official_settings(tmp_path, vocab_dir):
    """A recipe (ODinW-13 Aquarium) with its files under --data-root: the recipe's categories make
    the caption, 1-shot gives 8 copies per epoch, the best weights are evaluated on test."""
    import shutil

    from glip_transfer.recipes import load_recipe

    rec = load_recipe("odinw13/aquarium")
    names = [c.name for c in rec.categories]
    for split in ("train", "val", "test"):
        files = rec.split(split)
        ann, images = make_rectangles(
            tmp_path / "gen" / split,
            n_images=6,
            names=names,
            colour_of=[i % 4 for i in range(len(names))],
            size=(128, 96),
            box_range=(24, 44),
            seed=len(split),
        )
        (tmp_path / "data" / files.img_dir).mkdir(parents=True, exist_ok=True)
        for f in images.iterdir():
            shutil.copy(f, tmp_path / "data" / files.img_dir / f.name)
        shutil.copy(ann, tmp_path / "data" / files.ann_file)
    out = tmp_path / "run"
    args = [
        "finetune",
        "--recipe",
        "odinw13/aquarium",
        "--data-root",
        tmp_path / "data",
        "--variant",
        "test-tiny",
        "--tokenizer",
        vocab_dir,
        "--device",
        "cpu",
        "--mode",
        "linear",
        "--shots",
        "1",
        "--out",
        out,
        *SIZES,
    ]
    dry = invoke(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "fish. jellyfish. penguin. puffin. shark. starfish. stingray" in dry.output
    result = invoke(*args, "--epochs", "1")
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"] == "odinw13/Aquarium_Aquarium_Combined.v2-raw-1024.coco"
    assert (cfg["train"]["copies"], cfg["train"]["lr"], cfg["train"]["weight_decay"], cfg["train"]["batch_size"]) == (
        8,
        1e-4,
        0.05,
        4,
    )
    res = json.loads((out / "result.json").read_text())
    assert res["shots"] == 1 and "test" in res and (out / "test" / "metrics.json").exists()
    assert res["steps"] == cfg["images"] * 8 // 4
