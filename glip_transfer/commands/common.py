"""What every command shares: one-line errors, the console, devices, progress bars."""

from __future__ import annotations

import functools
import os
import warnings

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=False)
err_console = Console(stderr=True)


def user_error_types() -> tuple[type, ...]:
    """Exceptions that describe bad input: shown as one line, never as a stack trace."""
    from ..checkpoint import CheckpointError
    from ..config import ConfigError

    from importlib import import_module

    types: list[type] = [ConfigError, CheckpointError, FileNotFoundError]
    for module, name in (("..data", "DataError"), ("..prompts", "PromptError"), ("..recipes", "RecipeError")):
        try:
            types.append(getattr(import_module(module, __package__), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one readable line (no source location), on stderr."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def handle_errors(fn):
    """Turn user errors into a one-line message and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.showwarning = show_warning
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: what was written so far is kept")
            raise typer.Exit(130)
        except user_error_types() as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper


def resolve_device(name: str):
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def default_tokenizer(given: str | None = None, fallback: str = "bert-base-uncased") -> str:
    """The tokenizer to use: ``--tokenizer``, else ``$GLIP_TOKENIZER``, else the model's own."""
    return given or os.environ.get("GLIP_TOKENIZER") or fallback


class RateColumn(ProgressColumn):
    """Throughput of a task: completed units per second (the task's ``unit`` field, default "it")."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:.2f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        RateColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        transient=transient,
        disable=os.environ.get("GLIP_PROGRESS", "") == "0",
    )
