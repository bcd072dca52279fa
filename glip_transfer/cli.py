"""The ``glip`` command line."""

from __future__ import annotations

import typer

from .commands.data import app as data_app
from .commands.inspect import inspect_command
from .commands.predict import predict_command
from .commands.recipes import app as recipes_app
from .commands.train import finetune_command, pretrain_command
from .commands.zeroshot import app as zeroshot_app

app = typer.Typer(
    name="glip",
    help="GLIP in pure PyTorch: predict, zero-shot evaluation, prompt tuning and fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

app.command("predict")(predict_command)
app.add_typer(zeroshot_app, name="zeroshot")
app.command("finetune")(finetune_command)
app.command("pretrain")(pretrain_command)
app.add_typer(recipes_app, name="recipes", help="List and show the dataset recipes.")
app.command("inspect")(inspect_command)
app.add_typer(data_app, name="data")


def main() -> None:  # pragma: no cover - the console script
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
