"""``glip config show``: every ``--set`` key with the value a run would use."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from ..config import ConfigError, set_syntax, split_overrides, to_dict, variant_config
from .common import console, handle_errors

app = typer.Typer(
    name="config",
    help="Every --set key (model, train, evaluation, recipe) with its effective default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

MODE_HELP = "full | prompt | linear | lora | text"
VALUE_WIDTH = 70  # longer values (category lists) are cut in the table; --json prints them whole


def effective_settings(
    recipe: str | None, mode: str, shots: int, variant: str, pretrain: bool, sets: list[str]
) -> dict[str, object]:
    """``{"model.input.min_size": 800, "train.lr": 0.0001, "evaluation.min_size": 800, ...}``:
    what a run of ``glip finetune`` (``pretrain``: ``glip pretrain``) with these arguments would
    use, the ``--set`` overrides applied; the model keys and the recipe keys are also those of
    ``glip zeroshot eval``."""
    from ..config import override_dataclass
    from ..provenance import flatten
    from ..recipes import EvaluationConfig, load_recipe, override_recipe, recipe_to_dict
    from ..training.config import apply_train_overrides, pretrain_config
    from ..training.modes import train_config_for

    by = split_overrides(sets, ("train", "model"))
    rec = override_recipe(load_recipe(recipe), by["recipe"]) if recipe else None
    if rec is not None:
        evaluation = rec.evaluation
    else:  # --ann runs: the default evaluation settings; other recipe keys need a recipe
        by_evaluation = split_overrides(by["recipe"], ("evaluation",))
        if by_evaluation["recipe"]:
            raise ConfigError(
                f"--set {by_evaluation['recipe'][0]}: without --recipe the keys are model.*, train.* and evaluation.*; "
                "give --recipe NAME for a recipe's own keys"
            )
        evaluation = override_dataclass(EvaluationConfig(), by_evaluation["evaluation"], "evaluation")
    model = override_dataclass(variant_config(variant), evaluation.model_overrides() + by["model"], "model")
    train = apply_train_overrides(pretrain_config() if pretrain else train_config_for(rec, mode, shots), by["train"])
    if rec is not None:
        recipe_keys = {k: v for k, v in recipe_to_dict(rec).items() if k != "path"}
    else:
        recipe_keys = {"evaluation": to_dict(evaluation)}
    out = flatten({"model": to_dict(model), "train": to_dict(train)})
    out.update(flatten(recipe_keys))
    out.pop("model.variant", None)  # chosen with --variant, not --set
    return out


@app.command("show")
@handle_errors
def show_command(
    recipe: str = typer.Option(
        None, "--recipe", "-r", help="Recipe name (glip recipes list) or YAML path [default: none: --ann runs]."
    ),
    mode: str = typer.Option(
        "full", "--mode", "-m", help=f"Transfer mode whose train.* settings to show: {MODE_HELP}."
    ),
    shots: int = typer.Option(0, "--shots", min=0, help="K-shot setting whose train.copies to show (0 = all data)."),
    variant: str = typer.Option(
        "glip-t", "--variant", help="Model whose model.* keys to show: glip-t | glip-t-a | glip-l | test-tiny."
    ),
    pretrain: bool = typer.Option(
        False, "--pretrain", help="Show glip pretrain's train.* settings instead of finetune's."
    ),
    sets: list[str] = typer.Option(
        None, "--set", help="Overrides to apply first, as the commands take them: train.lr=1e-3."
    ),
    as_json: bool = typer.Option(False, "--json", help='Print {"key": value} as JSON.'),
):
    """Every key --set takes, with the value a run would use: model.* (glip finetune, pretrain, zeroshot eval),
    train.* (glip finetune, pretrain) and the recipe's keys (evaluation.*, tuning.*, ...)."""
    from ..training.modes import get_mode

    get_mode(mode)  # an unknown mode: one line naming the choices
    settings = effective_settings(recipe, mode, shots, variant, pretrain, list(sets or []))
    if as_json:
        typer.echo(json.dumps(settings, indent=1, default=str))
        return
    what = "glip pretrain" if pretrain else f"glip finetune --mode {mode}" + (f" --shots {shots}" if shots else "")
    table = Table(title=f"--set keys: {what}" + (f" --recipe {recipe}" if recipe else "") + f", {variant}")
    table.add_column("key", overflow="fold")
    table.add_column("value", overflow="fold")
    for key, value in settings.items():
        text = set_syntax(value)
        if len(text) > VALUE_WIDTH:
            text = text[: VALUE_WIDTH - 1] + "…"
        table.add_row(key, escape(text))
    console.print(table)
    console.print(
        "Change any of them with --set KEY=VALUE (as written here, e.g. --set train.min_sizes=[320]); "
        "--json prints every value whole.",
        highlight=False,
        soft_wrap=True,
    )
