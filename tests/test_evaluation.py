"""COCO evaluation through pycocotools, result conversion, writers and tables."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch
from rich.console import Console

from glip_transfer.data import DataError, coco_boxes_to_xyxy, load_coco
from glip_transfer.evaluation import (
    METRIC_KEYS,
    coco_evaluate,
    detections_to_coco,
    lvis_evaluate,
    per_category_table,
    summary_table,
    write_results,
)

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "a category with a really quite extraordinarily long name indeed"},
    {"id": 7, "name": "unused"},
]


def _gt(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (1, 2, 3)]
    boxes = [
        (1, 1, [10, 10, 100, 150]),
        (1, 3, [300, 200, 50, 40]),
        (2, 1, [5, 5, 20, 25]),
        (2, 3, [100, 100, 200, 200]),
        (3, 1, [400, 50, 120, 300]),
    ]
    anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "iscrowd": 0} for k, (i, c, b) in enumerate(boxes)
    ]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


def _perfect_results(path):
    coco = load_coco(path)
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
        for a in coco.annotations
    ]


def test_perfect_predictions_give_ap_one(tmp_path):
    path = _gt(tmp_path)
    metrics = coco_evaluate(path, _perfect_results(path))
    assert set(METRIC_KEYS) <= set(metrics)
    for key in ("AP", "AP50", "AP75", "APm", "APl", "AR10", "AR100"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["APs"] == pytest.approx(1.0)  # the 20x25 box is small
    assert metrics["num_images"] == 3 and metrics["num_detections"] == 5
    assert "Average Precision" in metrics["log"]
    rows = {r["category_id"]: r for r in metrics["per_category"]}
    assert (
        rows[1]["AP"] == pytest.approx(1.0) and rows[1]["AP50"] == pytest.approx(1.0) and rows[1]["gt_instances"] == 3
    )
    assert rows[3]["gt_instances"] == 2 and rows[3]["name"].startswith("a category")
    assert rows[7]["AP"] == -1.0 and rows[7]["gt_instances"] == 0


def test_reference_box_convention_round_trip(tmp_path):
    """GT xywh -> the reference's xyxy (x2 = x + w - 1) -> detections_to_coco (+1) is the identity,
    so predictions equal to the ground truth reach AP 1.0 through the official conversion."""
    path = _gt(tmp_path)
    coco = load_coco(path)
    results = []
    for image_id, anns in coco.annotations_by_image.items():
        xyxy = coco_boxes_to_xyxy(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32))
        labels = torch.tensor([{1: 1, 3: 2}[a["category_id"]] for a in anns])  # contiguous labels
        results += detections_to_coco(
            image_id, xyxy, torch.full((len(anns),), 0.8), labels, label_to_category={1: 1, 2: 3}
        )
    assert sorted(r["bbox"] for r in results) == sorted([float(v) for v in a["bbox"]] for a in coco.annotations)
    assert coco_evaluate(coco, results)["AP"] == pytest.approx(1.0)


def test_detections_to_coco_conversion():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 5.5, 7.25]])
    out = detections_to_coco(4, boxes, torch.tensor([0.5, 0.25]), torch.tensor([2, 9]), label_to_category={2: 17})
    assert out == [
        {"image_id": 4, "category_id": 17, "bbox": [10.0, 20.0, 21.0, 21.0], "score": 0.5}
    ]  # label 9 dropped
    assert detections_to_coco(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0)) == []


def test_empty_and_partial_results(tmp_path):
    path = _gt(tmp_path)
    empty = coco_evaluate(path, [])
    assert empty["AP"] == 0.0 and empty["AR100"] == 0.0 and empty["num_detections"] == 0
    results = _perfect_results(path)
    only_image_1 = [r for r in results if r["image_id"] == 1]
    assert coco_evaluate(path, only_image_1)["AP"] < 1.0
    assert coco_evaluate(path, only_image_1, image_ids=[1])["AP"] == pytest.approx(1.0)
    # the caller's dicts are not modified by pycocotools
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}


def test_bad_results_raise(tmp_path):
    path = _gt(tmp_path)
    good = {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}
    for bad, pattern in [
        ({**good, "image_id": 99}, "image_id 99, which is not in .*gt.json"),
        ({**good, "category_id": 2}, "category_id 2, which is not in"),
        ({k: v for k, v in good.items() if k != "score"}, "lacks 'score'"),
        ({**good, "bbox": [1, 2, 3]}, "bbox"),
    ]:
        with pytest.raises(DataError, match=pattern):
            coco_evaluate(path, [good, bad])


def test_write_results(tmp_path):
    path = _gt(tmp_path)
    results = _perfect_results(path)
    metrics = coco_evaluate(path, results)
    paths = write_results(tmp_path / "out", results, metrics, metrics["per_category"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "bbox.json",
        "metrics.json",
        "per_category.csv",
        "report.md",
    ]
    assert json.loads(paths["bbox.json"].read_text()) == results
    saved = json.loads(paths["metrics.json"].read_text())
    assert saved["AP"] == pytest.approx(1.0) and "per_category" not in saved and "log" not in saved
    rows = list(csv.DictReader(paths["per_category.csv"].open()))
    assert [r["category_id"] for r in rows] == ["1", "3", "7"] and float(rows[0]["AP"]) == pytest.approx(1.0)
    report = paths["report.md"].read_text()
    assert "| AP | 1.000 |" in report and "| 7 | unused | - | - | 0 |" in report
    write_results(tmp_path / "out", results, metrics)  # overwrite in place, per_category from metrics
    assert len(list((tmp_path / "out").iterdir())) == 4  # no temporary files left behind


def test_tables_fit_80_columns(tmp_path):
    path = _gt(tmp_path)
    metrics = coco_evaluate(path, _perfect_results(path))
    console = Console(width=80, record=True, color_system=None)
    console.print(summary_table(metrics))
    console.print(per_category_table(metrics["per_category"]))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "AP100" not in text and "AR100" in text and "person" in text and "1.000" in text
    # one row per category: the long name is truncated rather than wrapped
    assert sum("unused" in line for line in text.splitlines()) == 1
    assert sum("a category" in line for line in text.splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("lvis") is not None, reason="lvis is installed")
def test_lvis_missing_gives_install_hint(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'glip-transfer\[lvis\]'"):
        lvis_evaluate(tmp_path / "lvis.json", [])


def test_more_than_100_objects_per_image_add_ap_and_ar_at_n(tmp_path):
    """COCO counts 100 detections per image; with max_dets above that, AP@N / AR@N are added and
    COCO's own twelve numbers do not change."""
    boxes = [[(i % 15) * 40, (i // 15) * 40, 30, 30] for i in range(150)]
    images = [{"id": 1, "file_name": "1.jpg", "width": 640, "height": 480}]
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "iscrowd": 0} for k, b in enumerate(boxes)]
    path = tmp_path / "crowd.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES[:1]}))
    results = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0 - k / 1000} for k, b in enumerate(boxes)]
    coco = coco_evaluate(path, results)
    assert coco["AR100"] == pytest.approx(100 / 150) and "AP@200" not in coco
    more = coco_evaluate(path, results, max_dets=200)
    assert more["AR@200"] == pytest.approx(1.0) and more["AP@200"] == pytest.approx(1.0)
    assert {k: more[k] for k in METRIC_KEYS} == {k: coco[k] for k in METRIC_KEYS}
    assert more["per_category"] == coco["per_category"]
    table = Console(width=100, record=True)
    table.print(summary_table(more))
    text = table.export_text()
    assert "AP@200" in text and "up to 200 detections per image" in text
