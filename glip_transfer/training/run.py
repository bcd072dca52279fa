"""One fine-tuning / pretraining run from command-line arguments: build the model, the mode, the
data, the trainer; train; evaluate the best weights on test; write the artifacts.

:func:`prepare` builds everything but the training (what ``--dry-run`` shows) from a
:class:`RunSpec`, one builder per concern (:func:`build_train_config`, :func:`build_model`,
:func:`build_train_data`, :func:`build_eval_data`); :func:`train_run` trains and writes.

Run folder (``--out``)::

    config.json           what was run (mode, recipe, caption, base hash, TrainConfig, model config)
                          and its provenance record (glip_transfer.provenance)
    log.jsonl             every step and every evaluation (and what a resume applied)
    checkpoints/          while running: last.safetensors (resume), best.safetensors (the best
                          weights so far); removed when the run finishes (--keep-checkpoints keeps
                          last)
    prompt.safetensors | lora/ | weights.safetensors     the artifact of the mode: the best weights
    model.safetensors     (pretraining) the whole pretrained model, loadable with --weights
    test/                 bbox.json, metrics.json, per_category.csv, report.md of the best weights
    curves.png            loss and val AP
    result.json           the summary and the provenance; its presence marks a finished run
    .glip.lock            while a run is writing here (glip_transfer.runlock)
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console

from ..checkpoint import load_model, resolve_weights, save_model
from ..config import ConfigError, override_dataclass, split_overrides, to_dict, variant_config
from ..data import DetectionDataset, load_coco
from ..evaluation import crowded_images, scalar_metrics, write_results
from ..files import FULL_DISK_HINT, OutputError, output_error, write_text
from ..hub import DEFAULT_WEIGHTS
from ..inference import EncodedPrompt
from ..model.glip import GLIP, build_glip
from ..prompts import DetectionPrompt
from ..provenance import effective_evaluation, file_record, record, tokens_sha256
from ..recipes import (
    EvaluationConfig,
    Recipe,
    RecipeError,
    adhoc_recipe,
    categories_not_in_recipe,
    dataset_name,
    evaluation_prompt,
    load_recipe,
    override_recipe,
    safe_name,
    split_paths,
)
from ..runlock import LOCK_FILE, RunLock, RunLocked
from ..runtime import precision_name
from ..tokenizer import default_tokenizer, load_tokenizer
from ..transforms import TrainTransform
from .artifacts import base_hash, save_artifact
from .config import TrainConfig, apply_train_overrides, pretrain_config
from .data import (
    AugmentedCoco,
    CaptionGroundingDataset,
    DetectionGroundingDataset,
    DetectionPretrainDataset,
    FixedPrompt,
    few_shot_image_ids,
    fixed_prompt,
    is_grounding_file,
)
from .distributed import DistInfo, barrier, broadcast_object
from .engine import Trainer, TrainModule
from .evaluate import evaluate
from .modes import ModePlan, apply_mode, count_parameters, get_mode, train_config_for, trainable_breakdown
from .report import plot_curves, read_log
from .state import BEST, has_checkpoint, remove_resumable

if TYPE_CHECKING:  # transformers costs a second to import; the tokenizer is loaded where needed
    from transformers import PreTrainedTokenizerBase

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
    keep_checkpoints: bool = False  # keep the resumable state (optimiser included) of a finished run
    dry_run: bool = False  # build everything, train nothing: the run folder is neither checked nor written


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- builders


def run_recipe(spec: RunSpec, recipe_sets: list[str]) -> Recipe:
    """The run's recipe (``--recipe``, or one made from ``--ann`` / ``--images`` and the optional
    val / test files) with the ``--set`` overrides of its keys."""
    if spec.recipe is not None and spec.ann is not None:
        raise ConfigError("give either --recipe or --ann/--images, not both")
    if spec.recipe is not None:
        return override_recipe(load_recipe(spec.recipe), recipe_sets)
    if spec.ann is None or spec.images is None:
        raise ConfigError("give --recipe NAME, or --ann FILE with --images DIR (and optionally --val-ann/--val-images)")
    splits = {"train": (spec.ann, spec.images)}
    for name, ann, images in (("val", spec.val_ann, spec.val_images), ("test", spec.test_ann, spec.test_images)):
        if (ann is None) != (images is None):
            raise ConfigError(f"--{name}-ann and --{name}-images go together")
        if ann is not None:
            splits[name] = (ann, images)
    return override_recipe(adhoc_recipe(splits, eval_split="val" if "val" in splits else "train"), recipe_sets)


def build_train_config(
    spec: RunSpec, recipe: Recipe, train_sets: list[str], *, shuffle_seed: int | None, world: int
) -> TrainConfig:
    """The recipe's official settings for the mode (or pretraining's), then the command line."""
    if spec.pretrain:
        cfg = pretrain_config(recipe.pretraining.train if recipe.pretraining is not None else None)
    else:
        cfg = train_config_for(recipe, spec.mode, spec.shots)
    if spec.epochs is not None:
        cfg.epochs = spec.epochs
    if spec.batch_size is not None:
        cfg.batch_size = spec.batch_size
    if spec.workers is not None:
        cfg.workers = spec.workers
    if shuffle_seed is not None:
        cfg.shuffle_seed = shuffle_seed
    cfg = apply_train_overrides(cfg, train_sets)
    if cfg.batch_size % world:
        raise ConfigError(f"the global batch size {cfg.batch_size} is not divisible by the {world} processes")
    return cfg


def starting_point(
    weights: str | None, variant: str | None, recipe: Recipe | None, pretrain: bool
) -> tuple[str | None, str | None]:
    """``(weights, variant)`` a run starts from. Given neither: a pretraining recipe's variant
    (random vision weights), else the recipe's default weights, else glip-t (fine-tuning; a
    pretraining run without a recipe variant needs one of the two)."""
    if weights is not None or variant is not None:
        return weights, variant
    if pretrain and recipe is not None and recipe.pretraining is not None and recipe.pretraining.variant:
        return None, recipe.pretraining.variant
    recipe_weights = recipe.weights if recipe is not None else None
    if recipe_weights or not pretrain:
        return recipe_weights or DEFAULT_WEIGHTS, None
    return None, None


def build_model(spec: RunSpec, recipe: Recipe, model_sets: list[str], seed: int) -> tuple[GLIP, list[str]]:
    """The base model (``--weights``, or ``--variant`` with random weights drawn from ``seed``),
    configured to evaluate as the recipe says, then by ``--set model.*``; and notes for the user."""
    seed_everything(seed)
    overrides = recipe.evaluation.model_overrides() + model_sets
    spec.weights, spec.variant = starting_point(spec.weights, spec.variant, recipe, spec.pretrain)
    if spec.weights is not None:
        model, _ = load_model(spec.weights, variant=spec.variant, tokenizer=spec.tokenizer, overrides=overrides)
        return model, []
    if spec.variant is None:
        raise ConfigError(
            "give --weights PATH (an official GLIP .pth or a .safetensors), or --variant NAME for an untrained model"
        )
    cfg = variant_config(spec.variant)
    if spec.tokenizer:
        cfg.language.tokenizer = spec.tokenizer
    model = build_glip(override_dataclass(cfg, overrides, "model"))
    if not cfg.language.pretrained:
        return model, [f"no --weights: {spec.variant} with random initial weights (seed {seed})"]
    from ..text_encoders import packaged_language_state

    model.load_state_dict({**model.state_dict(), **packaged_language_state(cfg.language.pretrained)})
    return model, [
        f"no --weights: {spec.variant} with random initial vision weights (seed {seed}), "
        f"language from {cfg.language.pretrained}"
    ]


@dataclass
class TrainData:
    """The training set, its fixed prompt (fine-tuning; None: a caption per image) and the
    detection prompt it was made from, with notes for the user."""

    dataset: AugmentedCoco
    prompt: FixedPrompt | None
    detection_prompt: DetectionPrompt | None
    notes: list[str] = field(default_factory=list)


def build_train_data(
    spec: RunSpec, recipe: Recipe, cfg: TrainConfig, model: GLIP, tokenizer: PreTrainedTokenizerBase
) -> TrainData:
    """The training split (a few-shot subset with ``--shots``) as grounding data: under the
    recipe's one caption (fine-tuning), or its own captions / sampled ones (pretraining)."""
    notes: list[str] = []
    max_len = model.cfg.language.max_query_len
    train_ann, train_img = split_paths(recipe, "train", spec.data_root)
    if cfg.few_shot_prepared and spec.shots:
        if recipe.few_shot is None:
            raise RecipeError(f"recipe {recipe.name} has no prepared few-shot files; drop train.few_shot_prepared")
        train_ann = spec.data_root / recipe.few_shot.ann_file("train", spec.shots, cfg.shuffle_seed)
    coco = load_coco(train_ann)
    image_ids = None
    if spec.shots and not cfg.few_shot_prepared:
        image_ids = few_shot_image_ids(coco, spec.shots, cfg.shuffle_seed)
        notes.append(
            f"{spec.shots}-shot subset (shuffle seed {cfg.shuffle_seed}): {len(image_ids)} of {len(coco.images)} images"
        )
    transform = TrainTransform(model.cfg.input, min_sizes=cfg.min_sizes, max_size=cfg.max_size, flip_prob=cfg.flip_prob)
    common = dict(seed=cfg.seed, image_ids=image_ids, copies=cfg.copies)
    if spec.pretrain:
        if is_grounding_file(coco):
            dataset = CaptionGroundingDataset(coco, train_img, transform, tokenizer, max_len=max_len, **common)
        else:
            dataset = DetectionPretrainDataset(
                coco, train_img, transform, tokenizer, negatives=cfg.negatives, max_len=max_len, **common
            )
        return TrainData(dataset, None, None, notes)
    annotation_categories = list(coco.categories.values())
    detection_prompt = evaluation_prompt(recipe, tokenizer, annotation_categories)
    if detection_prompt.chunked:
        raise RecipeError(
            f"recipe {recipe.name}: the categories need {len(detection_prompt.chunks)} captions of at most {max_len} "
            "tokens; "
            "fine-tuning trains with one caption for every image: shorten the names (a prompt file) or use fewer "
            "categories"
        )
    missing = categories_not_in_recipe(recipe, annotation_categories)
    if missing:
        notes.append(
            f"{len(missing)} annotation categories are not in the recipe; their boxes are not trained on: "
            + ", ".join(repr(n) for _, n in missing[:5])
        )
    prompt = fixed_prompt(tokenizer, detection_prompt.chunks[0], max_len)
    dataset = DetectionGroundingDataset(coco, train_img, transform, prompt, **common)
    return TrainData(dataset, prompt, detection_prompt, notes)


@dataclass
class EvalData:
    """Validation (model selection) and test (the best weights) sets and the prompt both are
    evaluated with: the training caption (fine-tuning) or the recipe's evaluation prompt."""

    val: DetectionDataset | None
    test: DetectionDataset | None
    encoded: EncodedPrompt | None
    notes: list[str] = field(default_factory=list)


def build_eval_data(
    spec: RunSpec,
    recipe: Recipe,
    model: GLIP,
    tokenizer: PreTrainedTokenizerBase,
    detection_prompt: DetectionPrompt | None,
) -> EvalData:
    if spec.recipe is not None:
        val_split = recipe.tuning.val_split if recipe.tuning is not None else recipe.evaluation.split
        test_split = recipe.tuning.test_split if recipe.tuning is not None else None
    else:
        val_split = "val" if spec.val_ann is not None else None
        test_split = "test" if spec.test_ann is not None else None
    if spec.pretrain and val_split == "train":
        val_split = None
    if test_split == val_split:
        test_split = None
    sets: dict[str, DetectionDataset] = {}
    for split in (val_split, test_split):
        if split is None:
            continue
        ann, images = split_paths(recipe, split, spec.data_root)
        sets[split] = DetectionDataset(load_coco(ann, require_annotations=False), images, model.cfg.input)
        if detection_prompt is None:
            detection_prompt = evaluation_prompt(recipe, tokenizer, list(sets[split].coco.categories.values()))
    notes = [] if val_split is not None else ["no validation split: no model selection, the final weights are kept"]
    for dataset in sets.values():
        crowded = crowded_images(dataset, model.cfg.postprocess.detections_per_img)
        if crowded:
            notes.append(f"{dataset.coco.path.name}: {crowded}")
    encoded = None
    if detection_prompt is not None:
        encoded = EncodedPrompt.from_chunks(tokenizer, detection_prompt.chunks, model.cfg.language.max_query_len)
    return EvalData(sets.get(val_split), sets.get(test_split), encoded, notes)


# --------------------------------------------------------------------------- the prepared run


@dataclass
class Prepared:
    """Everything a run needs but the training itself."""

    spec: RunSpec
    cfg: TrainConfig
    recipe: Recipe
    model: GLIP
    module: TrainModule
    plan: ModePlan
    tokenizer: PreTrainedTokenizerBase
    prompt: FixedPrompt | None  # None: a caption per image (pretraining)
    encoded: EncodedPrompt | None  # the evaluation prompt, None without evaluation splits
    dataset: AugmentedCoco
    val: DetectionDataset | None
    test: DetectionDataset | None
    device: torch.device
    dist: DistInfo
    base: str  # the base model's identity (artifacts.base_hash)
    evaluation: EvaluationConfig  # validation and test: the settings glip zeroshot eval uses too
    out: Path
    trainable: int
    total: int
    breakdown: dict[str, int]
    notes: list[str] = field(default_factory=list)


def default_out(spec: RunSpec, recipe: Recipe) -> Path:
    """``runs/finetune/<recipe>/<mode>[_<k>shot]`` or ``runs/pretrain/<recipe>/pretrain``; for
    ``--ann`` the dataset's folder name (:func:`~glip_transfer.recipes.dataset_name`) instead of
    the recipe's (Roboflow's ``<name>/train/_annotations.coco.json`` files would all collide)."""
    kind = "pretrain" if spec.pretrain else spec.mode
    leaf = kind + (f"_{spec.shots}shot" if spec.shots else "")
    name = dataset_name(spec.ann, with_split=False) if spec.recipe is None and spec.ann is not None else recipe.name
    return Path("runs") / ("pretrain" if spec.pretrain else "finetune") / safe_name(name) / leaf


def check_out_path(out: Path) -> None:
    """A one-line error, before anything is loaded, when ``--out`` is a file."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run (checkpoints, logs, weights, results)")


def prepare(
    spec: RunSpec,
    *,
    shuffle_seed: int | None = None,
    dist_info: DistInfo | None = None,
    device: torch.device | None = None,
) -> Prepared:
    """Everything of a run but the training itself (what ``--dry-run`` shows)."""
    dist_info = dist_info or DistInfo()
    mode = "full" if spec.pretrain else get_mode(spec.mode).name
    sets = split_overrides(spec.sets, ("train", "model"))
    recipe = run_recipe(spec, sets["recipe"])
    out = Path(spec.out or default_out(spec, recipe))
    check_out_path(out)
    if not spec.dry_run and dist_info.main:
        check_run_folder(out, resume=spec.resume, force=spec.force)
    cfg = build_train_config(spec, recipe, sets["train"], shuffle_seed=shuffle_seed, world=dist_info.world)
    model, notes = build_model(spec, recipe, sets["model"], cfg.seed)
    base = base_hash(spec.weights, model)
    tokenizer = load_tokenizer(default_tokenizer(spec.tokenizer, model.cfg.language.tokenizer))
    train = build_train_data(spec, recipe, cfg, model, tokenizer)
    evaluation = build_eval_data(spec, recipe, model, tokenizer, train.detection_prompt)
    plan = apply_mode(model, mode, cfg)
    device = device or torch.device("cpu")
    module = TrainModule(model, plan).to(device)
    trainable, total = count_parameters(model)
    return Prepared(
        spec=spec,
        cfg=cfg,
        recipe=recipe,
        model=model,
        module=module,
        plan=plan,
        tokenizer=tokenizer,
        prompt=train.prompt,
        encoded=evaluation.encoded,
        dataset=train.dataset,
        val=evaluation.val,
        test=evaluation.test,
        device=device,
        dist=dist_info,
        base=base,
        evaluation=recipe.evaluation,
        out=out,
        trainable=trainable,
        total=total,
        breakdown=trainable_breakdown(model),
        notes=notes + train.notes + evaluation.notes,
    )


# --------------------------------------------------------------------------- guards on the run folder


def check_out_dir(out: Path, *, resume: bool, force: bool) -> str:
    """'new', 'resume' or 'force' for a run folder; raises ConfigError on a clash."""
    finished = (out / RESULT_FILE).exists()
    started = has_checkpoint(out / "checkpoints") or (out / "log.jsonl").exists()
    if force:
        return "force" if (finished or started) else "new"
    if finished:
        raise ConfigError(f"{out} holds a finished run: pass --force to overwrite it, or choose another --out")
    if started and not resume:
        raise ConfigError(f"{out} holds an unfinished run: pass --resume to continue it or --force to start over")
    return "resume" if started and resume else "new"


def check_run_folder(out: Path, *, resume: bool, force: bool) -> None:
    """The refusals of a run folder, before anything is loaded (:func:`train_run` checks again,
    under the lock): a finished or unfinished run there without ``--force`` / ``--resume``, or
    another run holding it (:class:`~glip_transfer.runlock.RunLock`)."""
    check_out_dir(out, resume=resume, force=force)
    if (out / LOCK_FILE).exists():
        RunLock(out).acquire().release()  # refused while its owner lives; a dead one's lock is dropped


OWNED = (
    "checkpoints",
    "log.jsonl",
    "config.json",
    "result.json",
    "curves.png",
    "test",
    "val",
    "prompt.safetensors",
    "weights.safetensors",
    "lora",
    MODEL_FILE,
)


def clear_run_dir(out: Path) -> None:
    """Remove what an earlier run wrote (only our own files)."""
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# --------------------------------------------------------------------------- training


def evaluate_on(prep: Prepared, dataset: DetectionDataset) -> tuple[list[dict], dict[str, Any]]:
    """COCO results and metrics of the model as it is now on ``dataset``, with the run's prompt."""
    return evaluate(
        prep.model,
        dataset,
        prep.encoded,
        batch_size=prep.evaluation.batch_size_on(prep.device),
        device=prep.device,
        amp=prep.evaluation.amp,
        workers=prep.cfg.workers,
        metric=prep.evaluation.metric,
    )


def run_record(prep: Prepared) -> dict[str, Any]:
    """The provenance record of a run (:mod:`glip_transfer.provenance`): what trained, on what
    data, evaluated how, with which versions; its :data:`~glip_transfer.provenance.TRAINING` part
    is saved with every checkpoint and checked on ``--resume``."""
    spec = prep.spec
    weights = {
        "given": str(spec.weights) if spec.weights is not None else None,
        "path": str(resolve_weights(spec.weights).resolve()) if spec.weights is not None else None,
        "sha256": prep.base,
    }
    data: dict[str, Any] = {
        "train": file_record(prep.dataset.coco.path),
        "train_images": str(prep.dataset.image_root.resolve()),
        "shots": spec.shots,
        "shuffle_seed": prep.cfg.shuffle_seed,
    }
    for name, dataset in (("val", prep.val), ("test", prep.test)):
        data[name] = file_record(dataset.coco.path) if dataset is not None else None
    precision = precision_name(prep.device, prep.evaluation.amp)
    batch_size = prep.evaluation.batch_size_on(prep.device)
    return record(
        kind="pretrain" if spec.pretrain else "finetune",
        device=str(prep.device),
        world_size=prep.dist.world,
        weights=weights,
        variant=prep.model.cfg.variant,
        mode=prep.plan.mode,
        overrides=list(spec.sets),
        recipe=prep.recipe.name,
        captions=[prep.prompt.caption] if prep.prompt is not None else None,
        tokens_sha256=tokens_sha256([prep.prompt.input_ids]) if prep.prompt is not None else None,
        data=data,
        evaluation=effective_evaluation(prep.evaluation, prep.model.cfg, batch_size=batch_size, precision=precision),
        train=to_dict(prep.cfg),
        model=to_dict(prep.model.cfg),
    )


def run_config(prep: Prepared, provenance: dict | None = None) -> dict:
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
        "images": prep.dataset.num_images,
        "world_size": prep.dist.world,
        "provenance": provenance if provenance is not None else run_record(prep),
    }


def write_artifact(prep: Prepared, trainer: Trainer) -> Path:
    """The mode's artifact from the weights now in the model (the best ones after training)."""
    extra = {
        "variant": prep.model.cfg.variant,
        "shots": prep.spec.shots,
        "shuffle_seed": prep.cfg.shuffle_seed,
        "best_val_ap": trainer.state.best_ap,
        "best_epoch": trainer.state.best_epoch,
        "glip_config": json.dumps(to_dict(prep.model.cfg)),
        "train_config": json.dumps(to_dict(prep.cfg)),
    }
    return save_artifact(
        prep.plan.definition.artifact,
        prep.out,
        prep.model,
        mode=prep.plan.mode,
        lora_config=prep.plan.lora,
        caption=prep.prompt.caption if prep.prompt is not None else "",
        recipe=prep.recipe.name,
        base=prep.base,
        extra=extra,
    )


def train_run(prep: Prepared, console: Console | None = None, *, stop_after_steps: int = 0) -> dict:
    """Train, then evaluate the best weights on test and write the artifacts; returns the summary
    (also written to ``result.json``). The run folder is locked while this runs
    (:class:`~glip_transfer.runlock.RunLock`; another run there fails in one line). A finished run
    keeps one copy of its best weights (the artifact) and drops the checkpoints unless
    ``spec.keep_checkpoints`` (which keeps the resumable ``last``). ``stop_after_steps`` (a hook
    for tests and tools): stop as if killed after that many steps, with the ``last`` checkpoint
    written, and return ``{"status": "stopped", ...}``."""
    lock = RunLock(prep.out) if prep.dist.main else None
    error: Exception | None = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLocked as e:
            error = e
        except OSError as e:
            error = output_error(prep.out, e)
    message = broadcast_object(str(error) if error is not None else None, prep.dist)  # every process stops
    if message is not None:
        raise error if error is not None else RunLocked(message)
    try:
        if lock is not None and lock.notice and console is not None:
            console.print(f"note: {lock.notice}", highlight=False, markup=False)
        return _train_locked(prep, console, stop_after_steps)
    except OutputError as e:
        text = str(e).removesuffix(FULL_DISK_HINT)
        fix = "free some space" if text != str(e) else "fix that"
        raise OutputError(f"{text}; what was written before is kept: {fix} and continue with --resume") from None
    finally:
        if lock is not None:
            lock.release()


def _train_locked(prep: Prepared, console: Console | None, stop_after_steps: int) -> dict:
    spec, out, main = prep.spec, prep.out, prep.dist.main
    how = check_out_dir(out, resume=spec.resume, force=spec.force)
    barrier(prep.dist)
    if how == "force" and main:
        clear_run_dir(out)
    barrier(prep.dist)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    provenance = run_record(prep)
    provenance["started"] = provenance["date"]  # a resume sets the first start (Trainer.resume)
    validate = (lambda model: evaluate_on(prep, prep.val)[1]) if prep.val is not None else None
    trainer = Trainer(
        prep.module,
        prep.cfg,
        prep.dataset,
        device=prep.device,
        out_dir=out,
        prompt=prep.prompt,
        evaluate=validate,
        dist_info=prep.dist,
        console=console,
        progress=spec.progress,
        stop_after_steps=stop_after_steps,
        provenance=provenance,
    )
    resumed = trainer.resume() if how == "resume" else False  # refuses changed settings, before any write
    if main:
        write_text(out / "config.json", json.dumps(run_config(prep, provenance), indent=2, default=str) + "\n")
        if console is not None and resumed:
            console.print(
                f"resuming at step {trainer.state.step} (epoch {trainer.state.epoch}, batch {trainer.state.batch})"
            )
    result = trainer.fit()
    if result.status == "stopped":
        return {"status": "stopped", "step": result.state.step, "out": str(out)}

    trainer.load_best()
    state = result.state
    summary: dict[str, Any] = {
        "status": "finished",
        "mode": prep.plan.mode,
        "recipe": prep.recipe.name,
        "shots": spec.shots,
        "shuffle_seed": prep.cfg.shuffle_seed,
        "seed": prep.cfg.seed,
        "trainable": prep.trainable,
        "total": prep.total,
        "steps": state.step,
        "skipped_steps": state.skipped,
        "epochs": state.epoch,
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "best_val_AP": state.best_ap if prep.val is not None else None,
        "base_sha256": prep.base,
    }
    if main:
        if prep.test is not None:
            results, metrics = evaluate_on(prep, prep.test)
            metrics["provenance"] = provenance
            write_results(out / "test", results, metrics)
            summary["test"] = scalar_metrics(
                {k: v for k, v in metrics.items() if k not in ("num_detections", "provenance")}
            )
            if console is not None:
                console.print(
                    f"test (best weights, epoch {state.best_epoch}): AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}"
                )
        summary["artifact"] = str(write_artifact(prep, trainer))
        if spec.pretrain:  # the pretrained model itself, for --weights (a packaged language encoder left out)
            save_model(
                prep.model,
                out / MODEL_FILE,
                metadata={
                    "recipe": prep.recipe.name,
                    "steps": state.step,
                    "train_config": json.dumps(to_dict(prep.cfg)),
                },
            )
            summary["model"] = str(out / MODEL_FILE)
        try:
            plot_curves(read_log(out / "log.jsonl"), out / "curves.png", title=f"{prep.recipe.name} — {prep.plan.mode}")
        except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
            summary["plot_error"] = str(e)
        summary["provenance"] = dict(provenance, date=record()["date"])  # finished; "started": the first start
        write_text(out / RESULT_FILE, json.dumps(summary, indent=2, default=str) + "\n")
        finish_checkpoints(out / "checkpoints", keep=spec.keep_checkpoints)
    barrier(prep.dist)
    return summary


def finish_checkpoints(folder: Path, *, keep: bool) -> None:
    """After a finished run: the best weights live on in the artifact, so ``best`` goes; the
    resumable state goes too unless ``keep`` (``--keep-checkpoints``)."""
    (folder / BEST).unlink(missing_ok=True)
    if not keep:
        remove_resumable(folder)
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass
