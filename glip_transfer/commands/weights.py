"""``glip weights``: the weights names (``glip-t``...) and converting an official ``.pth`` to a
model-only safetensors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from .common import console, fail, handle_errors

app = typer.Typer(
    name="weights",
    help="Weights by name (glip-t, glip-l, ...): what is cached, and model-only safetensors copies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@app.command("list")
@handle_errors
def list_command(
    as_json: bool = typer.Option(False, "--json", help='Print [{"name","file","variant","bytes","cached","path"}].'),
):
    """The weights names, their files and variants, and whether each is on this machine (no network)."""
    from ..hub import DEFAULT_WEIGHTS, WEIGHTS, hub_cache_dir, weights_table

    rows = weights_table()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    packaged = {w.name for w in WEIGHTS if w.packaged}
    table = Table(title=f"weights (Hugging Face cache: {hub_cache_dir()})")
    for column in ("name", "variant", "size", "here", "file"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for row in rows:
        name = row["name"] + (" (default)" if row["name"] == DEFAULT_WEIGHTS else "")
        here = "[green]yes[/]" if row["cached"] else "[red]missing[/]" if row["name"] in packaged else "[dim]no[/]"
        table.add_row(name, row["variant"], _size(row["bytes"]), here, row["file"])
    console.print(table)
    console.print("--weights NAME fetches a hub file into the cache on first use; --weights PATH takes a local file.")


@app.command("convert")
@handle_errors
def convert_command(
    source: str = typer.Argument(..., help="An official GLIP .pth (or a weights name, e.g. glip-t)."),
    out: Path = typer.Argument(..., help="The .safetensors to write."),
    half: bool = typer.Option(False, "--half", help="Store the parameters in float16 (half the size; outputs differ slightly)."),
    ema: bool = typer.Option(False, "--ema", help="Take the 'model_ema' weights instead of 'model'."),
    variant: str = typer.Option(None, "--variant", help="glip-t | glip-t-a | glip-l (detected when omitted)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
):
    """Write the model weights of an official checkpoint as a model-only safetensors (the config in
    its metadata): loads several times faster, memory-mapped, and any --weights accepts it."""
    from ..checkpoint import convert_checkpoint, file_sha256, resolve_weights
    from ..hub import cached_blob_sha256

    if out.suffix != ".safetensors":
        fail(f"{out}: the output must end in .safetensors")
    if out.exists() and not force:
        fail(f"{out} exists: pass --force to overwrite it")
    src = resolve_weights(source, model_only=False)
    if not src.is_file():
        fail(f"{src}: file not found")
    if src.resolve() == out.resolve():
        fail(f"{out}: the output would overwrite the input")
    start = time.perf_counter()
    # the identity adapters record: the source file's sha256 (named by the cache, else computed)
    base = None if (half or ema) else (cached_blob_sha256(src) or file_sha256(src))
    done = convert_checkpoint(src, out, half=half, use_ema=ema, variant=variant, base_sha256=base)
    console.print(
        f"{out}: {done.variant}, {done.tensors} tensors, {done.dtype}, {_size(done.bytes)} "
        f"(from {_size(src.stat().st_size)}) in {time.perf_counter() - start:.1f} s"
    )
