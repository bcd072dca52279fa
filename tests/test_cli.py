"""The ``glip`` command as a whole: every command's help prints each option's text as written,
every option has one, ``--version``, the ``glip eval`` alias, ``glip config show`` and the
``--set`` errors that show the expected syntax."""

from __future__ import annotations

import json

import click
import pytest
import typer
from typer.testing import CliRunner

import glip_transfer
from glip_transfer.cli import app
from glip_transfer.config import ConfigError, override_dataclass
from glip_transfer.training.config import TrainConfig

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # not TERMINAL_WIDTH: Typer reads it once, for every later help


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)


def commands(group: click.Command, path: tuple[str, ...] = ()):
    """Every command under ``group``: ``(path, command)``."""
    subcommands = getattr(group, "commands", None)
    if not subcommands:
        yield path, group
        return
    yield path, group
    for name, command in subcommands.items():
        yield from commands(command, path + (name,))


ALL = list(commands(typer.main.get_command(app)))


def plain(text: str) -> str:
    """Rendered help as one line of words (panel borders and wrapping removed)."""
    for char in "│╭╮╰╯─":
        text = text.replace(char, " ")
    return " ".join(text.split())


def test_every_command_is_listed():
    paths = {" ".join(path) for path, _ in ALL}
    expected = ("predict", "eval", "zeroshot eval", "finetune", "pretrain", "config show", "weights list", "data list")
    assert set(expected) <= paths


@pytest.mark.parametrize("path, command", ALL, ids=[" ".join(p) or "glip" for p, _ in ALL])
def test_help_prints_every_option_as_written(path, command):
    result = invoke(*path, "--help", env=WIDE)
    assert result.exit_code == 0, result.output
    shown = plain(result.output)
    for param in command.params:
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        written = getattr(param, "help", None)
        assert written, f"glip {' '.join(path)}: {param.opts or param.name} has no description"
        # the help as the source wrote it (Rich's escapes removed): brackets and braces survive
        expected = " ".join(written.replace("\\[", "[").split())
        assert expected in shown, f"glip {' '.join(path)} {param.opts}: {expected!r} not in the help"


def test_bracketed_defaults_survive_in_the_help():
    finetune = plain(invoke("finetune", "--help", env=WIDE).output)
    assert "[default: the recipe's, 200 for ODinW]" in finetune
    assert "[default: runs/finetune/RECIPE/MODE]" in finetune
    assert "train.min_sizes=[320]" in finetune
    zeroshot = plain(invoke("zeroshot", "eval", "--help", env=WIDE).output)
    assert 'Also write {"<dataset>": [results]} to this file.' in zeroshot


@pytest.mark.parametrize("command", [["finetune"], ["zeroshot", "eval"], ["zeroshot"], ["predict"], []])
def test_flags_take_no_value_in_the_help(command):
    shown = invoke(*command, "--help", env=WIDE).output
    assert "--help" in shown
    for line in shown.splitlines():
        if any(flag in line for flag in ("--resume", "--dry-run", "--force", "--help", "--version")):
            assert "<bool>" not in line and "BOOLEAN" not in line, line


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.startswith(f"glip-transfer {glip_transfer.__version__} (torch ")


def test_eval_is_zeroshot_eval():
    alias = {p.name for p in dict(ALL)[("eval",)].params}
    full = {p.name for p in dict(ALL)[("zeroshot", "eval")].params}
    assert alias == full
    result = invoke("eval")
    assert result.exit_code == 2 and "give --recipe NAME, or --ann FILE with --images DIR" in result.output


def test_config_show_lists_every_key_with_its_default():
    result = invoke("config", "show", "--recipe", "odinw13/aquarium", "--mode", "prompt", "--json")
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)
    assert settings["train.lr"] == 0.05  # the recipe's prompt-tuning rate, not TrainConfig's default
    assert settings["train.min_sizes"] == [480, 560, 640, 720, 800]
    assert settings["train.max_steps"] == 0
    assert settings["evaluation.min_size"] == 800 and settings["model.input.min_size"] == 800
    assert settings["model.postprocess.detections_per_img"] == 100
    assert settings["tuning.modes.full.lr"] == 0.0001
    for field in TrainConfig.__dataclass_fields__:
        assert any(key == f"train.{field}" or key.startswith(f"train.{field}.") for key in settings), field
    table = invoke("config", "show", "--set", "train.min_sizes=[320]", env=WIDE)
    assert table.exit_code == 0, table.output
    assert "train.min_sizes" in table.output and "[320]" in table.output
    assert "model.head.gradient_checkpointing" in table.output
    pretrain = json.loads(invoke("config", "show", "--pretrain", "--json").stdout)
    assert pretrain["train.batch_size"] == 64


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.min_sizes=320"], "write it as e.g. --set train.min_sizes=[480,560]"),
        (["--set", "evaluation.min_size=abc"], "write it as e.g. --set evaluation.min_size=800"),
        (["--set", "train.nope=1"], "glip config show lists every key"),
        (["--set", "model.head=3"], "model.head is a section: set one of its keys (channels,"),
        (
            ["--recipe", "odinw13/aquarium", "--set", "evaluation.detections_per_img=many"],
            "write it as e.g. --set evaluation.detections_per_img=100",
        ),
        (["--recipe", "odinw13/aquarium", "--set", "tuning.few_shot_copies=3"], "expected {shots: copies}"),
        (["--mode", "half"], "--mode 'half'"),
        (["--set", "foo.bar=1"], "give --recipe NAME"),
        (["--set", "model.postprocess.nms_thresh=2"], "postprocess.nms_thresh must be in [0, 1], got 2.0"),
        (["--set", "model.postprocess.pre_nms_thresh=.nan"], "postprocess.pre_nms_thresh must be in [0, 1], got nan"),
        (["--set", "model.postprocess.detections_per_img=0"], "there is no unlimited value"),
        (["--set", "model.input.min_size=0"], "need 1 <= min_size <= max_size"),
        (["--set", "train.max_steps=-1"], "train.max_steps must be >= 0 (0: all epochs), got -1"),
        (["--set", "train.max_size=100"], "train.max_size must be >= every train.min_sizes"),
    ],
)
def test_set_errors_show_the_expected_syntax(args, message):
    result = invoke("config", "show", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_override_error_names_the_override():
    with pytest.raises(ConfigError, match=r"train.min_sizes=\[480,560\]"):
        override_dataclass(TrainConfig(), ["lr=0.1", "min_sizes=320"], "train")
