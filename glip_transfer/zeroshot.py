"""Zero-shot evaluation on a dataset, the library under ``glip zeroshot eval`` and
:meth:`glip_transfer.api.Detector.evaluate`: the recipe (a named one, or one made from COCO files),
the split's files and annotations (:func:`prepare_task`, cheap: no model) and its evaluation prompt
(:meth:`ZeroShotTask.prompt`), and the
metrics of the detections (:func:`task_metrics`). Running the model is
:func:`glip_transfer.inference.evaluate_dataset`; the command adds the run folder around it
(partial results, resuming, result files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .data import CocoData, load_coco
from .evaluation import coco_evaluate, lvis_evaluate
from .prompts import DetectionPrompt
from .recipes import (
    Recipe,
    adhoc_recipe,
    categories_not_in_recipe,
    evaluation_prompt,
    load_recipe,
    override_recipe,
    split_paths,
)


def evaluation_recipe(
    recipe: str | None = None,
    ann: Path | None = None,
    images: Path | None = None,
    *,
    split: str = "val",
    overrides: Sequence[str] = (),
) -> Recipe:
    """The recipe to evaluate: a name (``glip recipes list``) or YAML file, or one made from a COCO
    annotation file ``ann`` and its image folder ``images`` (registered as ``split``), with the
    ``--set`` overrides of the recipe's own keys (``evaluation.min_size=600``) applied."""
    base = load_recipe(recipe) if recipe is not None else adhoc_recipe({split: (ann, images)}, eval_split=split)
    return override_recipe(base, list(overrides))


@dataclass
class ZeroShotTask:
    """What a zero-shot evaluation runs on: the recipe, the split, its annotation file and image
    folder, and the validated annotations."""

    recipe: Recipe
    split: str
    ann_file: Path
    img_dir: Path
    coco: CocoData

    def prompt(self, tokenizer) -> tuple[DetectionPrompt, list[str]]:
        """The evaluation prompt of the recipe's categories (those of the annotation file for
        ``categories: from_annotations``), and notes for the user: automatic chunking, background
        entries left out, annotation categories the recipe does not prompt."""
        categories = list(self.coco.categories.values())
        prompt = evaluation_prompt(self.recipe, tokenizer, categories)
        notes = list(prompt.notices)
        unprompted = categories_not_in_recipe(self.recipe, categories)
        if unprompted:
            notes.append(
                f"{len(unprompted)} annotation categories are not in the recipe and cannot be detected: "
                + ", ".join(repr(n) for _, n in unprompted[:5])
            )
        return prompt, notes


def prepare_task(recipe: Recipe, *, split: str | None, data_root: Path) -> ZeroShotTask:
    """The split (None: the recipe's evaluation split) of ``recipe`` under ``data_root``: its files
    (one-line errors naming a missing one and the command that downloads it) and its validated
    annotations. Loads no model and no tokenizer."""
    split = split or recipe.evaluation.split
    ann_file, img_dir = split_paths(recipe, split, data_root)
    return ZeroShotTask(recipe, split, ann_file, img_dir, load_coco(ann_file, require_annotations=False))


def task_metrics(task: ZeroShotTask, results: list[dict], captions: list[str]) -> dict[str, Any]:
    """The metrics of ``results`` (COCO detection results) on the task's split: COCO AP, or LVIS
    AP for the LVIS recipes (``per_category`` empty there), with the recipe name and the
    captions the detections were made with."""
    ev = task.recipe.evaluation
    if ev.metric.startswith("lvis"):
        metrics = lvis_evaluate(task.ann_file, results, max_dets=ev.detections_per_img)
        metrics.setdefault("per_category", [])
    else:
        metrics = coco_evaluate(task.coco, results)
    metrics["recipe"] = task.recipe.name
    metrics["captions"] = captions
    return metrics
