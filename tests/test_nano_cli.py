"""The real CLI end to end on the shipped glip-nano (a model that has learnt something) and the
demo targets' data, with tiny budgets: predict, zero-shot evaluation with the recipe's default
weights, fine-tuning in every mode, the adapter round trip, resume."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from glip_transfer.cli import app
from glip_transfer.hub import PACKAGED_DIR

pytestmark = pytest.mark.skipif(
    not (PACKAGED_DIR / "glip-nano.safetensors").is_file(),
    reason="glip_transfer/weights/glip-nano.safetensors is not built yet",
)
runner = CliRunner()
NOVEL_AP50_FLOOR = 0.3  # measured: see benchmarks/results/nano_pretrain.md
BUDGET = [
    "--epochs",
    "1",
    "--set",
    "train.max_steps=6",
    "--set",
    "train.amp=false",
    "--set",
    "train.workers=0",
    "--set",
    "train.min_sizes=[160]",
    "--set",
    "train.max_size=160",
]  # glip-nano's input size


def glip(*args):
    return runner.invoke(app, [str(a) for a in args], env={"GLIP_PROGRESS": "0"})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The demo targets rendered once (a zero-shot evaluation renders them on first use)."""
    root = tmp_path_factory.mktemp("data")
    for target in ("demo/novel", "demo/shifted"):
        out = root / "zs" / target.replace("/", "_")
        result = glip("zeroshot", "eval", "--recipe", target, "--data-root", root, "--out", out, "--device", "cpu",
                      "--batch-size", "8")  # fmt: skip
        assert result.exit_code == 0, result.output
    return root


def zeroshot_metrics(data_root, target: str) -> dict:
    return json.loads((data_root / "zs" / target.replace("/", "_") / "metrics.json").read_text())


def test_zeroshot_eval_takes_the_recipes_glip_nano_and_detects_unseen_combinations(data_root):
    novel = zeroshot_metrics(data_root, "demo/novel")
    assert novel["provenance"]["weights"]["given"] == "glip-nano"
    assert novel["AP50"] > NOVEL_AP50_FLOOR  # known words in unseen colour-shape pairs
    shifted = zeroshot_metrics(data_root, "demo/shifted")
    assert shifted["AP50"] < novel["AP50"]  # shape words it never saw


def test_predict_finds_the_named_shape(data_root, tmp_path):
    ann = json.loads((data_root / "synth/novel/test.json").read_text())
    image = ann["images"][0]
    names = {c["id"]: c["name"] for c in ann["categories"]}
    truth = [a for a in ann["annotations"] if a["image_id"] == image["id"]]
    classes = sorted({names[a["category_id"]] for a in truth})
    out = tmp_path / "dets.json"
    result = glip("predict", data_root / "synth/novel/test" / image["file_name"], "--weights", "glip-nano", "--classes",
                  ",".join(classes), "--threshold", "0.2", "--device", "cpu", "--json", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    dets = json.loads(out.read_text())[0]["detections"]
    best = max(dets, key=lambda d: d["score"])
    assert any(_iou(best["box"], _xyxy(a["bbox"])) > 0.5 and names[a["category_id"]] == best["label"] for a in truth)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["linear", "prompt", "lora", "full"])
def test_finetune_every_mode_on_glip_nano(data_root, tmp_path, tiny_weights, vocab_dir, mode):
    out = tmp_path / mode
    result = glip("finetune", "--recipe", "demo/shifted", "--mode", mode, "--data-root", data_root, "--out", out,
                  "--device", "cpu", *BUDGET)  # fmt: skip
    assert result.exit_code == 0, result.output
    res = json.loads((out / "result.json").read_text())
    assert res["steps"] == 6 and res["base_sha256"] and 0 < res["trainable"] < res["total"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r.get("type") == "step"]
    assert all(loss == loss for loss in losses)  # finite
    if mode == "prompt":  # the adapter round trip: the artifact on the base model gives the run's test AP
        again = glip("zeroshot", "eval", "--recipe", "demo/shifted", "--adapter", out, "--data-root", data_root,
                     "--out", tmp_path / "eval", "--device", "cpu", "--batch-size", "8")  # fmt: skip
        assert again.exit_code == 0, again.output
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert metrics["AP"] == pytest.approx(res["test"]["AP"], abs=1e-6)
        # a glip-nano adapter on other weights is refused, naming both variants
        refused = glip("zeroshot", "eval", "--recipe", "demo/shifted", "--adapter", out, "--weights", tiny_weights,
                       "--tokenizer", vocab_dir, "--data-root", data_root, "--out", tmp_path / "eval2",
                       "--device", "cpu")  # fmt: skip
        assert refused.exit_code == 2 and "made for glip-nano, not test-tiny" in refused.output


def test_resume_continues_a_stopped_glip_nano_run(data_root, tmp_path):
    from glip_transfer.training.run import RunSpec, prepare, train_run

    out = tmp_path / "run"
    sets = ["train.max_steps=4", "train.amp=false", "train.workers=0", "train.min_sizes=[160]", "train.max_size=160"]
    spec = RunSpec(mode="prompt", recipe="demo/shifted", out=out, epochs=1, sets=sets, data_root=data_root,
                   device="cpu", progress=False)  # fmt: skip
    stopped = train_run(prepare(spec), stop_after_steps=2)
    assert stopped["status"] == "stopped" and not (out / "result.json").exists()
    args = ["finetune", "--recipe", "demo/shifted", "--mode", "prompt", "--data-root", data_root, "--out", out,
            "--device", "cpu", "--epochs", "1"] + [x for s in sets for x in ("--set", s)]  # fmt: skip
    refused = glip(*args)
    assert refused.exit_code == 2 and "--resume" in refused.output
    done = glip(*args, "--resume")
    assert done.exit_code == 0, done.output
    assert json.loads((out / "result.json").read_text())["steps"] == 4


def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
