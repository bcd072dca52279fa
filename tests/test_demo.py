"""``glip demo`` (glip_transfer.demo and commands/demo.py): the report folder's guards, and the whole
demo end to end on the shipped glip-nano with a one-epoch budget."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from glip_transfer.cli import app
from glip_transfer.demo import DemoConfig, DemoError, check_out, plan, step_name
from glip_transfer.hub import PACKAGED_DIR

SHIPPED = (PACKAGED_DIR / "glip-nano.safetensors").is_file()


def glip(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"GLIP_PROGRESS": "0", **(env or {})})


def test_check_out_guards_the_report_folder(tmp_path):
    assert check_out(tmp_path / "new", force=False, resume=False) == "new"
    assert check_out(tmp_path, force=False, resume=False) == "new"  # empty
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match="not empty: pass --resume"):
        check_out(tmp_path, force=False, resume=False)
    with pytest.raises(DemoError, match="not a glip demo folder"):
        check_out(tmp_path, force=False, resume=True)
    assert check_out(tmp_path, force=True, resume=False) == "force"
    (tmp_path / "steps").mkdir()
    assert check_out(tmp_path, force=False, resume=True) == "resume"
    (tmp_path / "demo.json").write_text("{}")
    with pytest.raises(DemoError, match="finished demo"):
        check_out(tmp_path, force=False, resume=False)
    with pytest.raises(DemoError, match="is a file"):
        check_out(tmp_path / "notes.txt", force=True, resume=False)


def test_plan_zero_shot_on_both_targets_then_every_mode_on_shifted(tmp_path):
    steps = plan(DemoConfig(out=tmp_path, data_root=tmp_path))
    assert [step_name(*s) for s in steps] == ["novel-zeroshot", "shifted-zeroshot", "shifted-linear", "shifted-prompt",
                                              "shifted-lora", "shifted-full"]  # fmt: skip
    few = plan(DemoConfig(out=tmp_path, data_root=tmp_path, few_shot=True))
    assert len(few) == 2 + 4 * 3 * 4 and step_name(*few[2]) == "shifted-linear-1shot-seed3"


def test_cli_refuses_a_used_folder_before_any_work(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = glip("demo", "--out", tmp_path, "--data-root", tmp_path / "data")
    assert result.exit_code == 2 and "--force" in result.output and "Traceback" not in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine" and not (tmp_path / "data").exists()
    both = glip("demo", "--out", tmp_path, "--resume", "--force")
    assert both.exit_code == 2 and "exclude" in both.output


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="glip_transfer/weights/glip-nano.safetensors is not built yet")
def test_demo_end_to_end_with_a_one_epoch_budget(tmp_path):
    out, data = tmp_path / "demo", tmp_path / "data"
    result = glip("demo", "--out", out, "--data-root", data, "--epochs", "1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {"targets", "results"} and set(summary["targets"]) == {"demo/novel", "demo/shifted"}
    rows = {r["mode"]: r for r in summary["results"]}
    assert list(rows) == ["zeroshot", "linear", "prompt", "lora", "full"]
    for r in rows.values():
        assert set(r) == {"mode", "trainable", "ap", "ap50", "seconds"} and 0.0 <= r["ap"] <= r["ap50"] <= 1.0
    trainable = {m: r["trainable"] for m, r in rows.items()}
    assert (
        trainable["zeroshot"] == 0 < trainable["prompt"] < trainable["full"] and trainable["linear"] < trainable["full"]
    )
    for name in ("report.md", "ap_vs_trainable.png", "demo.json"):
        assert (out / name).is_file()
    assert len(list((out / "examples").glob("*.png"))) == 3
    report = (out / "report.md").read_text()
    assert "glip finetune --recipe demo/shifted --weights glip-nano --mode prompt" in report

    again = glip("demo", "--out", out, "--data-root", data, "--epochs", "1")
    assert again.exit_code == 2 and "finished demo" in again.output
    # resuming reuses the finished steps: the same numbers, nothing retrained
    resumed = glip("demo", "--out", out, "--data-root", data, "--epochs", "1", "--json", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["results"] == summary["results"]
    # a step made with other settings is never reported: a changed budget is refused
    other = glip("demo", "--out", out, "--data-root", data, "--epochs", "2", "--resume")
    assert other.exit_code == 2 and "other settings" in other.output
