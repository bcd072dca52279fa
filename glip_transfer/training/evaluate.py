"""Validation / test evaluation during training: the one place that calls the shared inference
(:func:`glip_transfer.inference.evaluate_dataset`) and COCO evaluation."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..data import DetectionDataset, make_loader
from ..evaluation import evaluate_detections
from ..inference import EncodedPrompt, evaluate_dataset
from ..model.glip import GLIP


def evaluate(
    model: GLIP,
    dataset: DetectionDataset,
    prompt: EncodedPrompt,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    metric: str = "coco",
) -> tuple[list[dict], dict[str, Any]]:
    """COCO results and metrics (``AP``, ``AP50``, ..., ``per_category``; the images evaluated and
    those skipped, :func:`~glip_transfer.evaluation.evaluate_detections`) of ``model`` (with its
    prompt offset, if any) on ``dataset`` prompted with ``prompt`` (its cached text features are
    cleared first: the language backbone may have changed)."""
    prompt.clear_cache()
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda")
    was_training = model.training
    with torch.random.fork_rng(devices=[]):  # evaluation never moves the training random streams
        results = evaluate_dataset(model, loader, prompt, device=device, amp=amp, progress=progress)
    model.train(was_training)
    prompt.clear_cache()
    metrics = evaluate_detections(dataset, results, metric=metric, max_dets=model.cfg.postprocess.detections_per_img)
    return results, metrics
