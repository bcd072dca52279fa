"""``glip finetune`` and ``glip pretrain``: transfer a GLIP model to a dataset (full fine-tuning,
prompt tuning, linear probing, LoRA, text-only) or pretrain on grounding / detection data.

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m glip_transfer finetune ...`` (DDP,
NCCL on GPU, gloo on CPU; ``--batch-size`` is global).

The library (``glip_transfer.training``, which pulls in torchvision and the model) is imported
when a command runs, not when ``glip --help`` lists them.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..config import check_inference_settings
from ..files import write_text
from ..tokenizer import TOKENIZER_ENV
from .common import (
    DATA_ROOT_HELP,
    DEVICE_HELP,
    SIZE_HELP,
    TOKENIZER_HELP,
    console,
    err_console,
    fail,
    handle_errors,
    note,
)

MODE_HELP = "full | prompt | linear | lora | text (described above)."
SET_HELP = (
    "Override any setting (repeatable): train.lr=1e-4, train.lora.rank=16, train.min_sizes=[320], "
    "model.head.gradient_checkpointing=true, evaluation.min_size=600; glip config show lists every key "
    "with its default."
)
MIN_SIZE_HELP = (
    SIZE_HELP[0] + " in training and evaluation: sets train.min_sizes=[N] and evaluation.min_size "
    "[default: training draws from 480..800 per image, evaluation 800]"
)
MAX_SIZE_HELP = SIZE_HELP[1] + ": sets train.max_size and evaluation.max_size [default: 1333]"
MAX_STEPS_HELP = "Stop after this many optimiser steps, for a short run (train.max_steps) [default: all epochs]."


def size_sets(min_size: int | None, max_size: int | None, max_steps: int | None) -> list[str]:
    """``--min-size`` / ``--max-size`` / ``--max-steps`` as the ``--set`` items they stand for
    (they come first: an explicit ``--set`` of the same key wins)."""
    check_inference_settings(min_size=min_size, max_size=max_size)
    sets = []
    if min_size is not None:
        sets += [f"train.min_sizes=[{min_size}]", f"evaluation.min_size={min_size}"]
    if max_size is not None:
        sets += [f"train.max_size={max_size}", f"evaluation.max_size={max_size}"]
    if max_steps is not None:
        sets.append(f"train.max_steps={max_steps}")
    return sets


def check_model_inputs(
    weights: str | None, tokenizer: str | None, variant: str | None, recipe: str | None, pretrain: bool
) -> None:
    """Before anything loads: the weights name or file the run starts from (the recipe's default
    when not given) exists and its tokenizer loads."""
    from ..api import check_weights, resolve_tokenizer
    from ..recipes import load_recipe
    from ..training.run import starting_point

    weights, variant = starting_point(weights, variant, load_recipe(recipe) if recipe else None, pretrain)
    if weights is not None:
        check_weights(weights)
    resolve_tokenizer(tokenizer, weights, variant)


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        fail(f"--seeds {text!r}: expected whole numbers separated by commas, e.g. 3,30,300")
    if not seeds:
        fail("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        fail(f"--seeds {text!r}: a seed repeats")
    return seeds


def _summary_table(prep) -> Table:
    table = Table(title=f"{prep.plan.mode}: trainable parameters", show_edge=False)
    table.add_column("part")
    table.add_column("trainable", justify="right")
    for part, n in prep.breakdown.items():
        table.add_row(part, f"{n:,}")
    share = 100.0 * prep.trainable / max(prep.total, 1)
    table.add_row("[bold]total[/]", f"[bold]{prep.trainable:,}[/] of {prep.total:,} ({share:.3f} %)")
    return table


def _describe(prep) -> None:
    cfg = prep.cfg
    ds = prep.dataset
    console.print(
        f"[bold]{escape(prep.recipe.name)}[/] — mode [bold]{prep.plan.mode}[/], {prep.model.cfg.variant} on "
        f"{prep.device}"
        f"{f', {prep.dist.world} processes' if prep.dist.enabled else ''}; "
        f"{ds.num_images} training images x {cfg.copies} copies, {cfg.epochs} epochs, batch {cfg.batch_size}, lr "
        f"{cfg.lr:g}",
        highlight=False,
        soft_wrap=True,
    )
    if prep.prompt is not None:
        console.print(
            f"caption ({prep.prompt.length} tokens): {prep.prompt.caption[:300]!r}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    for text in prep.notes:
        note(text)
    console.print(_summary_table(prep))
    console.print(f"trainable parameters: {prep.trainable:,} of {prep.total:,}", highlight=False, soft_wrap=True)


def _run(spec_fields: dict, seeds: list[int] | None, dry_run: bool, as_json: bool) -> None:
    """Prepare and train one run per few-shot seed (one run without ``seeds``); ``spec_fields``
    are the :class:`~glip_transfer.training.run.RunSpec` fields."""
    # the training library (torchvision, the model) loads when a command runs, not for `glip --help`
    from ..training.distributed import init_from_env, shutdown
    from ..training.engine import Trainer
    from ..training.run import RESULT_FILE, RunSpec, prepare, train_run

    spec = RunSpec(**spec_fields, dry_run=dry_run)
    dist_info, device = init_from_env(spec.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            runs = seeds or [None]
            base_out = spec.out
            summaries = []
            for seed in runs:
                spec.out = base_out
                prep = prepare(spec, shuffle_seed=seed, dist_info=dist_info, device=device)
                if seed is not None:  # one folder per few-shot draw, seeds.json beside them
                    base_out = base_out or prep.out
                    prep.out = Path(base_out) / f"seed_{seed}"
                    done = prep.out / RESULT_FILE
                    if spec.resume and done.exists():
                        if dist_info.main:
                            console.print(
                                f"seed {seed}: finished earlier ({prep.out}), reusing its result", markup=False
                            )
                        summaries.append((seed, json.loads(done.read_text())))
                        continue
                if dry_run:
                    # builds the optimiser and the schedule too
                    Trainer(
                        prep.module,
                        prep.cfg,
                        prep.dataset,
                        device=device,
                        out_dir=prep.out,
                        prompt=prep.prompt,
                        dist_info=dist_info,
                        progress=False,
                    )
                    if dist_info.main:
                        if as_json:
                            typer.echo(
                                json.dumps({"mode": prep.plan.mode, "trainable": prep.trainable, "total": prep.total})
                            )
                        else:
                            _describe(prep)
                            console.print(
                                f"dry run: model, mode, data ({len(prep.dataset)} items per epoch) and "
                                "optimiser are built; nothing trained"
                            )
                    return
                if dist_info.main:
                    _describe(prep)
                summary = train_run(prep, console=console if dist_info.main else None)
                summaries.append((seed, summary))
                if dist_info.main:
                    console.print(f"written: {prep.out}", highlight=False, markup=False)
            if seeds and dist_info.main:
                _seed_summary(summaries, Path(base_out))
    finally:
        shutdown(dist_info)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _seed_summary(summaries, folder: Path) -> None:
    """Per-seed results and their mean ± std (sample standard deviation), printed and written to
    ``seeds.json`` in ``folder``."""
    keys = ("best_val_AP", "test_AP", "test_AP50")
    rows = []
    for seed, s in summaries:
        test = s.get("test") or {}
        rows.append(
            {
                "seed": seed,
                "best_val_AP": s.get("best_val_AP"),
                "test_AP": test.get("AP"),
                "test_AP50": test.get("AP50"),
            }
        )
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    table = Table(title="few-shot seeds", show_edge=False)
    table.add_column("seed", justify="right")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    for r in rows:
        table.add_row(str(r["seed"]), *(fmt(r[k]) for k in keys))
    out: dict = {"runs": rows}
    cells = []
    for key in keys:
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            mean, std = mean_std(values)
            out[key] = {"mean": mean, "std": std, "n": len(values)}
            cells.append(f"{mean:.4f} ± {std:.4f}")
        else:
            cells.append("-")
    table.add_row("[bold]mean ± std[/]", *cells)
    console.print(table)
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_text(Path(folder) / "seeds.json", json.dumps(out, indent=2) + "\n")


@handle_errors
def finetune_command(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Recipe name (glip recipes list) or YAML path."),
    weights: str = typer.Option(
        None,
        "--weights",
        "-w",
        help="Base model: a name (glip weights list) or an official .pth / .safetensors "
        "[default: the recipe's weights, else glip-t; with --variant and no --weights: random initial weights].",
    ),
    mode: str = typer.Option("full", "--mode", "-m", help=MODE_HELP),
    shots: int = typer.Option(0, "--shots", min=0, help="K-shot training subset (1, 3, 5, 10; 0 = all data)."),
    seeds: str = typer.Option(None, "--seeds", help="Few-shot draws to run, e.g. 3,30,300 (mean ± std reported)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs [default: the recipe's, 200 for ODinW]."),
    max_steps: int = typer.Option(None, "--max-steps", min=1, help=MAX_STEPS_HELP),
    batch_size: int = typer.Option(
        None, "--batch-size", "-b", min=1, help="Global batch size [default: the recipe's, 4 for ODinW]."
    ),
    min_size: int = typer.Option(None, "--min-size", help=MIN_SIZE_HELP),
    max_size: int = typer.Option(None, "--max-size", help=MAX_SIZE_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder [default: runs/finetune/RECIPE/MODE]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    force: bool = typer.Option(False, "--force", help="Overwrite a finished or unfinished run in --out."),
    sets: list[str] = typer.Option(None, "--set", help=SET_HELP),
    data_root: Path = typer.Option(Path("DATASET"), "--data-root", "-d", envvar="GLIP_DATA", help=DATA_ROOT_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    tokenizer: str = typer.Option(None, "--tokenizer", envvar=TOKENIZER_ENV, help=TOKENIZER_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build everything, print the trainable parameters, exit."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print {mode, trainable, total} as JSON."),
    ann: Path = typer.Option(None, "--ann", help="Training COCO JSON without a recipe (with --images)."),
    images: Path = typer.Option(None, "--images", help="Image folder of --ann."),
    val_ann: Path = typer.Option(None, "--val-ann", help="Validation COCO JSON (with --val-images)."),
    val_images: Path = typer.Option(None, "--val-images", help="Image folder of --val-ann."),
    test_ann: Path = typer.Option(None, "--test-ann", help="Test COCO JSON (with --test-images)."),
    test_images: Path = typer.Option(None, "--test-images", help="Image folder of --test-ann."),
    variant: str = typer.Option(
        None, "--variant", help="glip-t | glip-t-a | glip-l | test-tiny (without --weights: untrained)."
    ),
    workers: int = typer.Option(
        None, "--workers", min=0, help="Image loading processes per process (train.workers) [default: 0]."
    ),
    keep_checkpoints: bool = typer.Option(
        False, "--keep-checkpoints", help="Keep the resumable state (optimiser included) of a finished run."
    ),
):
    """Transfer a GLIP model to a dataset: full fine-tuning, prompt tuning, linear probing, LoRA or text-only.

    Modes: full (every parameter but Swin's patch embedding and first stage), prompt (an offset added to BERT's
    output: [256, 768] for GLIP-T), linear (the head's prediction layers), lora (low-rank adapters in the fused
    head), text (BERT alone). A short run: --max-steps 20 --min-size 320 --max-size 512. Every setting with its
    default: glip config show --recipe R --mode M.
    """
    if (ann is None) != (images is None):
        fail("--ann and --images go together")
    if recipe is None and ann is None:
        fail("give --recipe NAME, or --ann FILE with --images DIR")
    if as_json and not dry_run:
        fail("--json goes with --dry-run")
    seed_list = _parse_seeds(seeds)
    all_sets = size_sets(min_size, max_size, max_steps) + list(sets or [])
    check_model_inputs(weights, tokenizer, variant, recipe, pretrain=False)
    if seed_list and not shots:
        err_console.print(
            "[yellow]note:[/] --seeds draws few-shot subsets; without --shots every seed trains on all the data"
        )
    spec = dict(
        mode=mode,
        recipe=recipe,
        weights=weights,
        variant=variant,
        out=out,
        shots=shots,
        epochs=epochs,
        batch_size=batch_size,
        sets=all_sets,
        data_root=data_root,
        device=device,
        tokenizer=tokenizer,
        ann=ann,
        images=images,
        val_ann=val_ann,
        val_images=val_images,
        test_ann=test_ann,
        test_images=test_images,
        resume=resume,
        force=force,
        workers=workers,
        keep_checkpoints=keep_checkpoints,
    )
    _run(spec, seed_list, dry_run, as_json)


@handle_errors
def pretrain_command(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Recipe whose train split is the (detection) data."),
    weights: str = typer.Option(
        None,
        "--weights",
        "-w",
        help="Initial weights: a name (glip weights list) or an official .pth / .safetensors [default: random].",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder [default: runs/pretrain/RECIPE/pretrain]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    force: bool = typer.Option(False, "--force", help="Overwrite a run in --out."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs [default: 30, GLIP-T's pretraining]."),
    max_steps: int = typer.Option(None, "--max-steps", min=1, help=MAX_STEPS_HELP),
    batch_size: int = typer.Option(None, "--batch-size", "-b", min=1, help="Global batch size [default: 64]."),
    min_size: int = typer.Option(None, "--min-size", help=MIN_SIZE_HELP),
    max_size: int = typer.Option(None, "--max-size", help=MAX_SIZE_HELP),
    sets: list[str] = typer.Option(None, "--set", help=SET_HELP),
    data_root: Path = typer.Option(Path("."), "--data-root", "-d", help="Folder a recipe's paths are under."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    tokenizer: str = typer.Option(None, "--tokenizer", envvar=TOKENIZER_ENV, help=TOKENIZER_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build everything, print the trainable parameters, exit."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print {mode, trainable, total} as JSON."),
    ann: Path = typer.Option(None, "--ann", help="Grounding (caption + tokens_positive) or detection COCO JSON."),
    images: Path = typer.Option(None, "--images", help="Image folder of --ann."),
    val_ann: Path = typer.Option(None, "--val-ann", help="Validation COCO JSON (detection; with --val-images)."),
    val_images: Path = typer.Option(None, "--val-images", help="Image folder of --val-ann."),
    variant: str = typer.Option(
        None, "--variant", help="glip-t | glip-t-a | glip-l | test-tiny: the model without --weights (random)."
    ),
    workers: int = typer.Option(
        None, "--workers", min=0, help="Image loading processes per process (train.workers) [default: 0]."
    ),
    keep_checkpoints: bool = typer.Option(
        False, "--keep-checkpoints", help="Keep the resumable state (optimiser included) of a finished run."
    ),
):
    """Pretrain (all parameters) on grounding data or on detection data turned into grounding.

    Settings follow GLIP-T's pretraining config; glip config show --pretrain lists them.
    """
    if (ann is None) != (images is None):
        fail("--ann and --images go together")
    if recipe is None and ann is None:
        fail("give --recipe NAME, or --ann FILE with --images DIR")
    all_sets = size_sets(min_size, max_size, max_steps) + list(sets or [])
    check_model_inputs(weights, tokenizer, variant, recipe, pretrain=True)
    spec = dict(
        mode="full",
        recipe=recipe,
        weights=weights,
        variant=variant,
        out=out,
        epochs=epochs,
        batch_size=batch_size,
        sets=all_sets,
        data_root=data_root,
        device=device,
        tokenizer=tokenizer,
        ann=ann,
        images=images,
        val_ann=val_ann,
        val_images=val_images,
        resume=resume,
        force=force,
        workers=workers,
        pretrain=True,
        keep_checkpoints=keep_checkpoints,
    )
    _run(spec, None, dry_run, as_json)
