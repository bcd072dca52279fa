"""Every transfer mode learns (test-tiny on CPU, small synthetic datasets).

1. ``full`` from random weights learns coloured rectangles named "red", "green", "blue": AP50 on
   the training images goes from 0 to well above 0.5 (this model is then the base).
2. From that base, each mode transfers to a shifted task — the same kinds of images, but the
   caption's categories are renamed and bound to other colours ("sky" = blue, "apple" = red,
   "leaf" = green, so the base's habits are wrong) — and its AP rises well above the base's
   starting AP within tens of steps; LoRA reaches AP50 > 0.5. The learning rates are raised with
   ``--set`` (the official ones are for thousands of steps, these runs have tens).
"""

from __future__ import annotations

import pytest
import torch

from glip_transfer.checkpoint import load_model, save_model
from glip_transfer.training.artifacts import apply_adapter
from glip_transfer.training.evaluate import evaluate
from glip_transfer.training.report import read_log
from glip_transfer.training.run import RunSpec, prepare, train_run
from synthetic import make_rectangles

pytestmark = pytest.mark.slow  # about two minutes on 2 cores

SIZES = ["train.min_sizes=[128]", "train.max_size=200", "evaluation.min_size=128", "evaluation.max_size=160"]


def train(ann, images, vocab_dir, out, mode, epochs, *sets, weights=None):
    spec = RunSpec(
        mode=mode,
        ann=ann,
        images=images,
        val_ann=ann,
        val_images=images,
        variant="test-tiny",
        weights=weights,
        out=out,
        epochs=epochs,
        batch_size=4,
        force=True,
        tokenizer=str(vocab_dir),
        progress=False,
        sets=[*SIZES, "train.early_stop_patience=0", "train.eval_before=true", *sets],
    )
    prep = prepare(spec)
    summary = train_run(prep)
    history = [r for r in _log(out) if r.get("type") == "eval"]
    return prep, summary, history


def _log(out):
    return read_log(out / "log.jsonl")


@pytest.fixture(scope="module")
def base(tmp_path_factory, vocab_dir):
    root = tmp_path_factory.mktemp("learn")
    ann, images = make_rectangles(root / "base", n_images=12, names=("red", "green", "blue"))
    prep, summary, history = train(
        ann, images, vocab_dir, root / "run_base", "full", 32, "train.lr=1e-3", "train.eval_every_epochs=8"
    )
    path = root / "base.safetensors"
    save_model(prep.model, path)  # the best weights (loaded after training)
    return {"weights": path, "summary": summary, "history": history, "root": root}


@pytest.fixture(scope="module")
def shifted(base):
    return make_rectangles(
        base["root"] / "shifted", n_images=12, names=("sky", "apple", "leaf"), colour_of=(2, 0, 1), seed=1
    )


def test_full_learns_from_scratch(base):
    start, best = base["history"][0], max(r["AP50"] for r in base["history"][1:])
    assert start.get("start") and start["AP50"] < 0.1
    assert best > 0.5, base["history"]


@pytest.mark.parametrize(
    "mode, epochs, sets",
    [
        ("prompt", 10, ["train.lr=0.2"]),
        ("linear", 10, ["train.lr=1e-2"]),
        ("text", 10, ["train.lr=1e-3"]),
        ("lora", 12, ["train.lr=5e-3"]),
    ],
)
def test_mode_transfers_to_a_shifted_task(base, shifted, vocab_dir, mode, epochs, sets):
    ann, images = shifted
    out = base["root"] / f"run_{mode}"
    prep, summary, history = train(
        ann, images, vocab_dir, out, mode, epochs, *sets, "train.eval_every_epochs=5", weights=base["weights"]
    )
    start = history[0]
    assert start.get("start")
    best_ap = summary["best_val_AP"]
    best50 = max(r["AP50"] for r in history[1:])
    assert best_ap >= start["AP"] + 0.08 and best_ap >= 1.4 * start["AP"], (start, history)
    if mode == "lora":
        assert best50 > 0.5, history
    if mode == "prompt":
        # the saved offset on the untouched base model gives the recorded val AP
        model, _ = load_model(base["weights"], overrides=["input.min_size=128", "input.max_size=160"])
        model = apply_adapter(
            model, out / "prompt.safetensors", weights=base["weights"], captions=prep.encoded.captions
        )
        _, metrics = evaluate(model, prep.val, prep.encoded, batch_size=4, device=torch.device("cpu"))
        assert metrics["AP"] == pytest.approx(best_ap, abs=1e-9)
