"""Kill-and-resume: a run stopped mid-epoch and resumed ends with exactly the weights of an
uninterrupted run (same seed, same machine); a corrupt ``last`` falls back to ``last.prev``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glip_transfer.training.run import RunSpec, prepare, train_run
from glip_transfer.training.state import load_state_file
from synthetic import make_rectangles


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_rectangles(
        tmp_path_factory.mktemp("data"), n_images=6, names=("red", "green", "blue"), size=(128, 96), box_range=(24, 44)
    )


def run(
    data,
    vocab_dir,
    out: Path,
    mode: str,
    *sets: str,
    resume: bool = False,
    force: bool = True,
    stop_after_steps: int = 0,
) -> dict:
    ann, images = data
    spec = RunSpec(
        mode=mode,
        ann=ann,
        images=images,
        val_ann=ann,
        val_images=images,
        variant="test-tiny",
        out=out,
        epochs=3,
        batch_size=2,
        force=force,
        resume=resume,
        tokenizer=str(vocab_dir),
        progress=False,
        sets=[
            "train.min_sizes=[64,96]",
            "train.max_size=160",
            "evaluation.min_size=96",
            "evaluation.max_size=128",
            "train.lr=2e-3",
            "train.ema=0.9",
            "train.early_stop_patience=0",
            "train.checkpoint_every_steps=2",
            *sets,
        ],
    )
    return train_run(prepare(spec), stop_after_steps=stop_after_steps)


def params(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_state_file(path)
    return tensors


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = params(a / "checkpoints" / "last.safetensors"), params(b / "checkpoints" / "last.safetensors")
    keys = [k for k in ta if not k.startswith("rng/")]
    assert set(keys) == {k for k in tb if not k.startswith("rng/")}
    different = [k for k in keys if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]
    la = [json.loads(l) for l in (a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (b / "log.jsonl").read_text().splitlines()]
    drop = ("time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in la] == [
        {k: v for k, v in r.items() if k not in drop} for r in lb
    ]
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    assert ra["best_val_AP"] == rb["best_val_AP"] and ra["steps"] == rb["steps"] == 9


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stopped_and_resumed_run_equals_uninterrupted(data, vocab_dir, tmp_path, mode):
    uninterrupted = run(data, vocab_dir, tmp_path / "a", mode)
    assert uninterrupted["status"] == "finished"
    stopped = run(data, vocab_dir, tmp_path / "b", mode, stop_after_steps=4)  # mid-epoch (3 batches per epoch)
    assert stopped == {"status": "stopped", "step": 4, "out": str(tmp_path / "b")}
    assert not (tmp_path / "b" / "result.json").exists()
    resumed = run(data, vocab_dir, tmp_path / "b", mode, resume=True, force=False)
    assert resumed["status"] == "finished"
    assert_same_run(tmp_path / "a", tmp_path / "b")
    artifact = "weights.safetensors" if mode == "full" else "lora/adapter_model.safetensors"
    wa, wb = load_file(tmp_path / "a" / artifact), load_file(tmp_path / "b" / artifact)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_corrupt_last_falls_back_to_the_previous_checkpoint(data, vocab_dir, tmp_path):
    run(data, vocab_dir, tmp_path / "a", "full")
    run(data, vocab_dir, tmp_path / "b", "full", stop_after_steps=5)
    ckpt = tmp_path / "b" / "checkpoints"
    assert (ckpt / "last.prev.safetensors").exists()
    raw = (ckpt / "last.safetensors").read_bytes()
    (ckpt / "last.safetensors").write_bytes(raw[: len(raw) // 3])  # a torn write
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        resumed = run(data, vocab_dir, tmp_path / "b", "full", resume=True, force=False)
    assert resumed["status"] == "finished"
    assert_same_run(tmp_path / "a", tmp_path / "b")  # replayed from step 4: the same end
