"""What every command shares: the consoles, one-line errors and warnings. The library's own
errors (:data:`USER_ERRORS`) describe bad input; here they become one line and exit code 2."""

from __future__ import annotations

import functools
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError
from ..files import OutputError
from ..prompts import PromptError
from ..runlock import RunLocked

console = Console(stderr=False)
err_console = Console(stderr=True)

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    CheckpointError,
    DataError,
    PromptError,
    FileNotFoundError,
    OutputError,
    RunLocked,
)
"""Exceptions that describe bad input (recipe and adapter errors are subclasses), an output that
cannot be written (a full disk) and a run folder in use: shown as one line, never as a stack trace."""


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` (the message as plain text: brackets in it are not Rich markup)
    and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one readable line (no source location), on stderr."""
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """``warning: message`` on stderr, the message as plain text."""
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """``note: message`` on stderr, the message as plain text (names from data may hold brackets)."""
    err_console.print(f"[yellow]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


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
        except USER_ERRORS as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper
