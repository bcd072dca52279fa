"""``glip zeroshot eval``: COCO AP of a model on a dataset, prompted with its category names."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import typer

from .common import console, default_tokenizer, err_console, fail, handle_errors, progress_bar, resolve_device

app = typer.Typer(help="Zero-shot transfer: evaluate a pretrained model on a dataset's category names.", no_args_is_help=True)

PARTIAL = "partial_results.jsonl"


def split_overrides(sets: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` keys starting with ``model.`` configure the model, the rest the recipe."""
    model, recipe = [], []
    for item in sets or []:
        (model if item.startswith("model.") else recipe).append(item.removeprefix("model."))
    return model, recipe


def adhoc_recipe(ann: Path, images: Path):
    """A recipe for a COCO dataset given by files: categories from the annotation file."""
    from ..recipes import parse_recipe

    return parse_recipe(
        {
            "name": ann.stem,
            "splits": {"val": {"ann_file": str(ann.resolve()), "img_dir": str(images.resolve())}},
            "categories": "from_annotations",
        },
        where=str(ann),
    )


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


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


@app.command("eval")
@handle_errors
def eval_command(
    recipe: str = typer.Option(None, "--recipe", "-r", help="Recipe name (glip recipes list) or YAML path."),
    weights: Path = typer.Option(None, "--weights", "-w", help="Official GLIP .pth, .safetensors or glip-nano (default: the recipe's)."),
    data_root: Path = typer.Option(Path("."), "--data-root", "-d", help="Folder the recipe's paths are under."),
    split: str = typer.Option(None, "--split", help="val | test (default: the recipe's)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder [runs/zeroshot/RECIPE]."),
    sets: list[str] = typer.Option(None, "--set", help="Override: evaluation.min_size=600, model.postprocess.nms_thresh=0.5"),
    ann: Path = typer.Option(None, "--ann", help="COCO JSON of a dataset without a recipe (with --images)."),
    images: Path = typer.Option(None, "--images", help="Image folder of --ann."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    force: bool = typer.Option(False, "--force", help="Start over even if --out has results."),
    export_odinw: Path = typer.Option(None, "--export-odinw", help='Write {"<dataset>": [results]} here.'),
    variant: str = typer.Option(None, "--variant", help="glip-t | glip-t-a | glip-l (detected)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Hub id or vocab folder (env GLIP_TOKENIZER)."),
    adapter: Path = typer.Option(None, "--adapter", help="A glip finetune artifact to apply."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    amp: bool = typer.Option(False, "--amp", help="CUDA mixed precision (bf16/fp16); CPU stays float32."),
    workers: int = typer.Option(0, "--workers", min=0, help="Image loading processes."),
    no_text_cache: bool = typer.Option(False, "--no-text-cache", hidden=True, help="Re-run BERT per batch."),
):
    """Evaluate on a recipe's dataset (or --ann/--images) and write COCO results and AP tables."""
    from ..checkpoint import load_model
    from ..config import apply_overrides
    from ..data import DetectionDataset, load_coco, make_loader
    from ..evaluation import coco_evaluate, lvis_evaluate, per_category_table, summary_table, write_results
    from ..inference import EncodedPrompt, evaluate_dataset
    from ..prompts import load_tokenizer
    from ..recipes import categories_not_in_recipe, evaluation_prompt, load_recipe, parse_recipe, recipe_to_dict, split_paths

    if (recipe is None) == (ann is None):
        fail("give --recipe NAME, or --ann FILE with --images DIR")
    if (ann is None) != (images is None):
        fail("--ann and --images go together")
    model_sets, recipe_sets = split_overrides(sets)
    rec = load_recipe(recipe) if recipe else adhoc_recipe(ann, images)
    if recipe_sets:
        data = {k: v for k, v in recipe_to_dict(rec).items() if k != "path"}
        rec = parse_recipe(apply_overrides(data, recipe_sets), where=f"--set on {rec.name}", path=rec.path)
    files = rec.split(split)
    if weights is None:
        if rec.weights is None:
            fail(f"recipe {rec.name} names no default weights: pass --weights (an official GLIP .pth or a .safetensors)")
        weights = Path(rec.weights)

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
    ann_file, img_dir = split_paths(rec, split, data_root)
    out.mkdir(parents=True, exist_ok=True)
    if force and partial_path.exists():
        partial_path.unlink()

    coco = load_coco(ann_file, require_annotations=False)
    ev = rec.evaluation
    overrides = [f"input.min_size={ev.min_size}", f"input.max_size={ev.max_size}", f"postprocess.detections_per_img={ev.detections_per_img}"]
    model, _ = load_model(weights, variant=variant, tokenizer=tokenizer, overrides=overrides + model_sets)
    tok = load_tokenizer(default_tokenizer(tokenizer, model.cfg.language.tokenizer))
    detection_prompt = evaluation_prompt(rec, tok, list(coco.categories.values()))
    for notice in detection_prompt.notices:
        err_console.print(f"[yellow]note:[/] {notice}")
    unprompted = categories_not_in_recipe(rec, list(coco.categories.values()))
    if unprompted:
        err_console.print(f"[yellow]note:[/] {len(unprompted)} annotation categories are not in the recipe and cannot be detected: "
                          + ", ".join(repr(n) for _, n in unprompted[:5]))  # fmt: skip
    encoded = EncodedPrompt.from_chunks(tok, detection_prompt.chunks, model.cfg.language.max_query_len)
    prompt_offset = None
    if adapter is not None:
        from ..training.artifacts import apply_adapter

        model, prompt_offset = apply_adapter(model, adapter, weights=weights, captions=encoded.captions)
    dev = resolve_device(device)
    model = model.to(dev).eval()

    dataset = DetectionDataset(coco, img_dir, model.cfg.input)
    if dataset.num_missing:
        err_console.print(f"[yellow]warning:[/] {dataset.num_missing} image(s) listed in {ann_file.name} are missing on disk: skipped")
    loader = make_loader(dataset, batch_size=batch_size, workers=workers)
    chunks_note = f", {len(encoded.chunks)} prompt chunks" if len(encoded.chunks) > 1 else ""
    console.print(f"[bold]{rec.name}[/]: {len(dataset)} images ({files.img_dir}){chunks_note}; "
                  f"model {model.cfg.variant} on {dev}" + (f"; resuming after {len(done_ids)} images" if done_ids else ""))  # fmt: skip

    written = [len(results)]
    with open(partial_path, "a", encoding="utf-8") as partial, progress_bar() as bar:
        task = bar.add_task("zero-shot", total=len(dataset), completed=len(done_ids), info="")

        def on_batch(image_ids: list, batch_results: list[dict]) -> None:
            partial.write(json.dumps({"image_ids": image_ids, "results": batch_results}) + "\n")
            partial.flush()
            os.fsync(partial.fileno())
            written[0] += len(batch_results)
            bar.update(task, info=f"{written[0]} detections")

        new = evaluate_dataset(
            model, loader, encoded, device=dev, prompt_offset=prompt_offset, cache_text=not no_text_cache,
            on_batch=on_batch, skip_image_ids=done_ids, amp=amp,
            progress=lambda n: bar.update(task, advance=n),
        )  # fmt: skip
        results.extend(new)

    if rec.evaluation.metric.startswith("lvis"):
        metrics = lvis_evaluate(ann_file, results, max_dets=ev.detections_per_img)
        metrics.setdefault("per_category", [])
    else:
        metrics = coco_evaluate(coco, results)
    metrics["recipe"] = rec.name
    metrics["captions"] = encoded.captions
    paths = write_results(out, results, metrics)
    if export_odinw is not None:
        from ..evaluation import atomic_write_text

        atomic_write_text(export_odinw, json.dumps({rec.name.split("/", 1)[-1]: results}))
    partial_path.unlink(missing_ok=True)
    console.print(summary_table(metrics, title=f"{rec.name} ({files.img_dir})"))
    if metrics.get("per_category"):
        console.print(per_category_table(metrics["per_category"]))
    console.print(f"written: {', '.join(str(p) for p in paths.values())}")
