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
    assert "trainable parameters" not in again.output  # refused before the model is built
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


def test_size_and_step_options_make_a_short_run(data, vocab_dir, tmp_path):
    """--min-size / --max-size set the training and evaluation sizes, --max-steps the run length."""
    ann, images = data
    out = tmp_path / "run"
    result = invoke("finetune", "--ann", ann, "--images", images, "--tokenizer", vocab_dir, "--device", "cpu",
                    "--variant", "test-tiny", "--min-size", "80", "--max-size", "144", "--max-steps", "1",
                    "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["train"]["min_sizes"], cfg["train"]["max_size"], cfg["train"]["max_steps"]) == ([80], 144, 1)
    assert (cfg["model"]["input"]["min_size"], cfg["model"]["input"]["max_size"]) == (80, 144)  # evaluation
    assert len([line for line in (out / "log.jsonl").read_text().splitlines() if '"step"' in line]) >= 1


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("finetune", ["--min-size", "0"], "--min-size 0: must be a whole number >= 1"),
        ("finetune", ["--min-size", "900", "--max-size", "500"], "--min-size 900 is larger than --max-size 500"),
        ("pretrain", ["--max-size", "-1"], "--max-size -1"),
        ("finetune", ["--tokenizer", "NO_TOKENIZER"], "no_tokenizer"),
        ("pretrain", ["--weights", "glip-xl"], "glip-xl"),
    ],
)
def test_bad_options_fail_before_the_model_is_built(
    data, vocab_dir, base_weights, tmp_path, monkeypatch, command, args, message
):
    import glip_transfer.training.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    monkeypatch.setattr(run, "build_glip", lambda *a, **k: pytest.fail("the model was built"))
    ann, images = data
    args = [tmp_path / "no_tokenizer" if a == "NO_TOKENIZER" else a for a in args]
    tokenizer = [] if "--tokenizer" in args else ["--tokenizer", vocab_dir]
    weights = [] if "--weights" in args else ["--weights", base_weights]
    result = invoke(command, "--ann", ann, "--images", images, *tokenizer, *weights, "--device", "cpu", *args,
                    "--out", tmp_path / "run")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- run folder: lock, disk, provenance


def test_a_run_folder_in_use_is_one_line_for_finetune_and_pretrain(data, vocab_dir, tmp_path):
    from glip_transfer.runlock import RunLock

    ann, images = data
    out = tmp_path / "run"
    args = ["--variant", "test-tiny", "--epochs", "1", "--batch-size", "4", "--out", out]
    with RunLock(out, command="glip finetune --out run"):
        results = [
            finetune(data, vocab_dir, "--mode", "linear", *args),
            invoke("pretrain", "--ann", ann, "--images", images, "--tokenizer", vocab_dir, "--device", "cpu", *SIZES,
                   *args),
        ]  # fmt: skip
        assert [p.name for p in out.iterdir()] == [".glip.lock"]  # the refused runs wrote nothing
    for result in results:
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "is in use by another glip run" in text, result.output
        assert "(glip finetune --out run" in text and "Traceback" not in result.output
        assert "trainable parameters" not in text  # refused before the model is built
        assert len([l for l in result.output.splitlines() if l.startswith("error:")]) == 1


def test_out_that_is_a_file_is_one_line_before_loading(data, vocab_dir, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    result = finetune(data, vocab_dir, "--variant", "test-tiny", "--mode", "linear", "--out", out)
    assert result.exit_code == 2 and "is a file; give a folder" in " ".join(result.output.split())
    assert "Traceback" not in result.output and out.read_text() == "mine"


def test_finished_run_keeps_one_copy_of_its_weights_and_records_its_provenance(data, vocab_dir, tmp_path):
    args = ["--variant", "test-tiny", "--mode", "full", "--epochs", "1", "--batch-size", "4", "--set", "train.lr=3e-4"]
    ann, images = data
    args += ["--val-ann", ann, "--val-images", images]
    lean, kept = tmp_path / "lean", tmp_path / "kept"
    assert finetune(data, vocab_dir, *args, "--out", lean).exit_code == 0
    assert finetune(data, vocab_dir, *args, "--out", kept, "--keep-checkpoints").exit_code == 0
    names = sorted(p.name for p in lean.iterdir())
    assert names == ["config.json", "curves.png", "log.jsonl", "result.json", "weights.safetensors"]
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["last.safetensors"]  # resumable, no best
    weights = (lean / "weights.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in lean.rglob("*") if p.is_file()) < 1.1 * weights

    result, config = (json.loads((lean / name).read_text()) for name in ("result.json", "config.json"))
    for record in (result["provenance"], config["provenance"]):
        assert record["kind"] == "finetune" and record["variant"] == "test-tiny" and record["mode"] == "full"
        assert record["weights"]["sha256"] == result["base_sha256"] and record["device"] == "cpu"
        assert "train.lr=3e-4" in record["overrides"] and record["train"]["lr"] == 3e-4
        assert record["train"]["epochs"] == 1 and record["evaluation"]["min_size"] == 96
        assert record["evaluation"]["batch_size"] == 1 and record["evaluation"]["precision"] == "float32"
        assert record["captions"] == [config["caption"]] and len(record["tokens_sha256"]) == 64
        assert record["data"]["train"]["sha256"] == record["data"]["val"]["sha256"] and record["recipe"]
        assert {"glip_transfer", "torch", "transformers"} <= set(record["versions"]) and record["date"]
        assert record["command"][0] == "glip"
    assert result["provenance"]["started"] == config["provenance"]["date"]


def test_a_full_disk_during_finetune_is_one_line_and_resume_finishes(data, vocab_dir, tmp_path):
    """A real write failure in a child process (a file-size limit: the checkpoint's write fails as
    on a full disk, safetensors' SafetensorError): one line, exit 2, what was written kept, and
    --resume finishes the run."""
    import os
    import subprocess
    import sys

    ann, images = data
    out = tmp_path / "run"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))\n"  # config.json fits, a checkpoint not
        "from glip_transfer.cli import main\n"
        "sys.argv = ['glip'] + sys.argv[1:]\n"
        "main()\n"
    )
    run_args = ["--variant", "test-tiny", "--mode", "full", "--epochs", "2", "--batch-size", "4", "--out", out]
    args = ["finetune", "--ann", ann, "--images", images, "--tokenizer", vocab_dir, "--device", "cpu", *SIZES]
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args + run_args)],
        capture_output=True,
        text=True,
        env={**os.environ, "GLIP_PROGRESS": "0"},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "File too large" in error[0] and "continue with --resume" in error[0], done.stderr
    assert (out / "config.json").exists() and (out / "log.jsonl").exists() and not (out / "result.json").exists()
    assert not list(out.rglob(".*.tmp"))  # no half-written file left behind
    resumed = finetune(data, vocab_dir, *run_args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert steps == [1, 2, 3, 4]


def test_zero_area_boxes_are_refused_as_zeroshot_refuses_them(data, vocab_dir, tmp_path):
    """One rule for both commands (load_coco's default): a degenerate box is one line naming it."""
    ann, images = data
    broken = json.loads(ann.read_text())
    broken["annotations"][0]["bbox"][2] = 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    result = invoke(
        "finetune", "--ann", bad, "--images", images, "--tokenizer", vocab_dir, "--device", "cpu",
        "--variant", "test-tiny", "--mode", "linear", "--dry-run",
    )  # fmt: skip
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "has a bbox with width or height <= 0" in text, result.output
    assert "Traceback" not in result.output
