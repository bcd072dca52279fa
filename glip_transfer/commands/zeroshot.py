"""``glip zeroshot eval``: COCO AP of a model on a dataset, prompted with its category names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.markup import escape

from ..checkpoint import load_model
from ..config import check_inference_settings, split_overrides
from ..data import DetectionDataset, default_workers, make_loader
from ..evaluation import atomic_write_text, per_category_table, summary_table, write_results
from ..recipes import safe_name
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
    err_console,
    fail,
    handle_errors,
)

app = typer.Typer(
    help="Zero-shot transfer: evaluate a pretrained model on a dataset's category names.", no_args_is_help=True
)

PARTIAL = "partial_results.jsonl"


def load_partial(path: Path) -> tuple[set, list[dict]]:
    """Image ids done and results written by an interrupted run; a line is one batch
    ``{"image_ids": [...], "results": [...]}`` (a torn last line is ignored: that batch reruns)."""
    done, results = set(), []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                batch = json.loads(line)
            except json.JSONDecodeError:
                break
            done.update(batch["image_ids"])
            results.extend(batch["results"])
    return done, results


@app.command("eval")
@handle_errors
def eval_command(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Recipe name (glip recipes list) or YAML path."),
    weights: str = typer.Option("glip-t", "--weights", "-w", help=WEIGHTS_HELP),
    data_root: Path = typer.Option(Path("DATASET"), "--data-root", "-d", envvar="GLIP_DATA", help=DATA_ROOT_HELP),
    split: str = typer.Option(None, "--split", help="val | test [default: the recipe's evaluation split]."),
    batch_size: int = typer.Option(
        1, "--batch-size", "-b", min=1, help="Images per forward (results do not depend on it)."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder [default: runs/zeroshot/RECIPE]."),
    min_size: int = typer.Option(
        None, "--min-size", help=SIZE_HELP[0] + " [default: the recipe's evaluation.min_size, 800]"
    ),
    max_size: int = typer.Option(
        None, "--max-size", help=SIZE_HELP[1] + " [default: the recipe's evaluation.max_size, 1333]"
    ),
    sets: list[str] = typer.Option(
        None,
        "--set",
        help="Override any setting (repeatable): model.postprocess.nms_thresh=0.5, evaluation.detections_per_img=300; "
        "glip config show lists them all.",
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
    amp: bool = typer.Option(False, "--amp", help="CUDA mixed precision (bf16/fp16); CPU stays float32."),
    workers: int = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
    no_text_cache: bool = typer.Option(False, "--no-text-cache", hidden=True, help="Re-run BERT per batch."),
):
    """Evaluate on a recipe's dataset (or --ann/--images) and write COCO results and AP tables."""
    # the model (torchvision: a second to import) loads when the command runs, not for `glip --help`
    from ..api import check_weights, resolve_tokenizer
    from ..inference import EncodedPrompt, evaluate_dataset
    from ..training.artifacts import apply_adapter, read_artifact_header
    from ..zeroshot import evaluation_recipe, prepare_task, task_metrics

    if (recipe is None) == (ann is None):
        fail("give --recipe NAME, or --ann FILE with --images DIR")
    if (ann is None) != (images is None):
        fail("--ann and --images go together")
    check_inference_settings(min_size=min_size, max_size=max_size)
    size_sets = [f"evaluation.{k}={v}" for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None]
    sets_by = split_overrides(size_sets + list(sets or []), ("model",))
    rec = evaluation_recipe(recipe, ann, images, overrides=sets_by["recipe"])
    # everything cheap before the run folder and the weights: device, files, tokenizer, prompt, weights name, adapter
    dev = resolve_device(device)
    plan = prepare_task(rec, split=split, data_root=data_root)
    ann_file, files = plan.ann_file, rec.split(plan.split)
    tok = resolve_tokenizer(tokenizer, weights)
    detection_prompt, notes = plan.prompt(tok)
    for note in notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    check_weights(weights)
    if adapter is not None:
        read_artifact_header(adapter)

    out = out or Path("runs") / "zeroshot" / safe_name(rec.name)
    partial_path = out / PARTIAL
    done_ids: set = set()
    results: list[dict] = []
    if partial_path.exists() and not force:
        if not resume:
            fail(f"{out} has results of an earlier run: pass --resume to continue it or --force to start over")
        done_ids, results = load_partial(partial_path)
    elif (out / "metrics.json").exists() and not force:
        fail(f"{out} holds a finished evaluation: pass --force to overwrite it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if force and partial_path.exists():
        partial_path.unlink()

    ev = rec.evaluation
    model, _ = load_model(
        weights, variant=variant, tokenizer=tokenizer, overrides=ev.model_overrides() + sets_by["model"]
    )
    encoded = EncodedPrompt.from_chunks(tok, detection_prompt.chunks, model.cfg.language.max_query_len)
    if adapter is not None:
        model = apply_adapter(model, adapter, weights=weights, captions=encoded.captions)
    model = model.to(dev).eval()

    dataset = DetectionDataset(plan.coco, plan.img_dir, model.cfg.input)
    if dataset.num_missing:
        err_console.print(
            f"[yellow]warning:[/] {dataset.num_missing} image(s) listed in {ann_file.name} are missing on disk: skipped"
        )
    workers = default_workers(dev) if workers is None else workers
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=dev.type == "cuda")
    chunks_note = f", {len(encoded.chunks)} prompt chunks" if len(encoded.chunks) > 1 else ""
    console.print(
        f"[bold]{rec.name}[/]: {len(dataset)} images ({files.img_dir}){chunks_note}; "
        f"model {model.cfg.variant} on {dev}" + (f"; resuming after {len(done_ids)} images" if done_ids else "")
    )

    written = [len(results)]
    with open(partial_path, "a", encoding="utf-8") as partial, progress_bar() as bar:
        task = bar.add_task("zero-shot", total=len(dataset), completed=len(done_ids), info="", unit="img")

        def on_batch(image_ids: list, batch_results: list[dict]) -> None:
            partial.write(json.dumps({"image_ids": image_ids, "results": batch_results}) + "\n")
            partial.flush()
            os.fsync(partial.fileno())
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
            amp=amp,
            progress=lambda n: bar.update(task, advance=n),
        )
        results.extend(new)
    position = {entry[0]: i for i, entry in enumerate(dataset.entries)}  # dataset order, however batched or resumed
    results.sort(key=lambda r: position.get(r["image_id"], len(position)))

    metrics = task_metrics(plan, results, encoded.captions)
    paths = write_results(out, results, metrics)
    if export_odinw is not None:
        atomic_write_text(export_odinw, json.dumps({rec.name.split("/", 1)[-1]: results}))
    partial_path.unlink(missing_ok=True)
    console.print(summary_table(metrics, title=f"{rec.name} ({files.img_dir})"))
    if metrics.get("per_category"):
        console.print(per_category_table(metrics["per_category"]))
    console.print(f"written: {', '.join(str(p) for p in paths.values())}")
