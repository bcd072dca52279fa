"""``glip recipes``: list the dataset recipes and show one, with its exact evaluation caption(s)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..prompts import PromptError, as_categories
from ..recipes import (
    RecipeError,
    evaluation_prompt,
    list_recipes,
    load_recipe,
    recipe_prompts,
    recipe_to_dict,
    recipes_dir,
    resolve_prompt_file,
    untokenized_captions,
)
from ..tokenizer import default_tokenizer, load_tokenizer
from .common import console, err_console, handle_errors

app = typer.Typer(
    name="recipes",
    help="Dataset recipes (ODinW-13/35, COCO, LVIS): files, categories, evaluation and tuning settings.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_json(data) -> None:
    """Plain JSON on stdout (never wrapped: captions keep every space)."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _shown(name: str) -> str:
    """A category name as a table shows it: quoted when spaces or escapes would be invisible."""
    if name != name.strip() or "  " in name or not name or any(not ch.isprintable() for ch in name) or "\\" in name:
        return json.dumps(name, ensure_ascii=False)
    return name


@app.command("list")
@handle_errors
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the recipes: name, short alias, number of categories, evaluation split."""

    recipes = list_recipes()
    if as_json:
        _print_json(
            [
                {
                    "name": r.name,
                    "aliases": r.aliases,
                    "description": r.description,
                    "categories": None if r.categories_from_annotations else len(r.categories),
                    "eval_split": r.evaluation.split,
                    "chunk_size": r.evaluation.chunk_size,
                    "prompts": r.prompts,
                    "path": r.path,
                }
                for r in recipes
            ]
        )
        return
    table = Table(title=f"{len(recipes)} recipes in {recipes_dir()}", title_justify="left", box=None, pad_edge=False)
    shorts = [min([r.name, *r.aliases], key=len) for r in recipes]
    widths = [max(len(s) for s in shorts), 4, len("minival /40 *")]
    rest = max(12, console.width - sum(widths) - 2 * len(widths))  # what is left for the full name
    table.add_column("recipe", no_wrap=True, style="cyan", min_width=widths[0])
    table.add_column("cats", justify="right", no_wrap=True, min_width=widths[1])
    table.add_column("eval", no_wrap=True, min_width=widths[2])
    table.add_column("official name", no_wrap=True, overflow="ellipsis", style="dim", max_width=rest)
    for r, short in zip(recipes, shorts):
        cats = "ann." if r.categories_from_annotations else str(len(r.categories))
        evaluation = r.evaluation.split + (f" /{r.evaluation.chunk_size}" if r.evaluation.chunk_size else "")
        if r.prompts:
            evaluation += " *"
        full = (
            ""
            if r.name == short
            else r.name.split("/", 1)[-1]
            if r.name.split("/")[0] == short.split("/")[0]
            else r.name
        )
        table.add_row(escape(short), cats, escape(evaluation), escape(full))
    console.print(table)
    console.print(
        "[dim]cats: categories ('ann.': from the annotation file); eval: split, /N chunks of N categories, "
        "*: with a prompt file. Details: glip recipes show NAME[/]"
    )


@app.command("show")
@handle_errors
def show_command(
    name: str = typer.Argument(..., help="Recipe name, alias (e.g. odinw35/aquarium) or YAML path."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    tokenizer: str = typer.Option(
        None,
        "--tokenizer",
        envvar="GLIP_TOKENIZER",
        help="BERT tokenizer: a folder with vocab.txt or a hub id (default bert-base-uncased).",
    ),
    data_root: Path = typer.Option(
        None,
        "--data-root",
        help="Data root; needed only for recipes whose categories come from the annotation file (LVIS).",
    ),
):
    """Show a recipe: files, categories, prompt entries and the exact evaluation caption(s)."""
    recipe = load_recipe(name)
    tokenizer_name = default_tokenizer(tokenizer)
    annotation_categories = None
    if recipe.categories_from_annotations and data_root is not None:
        annotation_categories = _annotation_categories(Path(data_root) / recipe.split().ann_file)

    caption = None
    notices: list[str] = []
    undetectable: list[str] = []
    caption_note = None
    tokenizer_warning = None
    tok = None
    if recipe.categories_from_annotations and annotation_categories is None:
        caption_note = "categories come from the annotation file: pass --data-root to build the caption(s)"
    else:
        try:
            tok = load_tokenizer(tokenizer_name)
        except PromptError as e:
            tok = None
            tokenizer_error = str(e)
        if tok is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prompt = evaluation_prompt(recipe, tok, annotation_categories, warn=False)
            caption = prompt.caption_or_captions
            notices = list(prompt.notices)
            undetectable = prompt.undetectable
        else:
            caption = untokenized_captions(recipe, annotation_categories)
            tokenizer_warning = f"caption(s) not checked against BERT's 256 tokens: {tokenizer_error}"

    prompts = recipe_prompts(recipe)
    if recipe.categories_from_annotations:
        categories = (
            None
            if annotation_categories is None
            else [{"id": cid, "name": n} for cid, n in as_categories(annotation_categories)]
        )
    else:
        categories = [{"id": c.id, "name": c.name} for c in recipe.categories]

    if as_json:
        data = recipe_to_dict(recipe)
        data["categories"] = categories if categories is not None else "from_annotations"
        data["caption"] = caption
        data["chunked"] = isinstance(caption, list)
        data["prompt_file"] = str(resolve_prompt_file(recipe)) if recipe.prompts else None
        data["prompt_entries"] = [{k: v for k, v in vars(p).items() if v is not None} for p in prompts.values()]
        data["undetectable"] = undetectable
        data["notices"] = notices + [n for n in (caption_note, tokenizer_warning) if n]
        data["tokenizer"] = tokenizer_name if tok is not None else None
        _print_json(data)
        return

    console.print(f"[bold]{escape(recipe.name)}[/]  {escape(recipe.description)}")
    info = Table(show_header=False, box=None, pad_edge=False)
    info.add_column(style="dim", no_wrap=True)
    info.add_column(overflow="fold")
    if recipe.aliases:
        info.add_row("aliases", escape(", ".join(recipe.aliases)))
    info.add_row("file", escape(str(recipe.path)))
    if recipe.source:
        info.add_row("official", escape(recipe.source))
    for split, files in recipe.splits.items():
        info.add_row(split, escape(f"{files.ann_file}  (images: {files.img_dir})"))
    ev = recipe.evaluation
    info.add_row(
        "evaluation",
        escape(
            f"split {ev.split}, images {ev.min_size}/{ev.max_size}, {ev.detections_per_img} detections per image, "
            + (f"chunks of {ev.chunk_size} categories, " if ev.chunk_size else "")
            + f"metric {ev.metric}"
        ),
    )
    if recipe.prompts:
        info.add_row("prompts", escape(str(resolve_prompt_file(recipe))))
    if recipe.tuning is not None:
        modes = ", ".join(
            f"{n} lr {m.lr:g} wd {m.weight_decay:g}" + (f" lang {m.language_lr:g}" if m.language_lr else "")
            for n, m in recipe.tuning.modes.items()
        )
        info.add_row("tuning", escape(f"batch {recipe.tuning.batch_size}; {modes}"))
    console.print(info)

    if categories is not None:
        table = Table(title=f"{len(categories)} categories", title_justify="left", box=None, pad_edge=False)
        table.add_column("id", justify="right")
        table.add_column("name", overflow="fold")
        if prompts:
            table.add_column("in the caption", overflow="fold")
        for cat in categories:
            row = [str(cat["id"]), escape(_shown(cat["name"]))]
            if prompts:
                p = prompts.get(cat["id"])
                row.append("" if p is None else escape(_prompt_text(p)))
            table.add_row(*row)
        console.print(table)
    if caption_note:
        console.print(f"[yellow]caption:[/] {escape(caption_note)}")
    elif isinstance(caption, list):
        console.print(f"[bold]captions[/] ({len(caption)} chunks):")
        for i, text in enumerate(caption, 1):
            console.print(f"  {i}: {escape(json.dumps(text, ensure_ascii=False))}", soft_wrap=True)
    else:
        console.print("[bold]caption:[/]", escape(json.dumps(caption, ensure_ascii=False)), soft_wrap=True)
    for note in notices:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if tokenizer_warning:
        err_console.print(f"[yellow]warning:[/] {escape(tokenizer_warning)}", soft_wrap=True)
    if undetectable:
        shown = ", ".join(json.dumps(n, ensure_ascii=False) for n in undetectable)
        err_console.print(
            f"[yellow]warning:[/] {len(undetectable)} categor{'y maps' if len(undetectable) == 1 else 'ies map'} to "
            f"no token and cannot be detected: {escape(shown)}"
        )


def _prompt_text(p) -> str:
    if p.is_caption_prompt:
        name = p.name if p.name is not None else "<name>"
        return json.dumps(p.prefix + "[" + name + "]" + p.suffix, ensure_ascii=False)
    return f"override: {json.dumps(p.override, ensure_ascii=False)}"


def _annotation_categories(path: Path) -> list[dict]:
    """The ``categories`` of a COCO/LVIS annotation file (read in full: LVIS files are large)."""
    if not path.is_file():
        raise RecipeError(f"annotation file {str(path)!r} not found: check --data-root")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: not a readable JSON file ({e})") from None
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list):
        raise RecipeError(f"{path}: no 'categories' list: is it a COCO/LVIS annotation file?")
    return cats


if __name__ == "__main__":  # pragma: no cover
    app()
