"""``glip zeroshot eval``: COCO AP of a model on a dataset, prompted with its category names."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from ..checkpoint import load_model
from ..config import check_inference_settings, split_overrides
from ..evaluation import (
    PARTIAL_RESULTS,
    PartialResults,
    crowded_images,
    per_category_table,
    summary_table,
    write_results,
)
from ..files import OutputError, is_direct, write_text
from ..hub import DEFAULT_WEIGHTS
from ..recipes import dataset_name, safe_name
from ..runlock import RunLock
from ..runtime import progress_bar, resolve_device
from ..tokenizer import TOKENIZER_ENV
from .common import (
    ADAPTER_HELP,
    DATA_ROOT_HELP,
    DEVICE_HELP,
    SIZE_HELP,
    TOKENIZER_HELP,
    VARIANT_HELP,
    WEIGHTS_HELP,
    WORKERS_HELP,
    console,
    fail,
    handle_errors,
    note,
    warn,
)

app = typer.Typer(
    help="Zero-shot transfer: evaluate a pretrained model on a dataset's category names.", no_args_is_help=True
)


@app.command("eval")
@handle_errors
def eval_command(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Recipe name (glip recipes list) or YAML path."),
    weights: str = typer.Option(
        None, "--weights", "-w", help=WEIGHTS_HELP + " [default: the recipe's weights, else glip-t]"
    ),
    data_root: Path = typer.Option(Path("DATASET"), "--data-root", "-d", envvar="GLIP_DATA", help=DATA_ROOT_HELP),
    split: str = typer.Option(None, "--split", help="val | test [default: the recipe's evaluation split]."),
    batch_size: int = typer.Option(
        None, "--batch-size", "-b", min=1, help="Images per forward [evaluation.batch_size: 1 on CPU, 4 on CUDA]."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder [default: runs/zeroshot/RECIPE or DATASET]."),
    min_size: int = typer.Option(
        None, "--min-size", help=SIZE_HELP[0] + " (evaluation.min_size) [default: the recipe's, 800]."
    ),
    max_size: int = typer.Option(
        None, "--max-size", help=SIZE_HELP[1] + " (evaluation.max_size) [default: the recipe's, 1333]."
    ),
    sets: list[str] = typer.Option(
        None,
        "--set",
        help="Override any setting (repeatable): evaluation.detections_per_img=300, model.postprocess.nms_thresh=0.5; "
        "glip config show --recipe R lists every key with its default.",
    ),
    ann: Path = typer.Option(None, "--ann", help="COCO JSON of a dataset without a recipe (with --images)."),
    images: Path = typer.Option(None, "--images", help="Image folder of --ann."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    force: bool = typer.Option(False, "--force", help="Start over even if --out has results."),
    export_odinw: Path = typer.Option(None, "--export-odinw", help='Also write {"<dataset>": [results]} to this file.'),
    variant: str = typer.Option(None, "--variant", help=VARIANT_HELP),
    tokenizer: str = typer.Option(None, "--tokenizer", envvar=TOKENIZER_ENV, help=TOKENIZER_HELP),
    adapter: Path = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: bool = typer.Option(
        False, "--amp", help="CUDA mixed precision (bf16/fp16; evaluation.amp); CPU stays float32."
    ),
    workers: int = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    no_text_cache: bool = typer.Option(False, "--no-text-cache", hidden=True, help="Re-run BERT per batch."),
):
    """Evaluate on a recipe's dataset (or --ann/--images) and write COCO results and AP tables.

    Writes to --out: bbox.json (COCO results), metrics.json (AP/AR, per category, provenance), per_category.csv
    and report.md; partial_results.jsonl while running (--resume continues from it).
    """
    # the model (torchvision: a second to import) loads when the command runs, not for `glip --help`
    from ..api import check_adapter, check_weights, resolve_tokenizer
    from ..inference import EncodedPrompt
    from ..provenance import DETECTION, changes, describe, evaluation_record, identity
    from ..training.artifacts import apply_adapter
    from ..zeroshot import evaluation_recipe, in_dataset_order, prepare_task, run_task, task_metrics

    if (recipe is None) == (ann is None):
        fail("give --recipe NAME, or --ann FILE with --images DIR")
    if (ann is None) != (images is None):
        fail("--ann and --images go together")
    check_inference_settings(min_size=min_size, max_size=max_size)
    size_sets = [f"evaluation.{k}={v}" for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None]
    sets = size_sets + list(sets or [])  # an explicit --set of the same key comes last and wins
    sets_by = split_overrides(sets, ("model",))
    rec = evaluation_recipe(recipe, ann, images, overrides=sets_by["recipe"])
    weights = weights or rec.weights or DEFAULT_WEIGHTS
    ev = rec.evaluation
    if amp:
        ev.amp = True

    # everything cheap before the run folder and the weights: files, outputs, device, tokenizer, prompt,
    # weights name, adapter
    task = prepare_task(rec, split=split, data_root=data_root)
    split, files = task.split, rec.split(task.split)
    out = out or default_out(rec, split, ann)
    check_outputs(out, export_odinw, force)
    dev = resolve_device(device)
    tok = resolve_tokenizer(tokenizer, weights)
    detection_prompt, notes = task.prompt(tok)
    for text in notes:
        note(text)
    check_weights(weights)
    if adapter is not None:
        check_adapter(adapter, detection_prompt.captions)

    with RunLock(out) as lock:
        if lock.notice:
            note(lock.notice)
        partial = PartialResults(out / PARTIAL_RESULTS)
        saved, done_ids, results = None, set(), []
        if partial.exists() and not force:
            if not resume:
                fail(f"{out} has results of an earlier run: pass --resume to continue it or --force to start over")
            saved, done_ids, results = partial.read()
        elif (out / "metrics.json").exists() and not force:
            fail(f"{out} holds a finished evaluation: pass --force to overwrite it, or choose another --out")

        model, _ = load_model(
            weights, variant=variant, tokenizer=tokenizer, overrides=ev.model_overrides() + sets_by["model"]
        )
        encoded = EncodedPrompt.from_chunks(tok, detection_prompt.chunks, model.cfg.language.max_query_len)
        if adapter is not None:
            model = apply_adapter(model, adapter, weights=weights)
        model = model.to(dev).eval()
        batch_size = batch_size or ev.batch_size_on(dev)
        provenance = evaluation_record(
            weights=weights,
            model=model,
            adapter=adapter,
            recipe=rec,
            split=split,
            ann_file=task.ann_file,
            img_dir=task.img_dir,
            encoded=encoded,
            evaluation=ev,
            batch_size=batch_size,
            device=dev,
            overrides=sets,
        )
        if saved is None and done_ids:
            fail(
                f"{partial.path} does not record the settings that made it (an earlier version wrote it): "
                "pass --force to start over"
            )
        if saved is not None:
            diff = changes(identity(saved, DETECTION), identity(provenance, DETECTION))
            if diff:
                fail(
                    f"{out}: cannot resume: its partial results were made with other settings ({describe(diff)}); "
                    "resume with the same ones, or pass --force to start over"
                )
            provenance["started"] = saved.get("date")
        else:
            partial.start(provenance)

        dataset = task.dataset(model.cfg.input)
        crowded = crowded_images(dataset, model.cfg.postprocess.detections_per_img)
        if crowded:
            warn(crowded)
        chunks_note = f", {len(encoded.chunks)} prompt chunks" if len(encoded.chunks) > 1 else ""
        already = sum(1 for entry in dataset.entries if entry[0] in done_ids)
        console.print(
            f"[bold]{escape(rec.name)}[/]: {len(dataset)} images ({escape(files.img_dir)}){chunks_note}; "
            f"model {model.cfg.variant} on {dev}" + (f"; resuming after {already} images" if already else ""),
            highlight=False,
        )

        written = [len(results)]
        try:
            with partial.appender() as lines, progress_bar() as bar:
                job = bar.add_task("zero-shot", total=len(dataset), completed=already, info="", unit="img")

                def on_batch(image_ids: list, batch_results: list[dict]) -> None:
                    partial.add(lines, image_ids, batch_results)
                    written[0] += len(batch_results)
                    bar.update(job, info=f"{written[0]} detections")

                new = run_task(
                    model,
                    dataset,
                    encoded,
                    device=dev,
                    batch_size=batch_size,
                    workers=workers,
                    amp=ev.amp,
                    cache_text=not no_text_cache,
                    done_ids=done_ids,
                    on_batch=on_batch,
                    progress=lambda n: bar.update(job, advance=n),
                )
            results = in_dataset_order(results + new, dataset)
            metrics = task_metrics(task, dataset, results, encoded.captions, model.cfg.postprocess.detections_per_img)
            metrics["provenance"] = provenance
            paths = write_results(out, results, metrics)
            if export_odinw is not None:
                write_text(export_odinw, json.dumps({rec.name.split("/", 1)[-1]: results}))
        except OutputError as e:
            fail(f"{e}; the detections so far are kept in {partial.path}: continue with --resume")
        partial.remove()
    console.print(summary_table(metrics, title=escape(f"{rec.name} ({files.img_dir})")))
    if metrics.get("per_category"):
        console.print(per_category_table(metrics["per_category"]))
    console.print(f"written: {', '.join(str(p) for p in paths.values())}", highlight=False)


def default_out(rec, split: str, ann: Path | None) -> Path:
    """``runs/zeroshot/<recipe>`` (``_<split>`` for a split other than the recipe's), or for
    ``--ann`` the dataset's folder name (:func:`~glip_transfer.recipes.dataset_name`): Roboflow's
    ``<name>/valid/_annotations.coco.json`` files do not all land in one folder."""
    if ann is not None:
        return Path("runs") / "zeroshot" / dataset_name(ann)
    name = safe_name(rec.name) + ("" if split == rec.evaluation.split else f"_{split}")
    return Path("runs") / "zeroshot" / name


def check_outputs(out: Path, export_odinw: Path | None, force: bool) -> None:
    """One-line errors before any work: ``--out`` must be a folder, ``--export-odinw`` a file that
    is not there yet (or ``--force``)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder (it gets bbox.json, metrics.json, per_category.csv, report.md)")
    if export_odinw is not None:
        if export_odinw.is_dir():
            fail(f"--export-odinw {export_odinw} is a folder; give a file name, e.g. {export_odinw / 'odinw.json'}")
        if export_odinw.exists() and not is_direct(export_odinw) and not force:
            fail(f"--export-odinw {export_odinw} exists: pass --force to overwrite it, or give another file")
