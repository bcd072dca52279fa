"""``glip zeroshot eval``: COCO AP of a model on a dataset, prompted with its category names."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from ..checkpoint import load_model
from ..config import split_overrides
from ..data import DetectionDataset, default_workers, load_coco, make_loader
from ..evaluation import (
    PARTIAL_RESULTS,
    PartialResults,
    crowded_images,
    evaluate_detections,
    per_category_table,
    summary_table,
    write_results,
)
from ..files import OutputError, is_direct, write_text
from ..hub import DEFAULT_WEIGHTS
from ..recipes import (
    adhoc_recipe,
    categories_not_in_recipe,
    dataset_name,
    evaluation_prompt,
    load_recipe,
    override_recipe,
    safe_name,
    split_paths,
)
from ..runlock import RunLock
from ..runtime import progress_bar, resolve_device
from ..tokenizer import default_tokenizer, load_tokenizer
from .common import console, fail, handle_errors, note, warn

app = typer.Typer(
    help="Zero-shot transfer: evaluate a pretrained model on a dataset's category names.", no_args_is_help=True
)

@app.command("eval")
@handle_errors
def eval_command(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Recipe name (glip recipes list) or YAML path."),
    weights: str = typer.Option(
        None, "--weights", "-w", help="A name (glip weights list) or a file: official GLIP .pth or .safetensors [the recipe's weights, else glip-t]."
    ),
    data_root: Path = typer.Option(Path("DATASET"), "--data-root", "-d", envvar="GLIP_DATA", help="Folder the recipe's paths are under (glip data download fills it)."),
    split: str = typer.Option(None, "--split", help="val | test (default: the recipe's)."),
    batch_size: int = typer.Option(
        None, "--batch-size", "-b", min=1, help="Images per forward [evaluation.batch_size: 1 on CPU, 4 on CUDA]."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder [runs/zeroshot/RECIPE or DATASET]."),
    sets: list[str] = typer.Option(
        None, "--set", help="Override: evaluation.min_size=600, model.postprocess.nms_thresh=0.5"
    ),
    ann: Path = typer.Option(None, "--ann", help="COCO JSON of a dataset without a recipe (with --images)."),
    images: Path = typer.Option(None, "--images", help="Image folder of --ann."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    force: bool = typer.Option(False, "--force", help="Start over even if --out has results."),
    export_odinw: Path = typer.Option(None, "--export-odinw", help='Write {"<dataset>": [results]} here.'),
    variant: str = typer.Option(None, "--variant", help="glip-t | glip-t-a | glip-l (detected)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Hub id or vocab folder (env GLIP_TOKENIZER)."),
    adapter: Path = typer.Option(None, "--adapter", help="A glip finetune artifact to apply."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    amp: bool = typer.Option(
        False, "--amp", help="CUDA mixed precision (bf16/fp16; evaluation.amp); CPU stays float32."
    ),
    workers: int = typer.Option(None, "--workers", min=0, help="Image loading processes [default: 1 on CPU, up to 8 on CUDA]."),
    no_text_cache: bool = typer.Option(False, "--no-text-cache", hidden=True, help="Re-run BERT per batch."),
):
    """Evaluate on a recipe's dataset (or --ann/--images) and write COCO results and AP tables."""
    # the model (torchvision: a second to import) loads when the command runs, not for `glip --help`
    from ..inference import EncodedPrompt, evaluate_dataset
    from ..provenance import DETECTION, changes, describe, evaluation_record, identity
    from ..training.artifacts import apply_adapter

    if (recipe is None) == (ann is None):
        fail("give --recipe NAME, or --ann FILE with --images DIR")
    if (ann is None) != (images is None):
        fail("--ann and --images go together")
    sets_by = split_overrides(sets, ("model",))
    rec = override_recipe(load_recipe(recipe) if recipe else adhoc_recipe({"val": (ann, images)}), sets_by["recipe"])
    split = split or rec.evaluation.split
    ann_file, img_dir = split_paths(rec, split, data_root)
    files = rec.split(split)
    weights = weights or rec.weights or DEFAULT_WEIGHTS
    ev = rec.evaluation
    if amp:
        ev.amp = True

    out = out or default_out(rec, split, ann)
    check_outputs(out, export_odinw, force)
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

        coco = load_coco(ann_file, require_annotations=False)
        model, _ = load_model(
            weights, variant=variant, tokenizer=tokenizer, overrides=ev.model_overrides() + sets_by["model"]
        )
        tok = load_tokenizer(default_tokenizer(tokenizer, model.cfg.language.tokenizer))
        detection_prompt = evaluation_prompt(rec, tok, list(coco.categories.values()))
        for notice in detection_prompt.notices:
            note(notice)
        unprompted = categories_not_in_recipe(rec, list(coco.categories.values()))
        if unprompted:
            note(
                f"{len(unprompted)} annotation categories are not in the recipe and cannot be detected: "
                + ", ".join(repr(n) for _, n in unprompted[:5])
            )
        encoded = EncodedPrompt.from_chunks(tok, detection_prompt.chunks, model.cfg.language.max_query_len)
        if adapter is not None:
            model = apply_adapter(model, adapter, weights=weights, captions=encoded.captions)
        dev = resolve_device(device)
        model = model.to(dev).eval()
        batch_size = batch_size or ev.batch_size_on(dev)
        provenance = evaluation_record(
            weights=weights,
            model=model,
            adapter=adapter,
            recipe=rec,
            split=split,
            ann_file=ann_file,
            img_dir=img_dir,
            encoded=encoded,
            evaluation=ev,
            batch_size=batch_size,
            device=dev,
            overrides=sets or [],
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

        dataset = DetectionDataset(coco, img_dir, model.cfg.input)
        crowded = crowded_images(dataset, model.cfg.postprocess.detections_per_img)
        if crowded:
            warn(crowded)
        workers = default_workers(dev) if workers is None else workers
        loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=dev.type == "cuda")
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
                task = bar.add_task("zero-shot", total=len(dataset), completed=already, info="", unit="img")

                def on_batch(image_ids: list, batch_results: list[dict]) -> None:
                    partial.add(lines, image_ids, batch_results)
                    written[0] += len(batch_results)
                    bar.update(task, info=f"{written[0]} detections")

                new = evaluate_dataset(
                    model,
                    loader,
                    encoded,
                    device=dev,
                    cache_text=not no_text_cache,
                    on_batch=on_batch,
                    skip_image_ids=done_ids,
                    amp=ev.amp,
                    progress=lambda n: bar.update(task, advance=n),
                )
            results.extend(new)
            position = {entry[0]: i for i, entry in enumerate(dataset.entries)}  # dataset order, however run
            results.sort(key=lambda r: position.get(r["image_id"], len(position)))

            metrics = evaluate_detections(
                dataset, results, metric=ev.metric, max_dets=model.cfg.postprocess.detections_per_img
            )
            metrics["recipe"] = rec.name
            metrics["captions"] = encoded.captions
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
