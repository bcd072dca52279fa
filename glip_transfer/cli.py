"""The ``glip`` command line."""

from __future__ import annotations

import typer

from . import __version__
from .commands.common import polish_help
from .commands.config import app as config_app
from .commands.data import app as data_app
from .commands.demo import demo_command
from .commands.inspect import inspect_command
from .commands.predict import predict_command
from .commands.recipes import app as recipes_app
from .commands.train import finetune_command, pretrain_command
from .commands.weights import app as weights_app
from .commands.zeroshot import app as zeroshot_app
from .commands.zeroshot import eval_command

app = typer.Typer(
    name="glip",
    help="GLIP in pure PyTorch: predict, zero-shot evaluation, prompt tuning and fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        def installed(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        typer.echo(
            f"glip-transfer {__version__} (torch {installed('torch')}, transformers {installed('transformers')})"
        )
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """GLIP in pure PyTorch: predict, zero-shot evaluation, prompt tuning and fine-tuning."""


app.command("demo")(demo_command)
app.command("predict")(predict_command)
app.add_typer(zeroshot_app, name="zeroshot")
app.command("eval", help="The same as glip zeroshot eval: COCO AP of a model on a dataset.")(eval_command)
app.command("finetune")(finetune_command)
app.command("pretrain")(pretrain_command)
app.add_typer(recipes_app, name="recipes", help="List and show the dataset recipes.")
app.command("inspect")(inspect_command)
app.add_typer(weights_app, name="weights")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
polish_help(app)  # last: every command registered above prints its help as written


def main() -> None:  # pragma: no cover - the console script
    from .allocator import keep_freed_memory

    keep_freed_memory()  # batches reuse the memory of the last one (no page faults per forward)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
