"""Zero-shot evaluation on a dataset: the library under ``glip zeroshot eval`` and
:meth:`glip_transfer.api.Detector.evaluate`.

* :func:`evaluation_recipe`: the recipe (a named one, or one made from a COCO file and its
  images) with the ``--set`` overrides of its own keys;
* :func:`prepare_task`: the split's files and validated annotations (cheap: no model), as a
  :class:`ZeroShotTask` whose :meth:`~ZeroShotTask.prompt` is the evaluation prompt of its
  categories;
* :func:`run_task`: the model on the task's images (:func:`glip_transfer.inference.evaluate_dataset`),
  results in dataset order;
* :func:`task_metrics`: AP/AR on exactly the images run
  (:func:`glip_transfer.evaluation.evaluate_detections`).

The command adds the run folder around these (lock, partial results, resume, provenance, files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import InputConfig
from .data import CocoData, DetectionDataset, default_workers, load_coco, make_loader
from .evaluation import evaluate_detections
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

    def dataset(self, input_cfg: InputConfig) -> DetectionDataset:
        """The split's images (those missing on disk left out, with one warning) transformed as
        ``input_cfg`` says."""
        return DetectionDataset(self.coco, self.img_dir, input_cfg)


def prepare_task(recipe: Recipe, *, split: str | None, data_root: Path) -> ZeroShotTask:
    """The split (None: the recipe's evaluation split) of ``recipe`` under ``data_root``: its files
    (one-line errors naming a missing one and the command that downloads it) and its validated
    annotations. Loads no model and no tokenizer."""
    split = split or recipe.evaluation.split
    ann_file, img_dir = split_paths(recipe, split, data_root)
    return ZeroShotTask(recipe, split, ann_file, img_dir, load_coco(ann_file, require_annotations=False))


def run_task(
    model,
    dataset: DetectionDataset,
    encoded,
    *,
    device: torch.device,
    batch_size: int,
    workers: int | None = None,
    amp: bool = False,
    cache_text: bool = True,
    done_ids: set | None = None,
    on_batch: Callable[[list, list[dict]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """COCO results of ``model`` prompted with ``encoded`` on the images of ``dataset`` not in
    ``done_ids`` (batches of ``batch_size``, ``workers`` loading processes: None is
    :func:`~glip_transfer.data.default_workers`), in dataset order; ``on_batch`` / ``progress``
    as :func:`~glip_transfer.inference.evaluate_dataset` takes them."""
    from .inference import evaluate_dataset

    workers = default_workers(device) if workers is None else workers
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda")
    return evaluate_dataset(
        model,
        loader,
        encoded,
        device=device,
        cache_text=cache_text,
        on_batch=on_batch,
        skip_image_ids=done_ids,
        amp=amp,
        progress=progress,
    )


def in_dataset_order(results: list[dict], dataset: DetectionDataset) -> list[dict]:
    """``results`` sorted by their image's place in ``dataset`` (however batched or resumed)."""
    position = {entry[0]: i for i, entry in enumerate(dataset.entries)}
    return sorted(results, key=lambda r: position.get(r["image_id"], len(position)))


def task_metrics(
    task: ZeroShotTask, dataset: DetectionDataset, results: list[dict], captions: list[str], max_dets: int
) -> dict[str, Any]:
    """AP/AR of ``results`` on exactly the images of ``dataset`` that were run (COCO, or LVIS for
    the LVIS recipes; ``max_dets`` detections kept per image), with the recipe name and the
    captions the detections were made with."""
    metrics = evaluate_detections(dataset, results, metric=task.recipe.evaluation.metric, max_dets=max_dets)
    metrics["recipe"] = task.recipe.name
    metrics["captions"] = list(captions)
    return metrics
