"""COCO (and LVIS) box evaluation, result conversion and report writers.

* :func:`detections_to_coco` turns one image's detections into COCO result dicts exactly as the
  reference's ``prepare_for_coco_detection`` does: boxes in original-image xyxy become
  ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]`` (``BoxList.convert("xywh")``'s +1 convention, via
  :func:`glip_transfer.boxes.box_xyxy_to_xywh`); labels without a category are dropped.
* :func:`coco_evaluate` runs pycocotools silently and returns AP/AR metrics (0..1, -1 where
  undefined) with a per-category breakdown.
* :func:`write_results` writes ``bbox.json``, ``metrics.json``, ``per_category.csv`` and
  ``report.md`` atomically; :func:`summary_table` / :func:`per_category_table` render rich tables.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.markup import escape
from rich.table import Table

from .boxes import box_xyxy_to_xywh
from .data import CocoData, DataError, DetectionDataset, load_coco
from .files import AppendLines, write_text

# (key, pycocotools stats index, description)
COCO_METRICS: tuple[tuple[str, int, str], ...] = (
    ("AP", 0, "AP @ IoU 0.50:0.95, all areas"),
    ("AP50", 1, "AP @ IoU 0.50"),
    ("AP75", 2, "AP @ IoU 0.75"),
    ("APs", 3, "AP, small objects (< 32^2 px)"),
    ("APm", 4, "AP, medium objects"),
    ("APl", 5, "AP, large objects (> 96^2 px)"),
    ("AR1", 6, "AR, 1 detection per image"),
    ("AR10", 7, "AR, 10 detections per image"),
    ("AR100", 8, "AR, 100 detections per image"),
    ("ARs", 9, "AR100, small objects"),
    ("ARm", 10, "AR100, medium objects"),
    ("ARl", 11, "AR100, large objects"),
)
METRIC_KEYS: tuple[str, ...] = tuple(key for key, _, _ in COCO_METRICS)

# --------------------------------------------------------------------------- result conversion


def detections_to_coco(
    image_id: Any,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    label_to_category: Mapping[int, Any] | None = None,
) -> list[dict]:
    """COCO result dicts of one image's detections.

    ``boxes`` ``[N, 4]`` xyxy in the original image (the annotation file's width/height), ``scores``
    ``[N]``, ``labels`` ``[N]``. ``label_to_category`` maps labels to the annotation file's category
    ids (labels missing from it are dropped, as in the reference); without it labels are category ids.
    Boxes become ``[x, y, w, h]`` with ``w = x2 - x1 + 1`` (the reference's convention).
    """
    if boxes.numel() == 0:
        return []
    xywh = box_xyxy_to_xywh(boxes.detach().to(torch.float32).cpu().reshape(-1, 4)).tolist()
    score_list = scores.detach().cpu().reshape(-1).tolist()
    label_list = labels.detach().cpu().reshape(-1).tolist()
    if not len(xywh) == len(score_list) == len(label_list):
        raise ValueError(
            f"detections_to_coco: {len(xywh)} boxes, {len(score_list)} scores and {len(label_list)} labels; they "
            "must match"
        )
    results = []
    for box, score, label in zip(xywh, score_list, label_list):
        if label_to_category is not None:
            if label not in label_to_category:
                continue
            category = label_to_category[label]
        else:
            category = label
        results.append({"image_id": image_id, "category_id": category, "bbox": box, "score": score})
    return results


# --------------------------------------------------------------------------- COCO evaluation


def _gt_coco(coco_gt: Any) -> tuple[Any, str]:
    """A pycocotools ``COCO`` and a name for messages from a COCO, a :class:`CocoData` or a path."""
    if isinstance(coco_gt, CocoData):
        return coco_gt.coco(), str(coco_gt.path)
    if isinstance(coco_gt, (str, os.PathLike)):
        data = load_coco(coco_gt)
        return data.coco(), str(data.path)
    if hasattr(coco_gt, "loadRes") and hasattr(coco_gt, "dataset"):
        return coco_gt, "ground truth"
    raise TypeError(
        f"coco_evaluate: coco_gt must be a pycocotools COCO, a CocoData or a path, got {type(coco_gt).__name__}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_results(results: Sequence[Mapping], coco: Any, gt_name: str) -> list[dict]:
    """Copies of the result dicts (pycocotools mutates them), validated against the ground truth."""
    checked = []
    for i, res in enumerate(results):
        if not isinstance(res, Mapping):
            raise DataError(
                f"results[{i}] is a {type(res).__name__}; each result is a dict with image_id, category_id, bbox, score"
            )
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in res]
        if missing:
            raise DataError(
                f"results[{i}] lacks {', '.join(repr(k) for k in missing)}; each result needs image_id, category_id, "
                "bbox, score"
            )
        box = res["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise DataError(f"results[{i}] has bbox {box!r}; it must be [x, y, width, height], four finite numbers")
        if not _is_number(res["score"]):
            raise DataError(f"results[{i}] has score {res['score']!r}; it must be a finite number")
        if res["image_id"] not in coco.imgs:
            raise DataError(
                f"results[{i}] has image_id {res['image_id']!r}, which is not in {gt_name}; "
                "results must use the annotation file's image ids"
            )
        if res["category_id"] not in coco.cats:
            raise DataError(
                f"results[{i}] has category_id {res['category_id']!r}, which is not in {gt_name}; "
                "map labels to the annotation file's category ids"
            )
        checked.append(
            {
                "image_id": res["image_id"],
                "category_id": res["category_id"],
                "bbox": [float(v) for v in box],
                "score": float(res["score"]),
            }
        )
    return checked


def _empty_results_coco(coco: Any) -> Any:
    dt = COCO()
    dt.dataset = {
        "images": list(coco.dataset["images"]),
        "categories": list(coco.dataset["categories"]),
        "annotations": [],
    }
    dt.createIndex()
    return dt


def coco_evaluate(
    coco_gt: Any, results: Sequence[Mapping], *, image_ids: Iterable | None = None, max_dets: int = 100
) -> dict[str, Any]:
    """COCO box AP/AR of ``results`` against ``coco_gt`` (pycocotools ``COCO``, :class:`CocoData` or path).

    ``results``: COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``), e.g. from
    :func:`detections_to_coco`. ``image_ids`` restricts the evaluation to those images (default: all
    images of the ground truth, so images without results count as misses).

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
    "ARl"}`` (floats in 0..1, -1 where undefined, e.g. no small objects) plus ``"num_images"``,
    ``"num_detections"``, ``"per_category"`` (list of ``{"category_id", "name", "AP", "AP50",
    "gt_instances"}``, ``gt_instances`` counting non-crowd boxes) and ``"log"`` (pycocotools'
    printed summary). These are COCO's numbers: at most 100 detections per image count. With
    ``max_dets`` above 100 (images with more objects), ``"AP@N"`` and ``"AR@N"`` (N = ``max_dets``
    detections per image) are added; the others stay COCO's.

    A path is validated strictly by :func:`~glip_transfer.data.load_coco`; pass
    ``load_coco(path, invalid_boxes="drop")`` to evaluate against a file with degenerate boxes.
    """
    coco, gt_name = _gt_coco(coco_gt)
    checked = _check_results(results, coco, gt_name)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_dt = coco.loadRes(checked) if checked else _empty_results_coco(coco)
        evaluator = COCOeval(coco, coco_dt, "bbox")
        if max_dets > 100:  # COCO's 1, 10, 100 stay; the last entry decides how many are matched
            evaluator.params.maxDets = [1, 10, 100, int(max_dets)]
        if image_ids is not None:
            ids = list(image_ids)
            unknown = [i for i in ids if i not in coco.imgs]
            if unknown:
                raise DataError(
                    f"coco_evaluate: image id {unknown[0]!r} is not in {gt_name}; pass ids of the annotation file"
                )
            evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    metrics: dict[str, Any] = {key: stats[index] for key, index, _ in COCO_METRICS}
    if max_dets > 100:
        metrics[f"AP@{max_dets}"] = _mean_valid(evaluator.eval["precision"][:, :, :, 0, -1])
        metrics[f"AR@{max_dets}"] = _mean_valid(evaluator.eval["recall"][:, :, 0, -1])
    metrics["num_images"] = len(evaluator.params.imgIds)
    metrics["num_detections"] = len(checked)
    metrics["per_category"] = _per_category(evaluator, coco)
    metrics["log"] = log.getvalue()
    return metrics


def evaluate_detections(
    dataset: DetectionDataset, results: Sequence[Mapping], *, metric: str = "coco", max_dets: int = 100
) -> dict[str, Any]:
    """AP/AR of ``results`` on exactly the images of ``dataset`` that were run: an image listed in
    the annotation file but missing on disk is left out, ground truth and all, and the metrics say
    so (``num_images`` evaluated, ``num_skipped_images``, ``skipped_images``: their file names).
    ``metric``: ``coco`` (:func:`coco_evaluate`), or ``lvis`` / ``lvis_fixed_ap``
    (:func:`lvis_evaluate`); ``max_dets``: the detections kept per image. Used by ``glip zeroshot
    eval`` and by validation / test in training."""
    image_ids = [entry[0] for entry in dataset.entries]
    if metric.startswith("lvis"):
        metrics: dict[str, Any] = lvis_evaluate(dataset.coco.path, results, max_dets=max_dets, image_ids=image_ids)
        metrics.setdefault("per_category", [])
        metrics["num_images"] = len(image_ids)
        metrics["num_detections"] = len(results)
    else:
        metrics = coco_evaluate(dataset.coco, results, image_ids=image_ids, max_dets=max_dets)
    metrics["num_skipped_images"] = len(dataset.missing)
    metrics["skipped_images"] = list(dataset.missing)
    return metrics


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _per_category(evaluator: Any, coco: Any) -> list[dict]:
    """Per-category AP (IoU 0.50:0.95) and AP50, all areas, 100 detections."""
    precision = evaluator.eval["precision"]  # [iou T, recall R, category K, area A, max dets M]
    params = evaluator.params
    area_all = list(params.areaRngLbl).index("all")
    m100 = list(params.maxDets).index(100)  # COCO's 100 detections per image
    iou50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    img_ids = set(params.imgIds)
    counts: dict[Any, int] = {cid: 0 for cid in params.catIds}
    for ann in coco.dataset.get("annotations", []):
        if ann["image_id"] in img_ids and not ann.get("iscrowd", 0) and ann["category_id"] in counts:
            counts[ann["category_id"]] += 1
    rows = []
    for k, cid in enumerate(params.catIds):
        rows.append(
            {
                "category_id": cid,
                "name": coco.cats[cid].get("name", str(cid)),
                "AP": _mean_valid(precision[:, :, k, area_all, m100]),
                "AP50": _mean_valid(precision[iou50, :, k, area_all, m100]),
                "gt_instances": counts[cid],
            }
        )
    return rows


def crowded_images(dataset: DetectionDataset, limit: int) -> str | None:
    """A one-line warning when images of ``dataset`` have more (non-crowd) ground-truth boxes than
    the ``limit`` detections kept per image (their recall, and AP, are capped), naming the
    setting that raises it; None otherwise."""
    counts: dict[Any, int] = {}
    for ann in dataset.coco.annotations:
        if not ann.get("iscrowd", 0):
            counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    over = [(counts[i], path.name) for i, path, _ in dataset.entries if counts.get(i, 0) > limit]
    if not over:
        return None
    most, file = max(over)
    suggest = -(-most // 100) * 100
    return (
        f"{len(over)} image(s) have more ground-truth boxes than the {limit} detections kept per image (most: "
        f"{most} in {file}): their recall and AP are capped; keep more with --set evaluation.detections_per_img="
        f"{suggest} (AP@{suggest} and AR@{suggest} are then reported beside COCO's 100-detection numbers)"
    )


PARTIAL_RESULTS = "partial_results.jsonl"


class PartialResults:
    """``partial_results.jsonl`` of an evaluation that may be interrupted: the first line is the
    provenance record of the run (``{"provenance": {...}}``: what decides its detections, checked
    on ``--resume``), then one line per batch ``{"image_ids": [...], "results": [...]}``, flushed
    to disk as it comes (a torn last line is ignored: that batch runs again)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> tuple[dict | None, set, list[dict]]:
        """``(provenance or None, image ids done, their results)``."""
        provenance, done, results = None, set(), []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break
                if number == 0 and isinstance(entry, dict) and "provenance" in entry:
                    provenance = entry["provenance"]
                    continue
                done.update(entry["image_ids"])
                results.extend(entry["results"])
        return provenance, done, results

    def start(self, provenance: Mapping[str, Any]) -> None:
        """A new file holding only the run's provenance line."""
        write_text(self.path, json.dumps({"provenance": provenance}, default=_json_default) + "\n")

    def appender(self) -> AppendLines:
        """Where batches go: :meth:`add` lines, each flushed and fsynced."""
        return AppendLines(self.path, durable=True)

    @staticmethod
    def add(lines: AppendLines, image_ids: list, results: list[dict]) -> None:
        lines.write(json.dumps({"image_ids": image_ids, "results": results}, default=_json_default))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- LVIS


def lvis_evaluate(
    lvis_gt: str | os.PathLike | Any,
    results: Sequence[Mapping],
    *,
    max_dets: int = 300,
    image_ids: Iterable | None = None,
) -> dict[str, float]:
    """LVIS box AP (``AP``, ``AP50``, ``AP75``, ``APs/m/l``, ``APr/c/f``, ``AR@300`` ...) with the
    official ``lvis`` package (an optional dependency); ``image_ids`` restricts it to those images."""
    try:  # an optional dependency
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError:
        raise ImportError("lvis_evaluate needs the 'lvis' package: pip install 'glip-transfer[lvis]'") from None
    results = [dict(r) for r in results]
    if not results:
        raise DataError("lvis_evaluate: no results to evaluate; LVIS evaluation needs at least one detection")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = lvis_gt if isinstance(lvis_gt, LVIS) else LVIS(str(lvis_gt))
        dt = LVISResults(gt, results, max_dets=max_dets)
        evaluator = LVISEval(gt, dt, "bbox")
        if image_ids is not None:
            evaluator.params.img_ids = list(image_ids)
        evaluator.run()
    return {key: float(value) for key, value in evaluator.get_results().items()}


# --------------------------------------------------------------------------- writers


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


atomic_write_text = write_text
""":func:`glip_transfer.files.write_text` under its earlier name (code written against it)."""


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a metrics dict worth a JSON summary: numbers, descriptive text or lists of
    text (recipe name, captions, skipped images) and the ``provenance`` record; drops
    ``per_category`` and ``log``."""

    def keep(key: str, value: Any) -> bool:
        if key in ("per_category", "log"):
            return False
        if key == "provenance":
            return isinstance(value, Mapping)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))

    return {k: v for k, v in metrics.items() if keep(k, v)}


def metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, meaning)`` of the AP/AR entries present in ``metrics``: COCO's twelve, then the
    ``AP@N`` / ``AR@N`` of more than 100 detections per image."""
    rows = [(key, text) for key, _, text in COCO_METRICS if key in metrics]
    for key in metrics:
        if key.startswith(("AP@", "AR@")) and key[3:].isdigit():
            what = "AP @ IoU 0.50:0.95" if key.startswith("AP") else "AR"
            rows.append((key, f"{what}, up to {key[3:]} detections per image"))
    return rows


def images_note(metrics: Mapping[str, Any]) -> str | None:
    """How many images the metrics describe, and which listed ones were left out (missing on disk)."""
    if "num_images" not in metrics:
        return None
    n, skipped = metrics["num_images"], int(metrics.get("num_skipped_images") or 0)
    if not skipped:
        return f"{n} images evaluated"
    names = list(metrics.get("skipped_images") or [])
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{n} of {n + skipped} images evaluated ({skipped} missing on disk, not counted: {shown})"


def _fmt(value: float) -> str:
    return "-" if value is None or value < 0 else f"{value:.3f}"


def _markdown_report(metrics: Mapping[str, Any], per_category: Sequence[Mapping]) -> str:
    from .provenance import markdown as provenance_markdown

    lines = ["# COCO box evaluation", ""]
    note = images_note(metrics)
    if note is not None:
        lines += [f"{note}; {metrics.get('num_detections', '?')} detections.", ""]
    lines += ["| metric | value | meaning |", "| --- | ---: | --- |"]
    for key, text in metric_rows(metrics):
        lines.append(f"| {key} | {_fmt(metrics[key])} | {text} |")
    if per_category:
        lines += ["", "## Per category", "", "| id | category | AP | AP50 | GT boxes |"]
        lines.append("| ---: | --- | ---: | ---: | ---: |")
        for row in per_category:
            name = str(row["name"]).replace("|", "\\|")
            cells = [str(row["category_id"]), name, _fmt(row["AP"]), _fmt(row["AP50"]), str(row["gt_instances"])]
            lines.append("| " + " | ".join(cells) + " |")
    summary = [line for line in str(metrics.get("log", "")).splitlines() if line.lstrip().startswith("Average")]
    if summary:
        lines += ["", "## pycocotools summary", "", "```", *summary, "```"]
    lines += ["", "Values are 0..1; '-' means undefined (no ground truth in that group)."]
    if isinstance(metrics.get("provenance"), Mapping):
        lines += ["", provenance_markdown(metrics["provenance"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | os.PathLike,
    results: Sequence[Mapping],
    metrics: Mapping[str, Any],
    per_category: Sequence[Mapping] | None = None,
) -> dict[str, Path]:
    """Write ``bbox.json`` (the COCO results), ``metrics.json`` (scalar metrics),
    ``per_category.csv`` and ``report.md`` into ``out_dir`` (created if needed), each atomically.

    ``per_category`` defaults to ``metrics["per_category"]``. Returns the written paths by name.
    """
    out = Path(out_dir)
    if per_category is None:
        per_category = metrics.get("per_category", [])
    paths = {name: out / name for name in ("bbox.json", "metrics.json", "per_category.csv", "report.md")}
    write_text(paths["bbox.json"], json.dumps(list(results), default=_json_default))
    write_text(
        paths["metrics.json"], json.dumps(scalar_metrics(metrics), indent=2, default=_json_default) + "\n"
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category_id", "name", "AP", "AP50", "gt_instances"])
    for row in per_category:
        writer.writerow(
            [row["category_id"], row["name"], f"{row['AP']:.6f}", f"{row['AP50']:.6f}", row["gt_instances"]]
        )
    write_text(paths["per_category.csv"], buffer.getvalue())
    write_text(paths["report.md"], _markdown_report(metrics, per_category))
    return paths


# --------------------------------------------------------------------------- rich tables


def summary_table(metrics: Mapping[str, Any], title: str = "COCO box evaluation") -> Table:
    """A three-column rich table (metric, value, meaning) of the AP/AR metrics, < 80 columns wide."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column("meaning", style="dim")
    for key, text in metric_rows(metrics):
        table.add_row(key, _fmt(metrics[key]), text)
    note = images_note(metrics)
    if note is not None:
        table.caption = escape(note)
        table.caption_justify = "left"
    return table


def per_category_table(per_category: Sequence[Mapping], title: str = "Per category (IoU 0.50:0.95)") -> Table:
    """A rich table of per-category AP, AP50 and ground-truth counts; long names are truncated."""
    table = Table(title=title, title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("category", max_width=40, overflow="ellipsis", no_wrap=True)
    table.add_column("AP", justify="right")
    table.add_column("AP50", justify="right")
    table.add_column("GT boxes", justify="right")
    for row in per_category:
        cells = (
            str(row["category_id"]),
            escape(str(row["name"])),
            _fmt(row["AP"]),
            _fmt(row["AP50"]),
            str(row["gt_instances"]),
        )
        table.add_row(*cells)
    return table
