"""Kill-and-resume: a run stopped mid-epoch and resumed ends with exactly the weights of an
uninterrupted run (same seed, same machine); a corrupt ``last`` is one line naming --force."""

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
    keep_checkpoints: bool = True,
    progress: bool = False,
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
        progress=progress,
        keep_checkpoints=keep_checkpoints,
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


def test_corrupt_last_is_one_line_naming_force(data, vocab_dir, tmp_path):
    from glip_transfer.checkpoint import CheckpointError

    run(data, vocab_dir, tmp_path / "b", "full", stop_after_steps=5)
    ckpt = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.safetensors", "last.safetensors"]  # no last.prev
    raw = (ckpt / "last.safetensors").read_bytes()
    (ckpt / "last.safetensors").write_bytes(raw[: len(raw) // 3])  # damaged on disk
    with pytest.raises(CheckpointError, match="cannot be resumed; start it again with --force"):
        run(data, vocab_dir, tmp_path / "b", "full", resume=True, force=False)


def test_resume_refuses_a_changed_learning_rate_and_applies_a_longer_run(data, vocab_dir, tmp_path):
    """The restored optimiser and schedule follow the saved learning rate: a resume with another
    is refused (naming it and --force) before anything is written; a longer run is applied, logged,
    and config.json records what trained."""
    from glip_transfer.config import ConfigError
    from glip_transfer.training.report import read_log

    out = tmp_path / "b"
    run(data, vocab_dir, out, "lora", stop_after_steps=4)
    config = (out / "config.json").read_text()
    log = (out / "log.jsonl").read_text()
    refused = r"cannot resume with changed settings \(train\.lr 0\.002 → 0\.001\).*--force"
    with pytest.raises(ConfigError, match=refused):
        run(data, vocab_dir, out, "lora", "train.lr=1e-3", resume=True, force=False)
    assert (out / "config.json").read_text() == config and (out / "log.jsonl").read_text() == log
    resumed = run(data, vocab_dir, out, "lora", "train.epochs=4", resume=True, force=False)
    assert resumed["status"] == "finished" and resumed["steps"] == 12
    assert {"type": "resume", "step": 4, "applied": {"train.epochs": {"saved": 3, "now": 4}}} in read_log(
        out / "log.jsonl"
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == saved["provenance"]["train"]["epochs"] == 4
    first = json.loads(config)["provenance"]["date"]
    result = json.loads((out / "result.json").read_text())
    assert saved["provenance"]["started"] == result["provenance"]["started"] == first  # the first start
    assert saved["train"]["lr"] == 2e-3


def test_the_progress_bar_of_a_resumed_run_counts_to_its_total(data, vocab_dir, tmp_path, monkeypatch):
    """Resumed at step 4 of 9, the bar starts at 4 and ends at 9 (never past its total)."""
    from rich.progress import Progress

    import glip_transfer.training.engine as engine

    seen = []

    class Recording(Progress):
        def add_task(self, description, **kw):
            seen.append(("add", kw.get("total"), kw.get("completed")))
            return super().add_task(description, **kw)

        def update(self, task_id, **kw):
            if "completed" in kw:
                seen.append(("update", self._tasks[task_id].total, kw["completed"]))
            return super().update(task_id, **kw)

    monkeypatch.setattr(engine, "progress_bar", lambda: Recording(disable=True))
    run(data, vocab_dir, tmp_path / "b", "lora", stop_after_steps=4, progress=True)
    seen.clear()
    run(data, vocab_dir, tmp_path / "b", "lora", resume=True, force=False, progress=True)
    assert seen[0] == ("add", 9, 4)
    assert [c for _, _, c in seen[1:]] == [5, 6, 7, 8, 9] and all(c <= total for _, total, c in seen)


def test_a_full_disk_says_how_to_continue_once(data, vocab_dir, tmp_path, monkeypatch):
    import errno

    import glip_transfer.training.engine as engine
    from glip_transfer.files import OutputError, output_error

    def full(folder, tensors, state):
        raise output_error(folder / "last.safetensors", OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(engine, "save_last", full)
    with pytest.raises(OutputError) as failed:
        run(data, vocab_dir, tmp_path / "b", "lora")
    assert str(failed.value).endswith(
        "last.safetensors: No space left on device; what was written before is kept: free some space and continue "
        "with --resume"
    )
    assert (tmp_path / "b" / "log.jsonl").exists() and not (tmp_path / "b" / ".glip.lock").exists()  # lock released


def test_a_checkpoint_of_an_earlier_version_is_judged_by_its_training_settings(data, vocab_dir, tmp_path):
    """Checkpoints written before the provenance record carry only the training settings: those
    decide (a changed lr is refused), and the run resumes to the uninterrupted result."""
    from glip_transfer.config import ConfigError
    from glip_transfer.training.state import save_state_file

    run(data, vocab_dir, tmp_path / "a", "lora")
    run(data, vocab_dir, tmp_path / "b", "lora", stop_after_steps=4)
    last = tmp_path / "b" / "checkpoints" / "last.safetensors"
    tensors, state = load_state_file(last)
    del state["provenance"]
    save_state_file(last, tensors, state)
    with pytest.raises(ConfigError, match=r"train\.lr 0\.002 → 0\.001"):
        run(data, vocab_dir, tmp_path / "b", "lora", "train.lr=1e-3", resume=True, force=False)
    assert run(data, vocab_dir, tmp_path / "b", "lora", resume=True, force=False)["status"] == "finished"
    assert_same_run(tmp_path / "a", tmp_path / "b")
