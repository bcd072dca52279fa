"""What every command shares: the consoles, one-line errors and warnings, the help texts of the
options several commands take, and :func:`polish_help`. The library's own errors
(:data:`USER_ERRORS`) describe bad input; here they become one line and exit code 2."""

from __future__ import annotations

import functools
import inspect
import warnings

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup
from typer.models import ArgumentInfo, DefaultPlaceholder, OptionInfo

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


# --------------------------------------------------------------------------- help texts

WEIGHTS_HELP = "A name (glip weights list) or a file: official GLIP .pth or .safetensors."
VARIANT_HELP = "glip-t | glip-t-a | glip-l [default: detected from the weights]."
TOKENIZER_HELP = "BERT tokenizer: a folder with vocab.txt, or a hub id [default: bert-base-uncased]."
ADAPTER_HELP = "A glip finetune artifact, or its run folder, to apply (prompt offset, LoRA or weights)."
DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: CUDA when available, else CPU)."
WORKERS_HELP = "Image loading processes (0: in this process) [default: 1 on CPU, up to 8 on CUDA]."
DATA_ROOT_HELP = "Folder the recipe's paths are under (glip data download fills it)."
SIZE_HELP = (
    "Resize the short side to this many pixels (>= 1)...",
    "...unless the long side would then exceed this (>= --min-size)",
)


class _HelpFlag:
    """Typer shows the built-in ``--help`` as ``--help <bool>``; it is a flag: show no value."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class FlagHelpCommand(_HelpFlag, TyperCommand):
    pass


class FlagHelpGroup(_HelpFlag, TyperGroup):
    pass


def polish_help(app: typer.Typer) -> typer.Typer:
    """Make every command's help (sub-groups included) print as written: Rich markup in option,
    argument and command help is escaped (bracketed defaults such as ``[recipe: 200]`` and JSON
    examples would otherwise vanish), and flags show no ``<bool>`` value. Idempotent; returns
    ``app``."""
    if app.info.cls is None or isinstance(app.info.cls, DefaultPlaceholder) or app.info.cls is TyperGroup:
        app.info.cls = FlagHelpGroup
    commands = list(app.registered_commands)
    if app.registered_callback is not None:
        commands.append(app.registered_callback)
    for command in commands:
        if command.callback is None or getattr(command, "_polished", False):
            continue
        if command in app.registered_commands and command.cls in (None, TyperCommand):
            command.cls = FlagHelpCommand
        text = command.help if isinstance(command.help, str) else inspect.getdoc(command.callback)
        if text:  # Rich keeps single line breaks: a paragraph of the docstring becomes one line
            paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
            command.help = escape("\n\n".join(paragraphs))
        for parameter in inspect.signature(command.callback).parameters.values():
            info = parameter.default
            if not isinstance(info, (OptionInfo, ArgumentInfo)) or getattr(info, "_polished", False):
                continue
            if info.help:
                info.help = escape(info.help)
            if isinstance(info, OptionInfo) and parameter.annotation in (bool, "bool") and info.metavar is None:
                info.metavar = ""  # a flag takes no value: show none
            info._polished = True
        command._polished = True
    for group in app.registered_groups:
        polish_help(group.typer_instance)
    return app
