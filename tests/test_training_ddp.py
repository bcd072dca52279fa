"""``torchrun --nproc_per_node 2`` (DDP, gloo on CPU) gives the weights of a single process with the
same global batch. Every image of the test has the same size and dropout is off, so the two runs
compute the same function (per-process padding and dropout masks would otherwise differ)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from glip_transfer.training.state import load_state_file
from synthetic import make_rectangles

pytestmark = pytest.mark.slow  # two training runs in subprocesses, ~40 s on 2 cores


def launch(args: list[str], processes: int, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLIP_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if processes > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "glip_transfer",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "glip_transfer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, vocab_dir):
    ann, images = make_rectangles(
        tmp_path / "data", n_images=8, names=("red", "green", "blue"), size=(128, 96), box_range=(24, 44)
    )
    common = [
        "finetune",
        "--ann",
        str(ann),
        "--images",
        str(images),
        "--variant",
        "test-tiny",
        "--tokenizer",
        str(vocab_dir),
        "--mode",
        "full",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--force",
        "--set",
        "train.lr=1e-3",
        "--set",
        "train.min_sizes=[96]",
        "--set",
        "train.max_size=160",
        "--set",
        "train.dropout=0.0",
    ]
    one = launch(common + ["--out", str(tmp_path / "one")], 1, tmp_path)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    two = launch(common + ["--out", str(tmp_path / "two")], 2, tmp_path)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]

    a, _ = load_state_file(tmp_path / "one" / "checkpoints" / "last.safetensors")
    b, _ = load_state_file(tmp_path / "two" / "checkpoints" / "last.safetensors")
    keys = [k for k in a if k.startswith("param/")]
    assert keys and keys == [k for k in b if k.startswith("param/")]
    worst = max((a[k] - b[k]).abs().max().item() for k in keys)
    assert worst < 1e-4, worst
    la = [json.loads(l) for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["world_size"] == 2
    # only rank 0 wrote: one log line per step, one result
    assert json.loads((tmp_path / "two" / "result.json").read_text())["steps"] == 4
