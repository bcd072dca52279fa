"""One fine-tuning / pretraining run from command-line arguments: build the model, the mode, the
data, the trainer; train; evaluate the best weights on test; write the artifacts.

Run folder (``--out``)::

    config.json           what was run (mode, recipe, caption, base hash, TrainConfig, model config)
    log.jsonl             every step and every evaluation
    checkpoints/          last.safetensors, last.prev.safetensors (resume), best.safetensors
    prompt.safetensors | lora/ | weights.safetensors     the artifact of the mode
    model.safetensors     (pretraining) the whole pretrained model, loadable with --weights
    test/                 bbox.json, metrics.json, per_category.csv, report.md of the best weights
    curves.png            loss and val AP
    result.json           the summary; its presence marks a finished run
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, apply_overrides, to_dict
from .config import MODES, TrainConfig, apply_train_overrides, pretrain_config, train_config_for

RESULT_FILE = "result.json"
MODEL_FILE = "model.safetensors"  # what glip pretrain leaves: the whole pretrained model


@dataclass
class RunSpec:
    """The arguments of ``glip finetune`` / ``glip pretrain``."""

    mode: str = "full"
    recipe: str | None = None
    weights: Path | None = None
    variant: str | None = None
    out: Path | None = None
    shots: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    sets: list[str] = field(default_factory=list)
    data_root: Path = Path(".")
    device: str = "auto"
    tokenizer: str | None = None
    ann: Path | None = None
    images: Path | None = None
    val_ann: Path | None = None
    val_images: Path | None = None
    test_ann: Path | None = None
    test_images: Path | None = None
    resume: bool = False
    force: bool = False
    workers: int | None = None
    pretrain: bool = False
    progress: bool = True


def split_sets(sets: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``--set`` items -> (train.*, model.*, recipe) overrides, prefixes removed."""
    train, model, recipe = [], [], []
    for item in sets or []:
        key = item.split("=", 1)[0].strip()
        if key.startswith("train."):
            train.append(item.strip()[len("train."):])
        elif key.startswith("model."):
            model.append(item.strip()[len("model."):])
        else:
            recipe.append(item)
    return train, model, recipe


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- recipes and data files


def _adhoc_recipe(spec: RunSpec):
    from ..recipes import parse_recipe

    if spec.ann is None or spec.images is None:
        raise ConfigError("give --recipe NAME, or --ann FILE with --images DIR (and optionally --val-ann/--val-images)")
    splits = {"train": {"ann_file": str(spec.ann.resolve()), "img_dir": str(spec.images.resolve())}}
    for name, ann, img in (("val", spec.val_ann, spec.val_images), ("test", spec.test_ann, spec.test_images)):
        if (ann is None) != (img is None):
            raise ConfigError(f"--{name}-ann and --{name}-images go together")
        if ann is not None:
            splits[name] = {"ann_file": str(ann.resolve()), "img_dir": str(img.resolve())}
    data = {"name": spec.ann.stem, "splits": splits, "categories": "from_annotations",
            "evaluation": {"split": "val" if "val" in splits else "train"}}  # fmt: skip
    return parse_recipe(data, where=str(spec.ann))


def load_run_recipe(spec: RunSpec, recipe_sets: list[str]):
    from ..recipes import load_recipe, parse_recipe, recipe_to_dict

    if spec.recipe is not None and spec.ann is not None:
        raise ConfigError("give either --recipe or --ann/--images, not both")
    rec = load_recipe(spec.recipe) if spec.recipe else _adhoc_recipe(spec)
    if recipe_sets:
        data = {k: v for k, v in recipe_to_dict(rec).items() if k != "path"}
        rec = parse_recipe(apply_overrides(data, recipe_sets), where=f"--set on {rec.name}", path=rec.path)
    return rec


def split_files(rec, split: str, data_root: Path) -> tuple[Path, Path]:
    from ..recipes import split_paths

    return split_paths(rec, split, data_root)


# --------------------------------------------------------------------------- the prepared run


@dataclass
class Prepared:
    spec: RunSpec
    cfg: TrainConfig
    recipe: Any
    model: Any
    module: Any
    plan: Any
    tokenizer: Any
    prompt: Any  # FixedPrompt or None (per-image captions)
    encoded: Any  # EncodedPrompt for evaluation, or None
    dataset: Any
    val: Any  # DetectionDataset or None
    test: Any
    device: torch.device
    dist: Any
    base: str
    out: Path
    trainable: int
    total: int
    breakdown: dict
    notes: list = field(default_factory=list)


def prepare(spec: RunSpec, *, shuffle_seed: int | None = None, dist_info=None, device=None) -> Prepared:
    """Everything of a run but the training itself (what ``--dry-run`` shows)."""
    from ..checkpoint import load_model
    from ..commands.common import default_tokenizer
    from ..config import variant_config
    from ..data import DetectionDataset, load_coco
    from ..inference import EncodedPrompt
    from ..model.glip import build_glip
    from ..prompts import load_tokenizer
    from ..recipes import RecipeError, categories_not_in_recipe, evaluation_prompt
    from ..transforms import TrainTransform
    from .artifacts import base_hash
    from .data import (
        CaptionGroundingDataset,
        DetectionGroundingDataset,
        DetectionPretrainDataset,
        few_shot_image_ids,
        fixed_prompt,
        is_grounding_file,
    )
    from .distributed import DistInfo
    from .engine import TrainModule
    from .modes import apply_mode, count_parameters, trainable_breakdown

    dist_info = dist_info or DistInfo()
    if spec.mode not in MODES:
        raise ConfigError(f"--mode {spec.mode!r}: choose one of {', '.join(MODES)}")
    train_sets, model_sets, recipe_sets = split_sets(spec.sets)
    rec = load_run_recipe(spec, recipe_sets)
    if spec.pretrain:
        cfg = pretrain_config(rec.pretraining.train if rec.pretraining is not None else None)
    else:
        cfg = train_config_for(rec, spec.mode, spec.shots)
    if spec.epochs is not None:
        cfg.epochs = spec.epochs
    if spec.batch_size is not None:
        cfg.batch_size = spec.batch_size
    if spec.workers is not None:
        cfg.workers = spec.workers
    if shuffle_seed is not None:
        cfg.shuffle_seed = shuffle_seed
    cfg = apply_train_overrides(cfg, train_sets)
    if cfg.batch_size % dist_info.world:
        raise ConfigError(f"the global batch size {cfg.batch_size} is not divisible by the {dist_info.world} processes")
    notes: list[str] = []

    # model
    seed_everything(cfg.seed)
    ev = rec.evaluation
    overrides = [f"input.min_size={ev.min_size}", f"input.max_size={ev.max_size}", f"postprocess.detections_per_img={ev.detections_per_img}"]
    if spec.weights is None and spec.variant is None:  # the recipe's defaults
        if spec.pretrain and rec.pretraining is not None and rec.pretraining.variant:
            spec.variant = rec.pretraining.variant
        elif rec.weights:
            spec.weights = Path(rec.weights)
    if spec.weights is not None:
        model, _ = load_model(spec.weights, variant=spec.variant, tokenizer=spec.tokenizer, overrides=overrides + model_sets)
    else:
        if spec.variant is None:
            raise ConfigError("give --weights PATH (an official GLIP .pth or a .safetensors), or --variant NAME for an untrained model")
        from ..config import override_dataclass

        mcfg = variant_config(spec.variant)
        if spec.tokenizer:
            mcfg.language.tokenizer = spec.tokenizer
        mcfg = override_dataclass(mcfg, overrides + model_sets, "model")
        model = build_glip(mcfg)
        notes.append(f"no --weights: {spec.variant} with random initial weights (seed {cfg.seed})")
        if mcfg.language.pretrained:
            from ..text_encoders import packaged_language_state

            model.load_state_dict({**model.state_dict(), **packaged_language_state(mcfg.language.pretrained)})
            notes[-1] = f"no --weights: {spec.variant} with random initial vision weights (seed {cfg.seed}), language from {mcfg.language.pretrained}"
    model.cfg.head.gradient_checkpointing = cfg.gradient_checkpointing
    base = base_hash(spec.weights, model)
    tokenizer = load_tokenizer(default_tokenizer(spec.tokenizer, model.cfg.language.tokenizer))
    max_len = model.cfg.language.max_query_len

    # training data
    train_split = "train"
    train_ann, train_img = split_files(rec, train_split, spec.data_root)
    if cfg.few_shot_prepared and spec.shots:
        if rec.few_shot is None:
            raise RecipeError(f"recipe {rec.name} has no prepared few-shot files; drop train.few_shot_prepared")
        train_ann = spec.data_root / rec.few_shot.ann_file("train", spec.shots, cfg.shuffle_seed)
    coco = load_coco(train_ann, invalid_boxes="drop")
    image_ids = None
    if spec.shots and not cfg.few_shot_prepared:
        image_ids = few_shot_image_ids(coco, spec.shots, cfg.shuffle_seed)
        notes.append(f"{spec.shots}-shot subset (shuffle seed {cfg.shuffle_seed}): {len(image_ids)} of {len(coco.images)} images")
    transform = TrainTransform(model.cfg.input, min_sizes=cfg.min_sizes, max_size=cfg.max_size, flip_prob=cfg.flip_prob)
    common = dict(seed=cfg.seed, image_ids=image_ids, copies=cfg.copies)
    annotation_categories = list(coco.categories.values())
    detection_prompt = None
    prompt = None
    grounding = spec.pretrain and is_grounding_file(coco)
    if spec.pretrain:
        if grounding:
            dataset = CaptionGroundingDataset(coco, train_img, transform, tokenizer, max_len=max_len, **common)
        else:
            dataset = DetectionPretrainDataset(coco, train_img, transform, tokenizer, negatives=cfg.negatives, max_len=max_len, **common)
    else:
        detection_prompt = evaluation_prompt(rec, tokenizer, annotation_categories)
        if detection_prompt.chunked:
            raise RecipeError(
                f"recipe {rec.name}: the categories need {len(detection_prompt.chunks)} captions of at most {max_len} tokens; "
                "fine-tuning trains with one caption for every image: shorten the names (a prompt file) or use fewer categories"
            )
        missing = categories_not_in_recipe(rec, annotation_categories)
        if missing:
            notes.append(f"{len(missing)} annotation categories are not in the recipe; their boxes are not trained on: "
                         + ", ".join(repr(n) for _, n in missing[:5]))  # fmt: skip
        prompt = fixed_prompt(tokenizer, detection_prompt.chunks[0], max_len)
        dataset = DetectionGroundingDataset(coco, train_img, transform, prompt, **common)

    # evaluation data: val (model selection) and test (the best weights), prompted with the
    # training caption (fine-tuning) or the recipe's evaluation prompt (pretraining)
    val = test = encoded = None
    if spec.recipe is not None:
        val_split = rec.tuning.val_split if rec.tuning is not None else rec.evaluation.split
        test_split = rec.tuning.test_split if rec.tuning is not None else None
    else:
        val_split = "val" if spec.val_ann is not None else None
        test_split = "test" if spec.test_ann is not None else None
    if spec.pretrain and val_split == train_split:
        val_split = None
    if test_split == val_split:
        test_split = None
    if val_split is not None:
        val_ann, val_img = split_files(rec, val_split, spec.data_root)
        val_coco = load_coco(val_ann, require_annotations=False)
        val = DetectionDataset(val_coco, val_img, model.cfg.input)
        if detection_prompt is None:
            detection_prompt = evaluation_prompt(rec, tokenizer, list(val_coco.categories.values()))
    else:
        notes.append("no validation split: no model selection, the final weights are kept")
    if test_split is not None:
        test_ann, test_img = split_files(rec, test_split, spec.data_root)
        test = DetectionDataset(load_coco(test_ann, require_annotations=False), test_img, model.cfg.input)
        if detection_prompt is None:
            detection_prompt = evaluation_prompt(rec, tokenizer, list(test.coco.categories.values()))
    if detection_prompt is not None:
        encoded = EncodedPrompt.from_chunks(tokenizer, detection_prompt.chunks, max_len)

    # mode
    plan = apply_mode(model, spec.mode if not spec.pretrain else "full", cfg)
    device = device or torch.device("cpu")
    module = TrainModule(model, plan).to(device)
    extra = {"prompt_offset": module.prompt_offset} if module.prompt_offset is not None else None
    trainable, total = count_parameters(model, plan, extra)
    breakdown = trainable_breakdown(model, extra)

    kind = "pretrain" if spec.pretrain else spec.mode
    out = spec.out or Path("runs") / ("pretrain" if spec.pretrain else "finetune") / safe_name(rec.name) / (
        kind + (f"_{spec.shots}shot" if spec.shots else ""))  # fmt: skip
    return Prepared(spec, cfg, rec, model, module, plan, tokenizer, prompt, encoded, dataset, val, test, device,
                    dist_info, base, Path(out), trainable, total, breakdown, notes)  # fmt: skip


# --------------------------------------------------------------------------- guards on the run folder


def check_out_dir(out: Path, *, resume: bool, force: bool) -> str:
    """'new', 'resume' or 'force' for a run folder; raises ConfigError on a clash."""
    from .state import has_checkpoint

    finished = (out / RESULT_FILE).exists()
    started = has_checkpoint(out / "checkpoints") or (out / "log.jsonl").exists()
    if force:
        return "force" if (finished or started) else "new"
    if finished:
        raise ConfigError(f"{out} holds a finished run: pass --force to overwrite it, or choose another --out")
    if started and not resume:
        raise ConfigError(f"{out} holds an unfinished run: pass --resume to continue it or --force to start over")
    return "resume" if started and resume else "new"


OWNED = ("checkpoints", "log.jsonl", "config.json", "result.json", "curves.png", "test", "val", "prompt.safetensors",
         "weights.safetensors", "lora", MODEL_FILE)  # fmt: skip


def clear_run_dir(out: Path) -> None:
    """Remove what an earlier run wrote (only our own files)."""
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# --------------------------------------------------------------------------- training


def _evaluator(prep: Prepared, dataset):
    from .evaluate import evaluate

    amp = prep.cfg.amp and prep.device.type == "cuda"

    def run(model, prompt_offset):
        _, metrics = evaluate(model, dataset, prep.encoded, batch_size=prep.cfg.eval_batch_size, device=prep.device,
                              prompt_offset=prompt_offset, amp=amp, workers=prep.cfg.workers)  # fmt: skip
        return metrics

    return run


def run_config(prep: Prepared) -> dict:
    """What ``config.json`` records."""
    return {
        "kind": "pretrain" if prep.spec.pretrain else "finetune",
        "mode": prep.plan.mode,
        "recipe": prep.recipe.name,
        "shots": prep.spec.shots,
        "shuffle_seed": prep.cfg.shuffle_seed,
        "caption": prep.prompt.caption if prep.prompt is not None else None,
        "base_sha256": prep.base,
        "weights": str(prep.spec.weights) if prep.spec.weights else None,
        "variant": prep.model.cfg.variant,
        "trainable": prep.trainable,
        "total": prep.total,
        "train": to_dict(prep.cfg),
        "model": to_dict(prep.model.cfg),
        "lora": prep.plan.lora,
        "images": getattr(prep.dataset, "num_images", None),
        "world_size": prep.dist.world,
    }


def write_artifact(prep: Prepared, trainer) -> Path:
    """The mode's artifact from the weights now in the model (the best ones after training)."""
    from .artifacts import LORA_DIR, PROMPT_FILE, WEIGHTS_FILE, save_lora_artifact, save_prompt_artifact, save_weights_artifact

    caption = prep.prompt.caption if prep.prompt is not None else ""
    extra = {"variant": prep.model.cfg.variant, "shots": prep.spec.shots, "shuffle_seed": prep.cfg.shuffle_seed,
             "best_val_ap": trainer.state.best_ap, "best_epoch": trainer.state.best_epoch}  # fmt: skip
    mode = prep.plan.mode
    if mode == "prompt":
        return save_prompt_artifact(prep.out / PROMPT_FILE, prep.module.prompt_offset, caption=caption,
                                    recipe=prep.recipe.name, base=prep.base, extra=extra)  # fmt: skip
    tensors = {n: p for n, p in prep.module.named_trainable()}
    if mode == "lora":
        return save_lora_artifact(prep.out / LORA_DIR, tensors, prep.plan.lora, caption=caption, recipe=prep.recipe.name,
                                  base=prep.base, extra=extra)  # fmt: skip
    extra.update(glip_config=json.dumps(to_dict(prep.model.cfg)), train_config=json.dumps(to_dict(prep.cfg)))
    return save_weights_artifact(prep.out / WEIGHTS_FILE, tensors, mode=mode, caption=caption, recipe=prep.recipe.name,
                                 base=prep.base, extra=extra)  # fmt: skip


def train_run(prep: Prepared, console=None) -> dict:
    """Train, then evaluate the best weights on test and write the artifacts; returns the summary
    (also written to ``result.json``), or ``{"status": "stopped", ...}`` after ``stop_after_steps``."""
    from ..evaluation import atomic_write_text, scalar_metrics, write_results
    from .distributed import barrier
    from .engine import Trainer
    from .evaluate import evaluate
    from .report import plot_curves, read_log

    spec, out, main = prep.spec, prep.out, prep.dist.main
    how = check_out_dir(out, resume=spec.resume, force=spec.force)
    barrier(prep.dist)
    if how == "force" and main:
        clear_run_dir(out)
    barrier(prep.dist)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(prep.module, prep.cfg, prep.dataset, device=prep.device, out_dir=out, prompt=prep.prompt,
                      evaluate=_evaluator(prep, prep.val) if prep.val is not None else None, dist_info=prep.dist,
                      console=console, progress=spec.progress)  # fmt: skip
    resumed = trainer.resume() if how == "resume" else False
    if main:
        atomic_write_text(out / "config.json", json.dumps(run_config(prep), indent=2, default=str) + "\n")
        if console is not None and resumed:
            console.print(f"resuming at step {trainer.state.step} (epoch {trainer.state.epoch}, batch {trainer.state.batch})")
    result = trainer.fit()
    if result.status == "stopped":
        return {"status": "stopped", "step": result.state.step, "out": str(out)}

    trainer.load_best()
    summary: dict[str, Any] = {
        "status": "finished", "mode": prep.plan.mode, "recipe": prep.recipe.name, "shots": spec.shots,
        "shuffle_seed": prep.cfg.shuffle_seed, "seed": prep.cfg.seed, "trainable": prep.trainable, "total": prep.total,
        "steps": result.state.step, "skipped_steps": result.state.skipped, "epochs": result.state.epoch,
        "stopped_early": result.state.stopped_early, "best_epoch": result.state.best_epoch,
        "best_val_AP": result.state.best_ap if prep.val is not None else None, "base_sha256": prep.base,
    }  # fmt: skip
    if main:
        if prep.test is not None:
            results, metrics = evaluate(prep.model, prep.test, prep.encoded, batch_size=prep.cfg.eval_batch_size, device=prep.device,
                                        prompt_offset=prep.module.prompt_offset,
                                        amp=prep.cfg.amp and prep.device.type == "cuda", workers=prep.cfg.workers)  # fmt: skip
            write_results(out / "test", results, metrics)
            summary["test"] = scalar_metrics({k: v for k, v in metrics.items() if k not in ("num_detections",)})
            if console is not None:
                console.print(f"test (best weights, epoch {result.state.best_epoch}): AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}")
        artifact = write_artifact(prep, trainer)
        summary["artifact"] = str(artifact)
        if spec.pretrain:  # the pretrained model itself, for --weights (a packaged language encoder left out)
            from ..checkpoint import save_model

            save_model(prep.model, out / MODEL_FILE, metadata={"recipe": prep.recipe.name, "steps": result.state.step,
                                                               "train_config": json.dumps(to_dict(prep.cfg))})  # fmt: skip
            summary["model"] = str(out / MODEL_FILE)
        try:
            plot_curves(read_log(out / "log.jsonl"), out / "curves.png", title=f"{prep.recipe.name} — {prep.plan.mode}")
        except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
            summary["plot_error"] = str(e)
        atomic_write_text(out / RESULT_FILE, json.dumps(summary, indent=2, default=str) + "\n")
    barrier(prep.dist)
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)
