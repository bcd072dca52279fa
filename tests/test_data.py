"""Image loading (modes, EXIF, broken files) and COCO annotation validation / datasets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glip_transfer.config import InputConfig
from glip_transfer.data import (
    DataError,
    DetectionDataset,
    SizeGroupedBatchSampler,
    TrainingDataset,
    coco_boxes_to_xyxy,
    default_workers,
    load_coco,
    load_image,
    make_loader,
)
from glip_transfer.transforms import TrainTransform

# --------------------------------------------------------------------------- images


def _rgb_array(w=12, h=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_load_rgb_grayscale_palette(tmp_path):
    rgb = _rgb_array()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgb.png")), rgb)

    gray = rgb[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    out = load_image(tmp_path / "gray.png")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.repeat(gray[..., None], 3, axis=2))

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png")
    with Image.open(tmp_path / "pal.png") as f:
        expected = np.asarray(f.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(np.asarray(load_image(tmp_path / "pal.png")), expected)


def test_alpha_is_dropped_like_pil_convert(tmp_path):
    rgba = np.concatenate([_rgb_array(), np.zeros((8, 12, 1), np.uint8)], axis=2)  # fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgba.png")), rgba[..., :3])
    la = np.stack([rgba[..., 0], rgba[..., 3]], axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "la.png"))[..., 1], rgba[..., 0])


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values8 = np.arange(0, 256, 8, dtype=np.uint16).reshape(4, 8)
    Image.fromarray(values8 * 257).save(tmp_path / "deep.png")  # I;16
    with Image.open(tmp_path / "deep.png") as f:
        assert f.mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert np.array_equal(out[..., 0], values8.astype(np.uint8)) and np.array_equal(out[..., 2], out[..., 0])
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white.png")
    assert np.asarray(load_image(tmp_path / "white.png")).min() == 255
    Image.fromarray(values8.astype(np.int32) * 257, mode="I").save(tmp_path / "deep32.tiff")  # 16-bit data in mode I
    assert np.array_equal(np.asarray(load_image(tmp_path / "deep32.tiff"))[..., 1], values8.astype(np.uint8))
    Image.fromarray(values8.astype(np.float32) / 255, mode="F").save(tmp_path / "unit.tiff")  # floats in [0, 1]
    assert np.array_equal(np.asarray(load_image(tmp_path / "unit.tiff"))[..., 0], values8.astype(np.uint8))


def test_cmyk(tmp_path):
    Image.fromarray(_rgb_array()).convert("CMYK").save(tmp_path / "cmyk.tiff")
    out = load_image(tmp_path / "cmyk.tiff")
    assert out.mode == "RGB" and out.size == (12, 8)


def _exif_rotated(path: Path, orientation: int = 6) -> None:
    """A 30x20 (w x h) stored image with an EXIF orientation tag; orientation 6 shows it 20x30."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_rgb_array(30, 20)).save(path, exif=exif)


def test_exif_orientation_modes(tmp_path):
    path = tmp_path / "rot.png"
    _exif_rotated(path)
    assert load_image(path).size == (20, 30)  # "apply" (predict)
    assert load_image(path, exif="ignore").size == (30, 20)
    assert load_image(path, exif="auto", expected_size=(20, 30)).size == (20, 30)  # json matches the rotated view
    assert load_image(path, exif="auto", expected_size=(30, 20)).size == (30, 20)  # json matches the stored pixels
    _exif_rotated(tmp_path / "r180.png", orientation=3)
    stored = np.asarray(load_image(tmp_path / "r180.png", exif="ignore"))
    assert np.array_equal(np.asarray(load_image(tmp_path / "r180.png", exif="auto", expected_size=(30, 20))), stored)
    assert np.array_equal(np.asarray(load_image(tmp_path / "r180.png")), stored[::-1, ::-1])


def test_broken_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.jpg.*not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(DataError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "text.jpg").write_text("hello, I am not an image")
    with pytest.raises(DataError, match="text.jpg.*not an image"):
        load_image(tmp_path / "text.jpg")
    for suffix in ("jpg", "png"):
        full = tmp_path / f"full.{suffix}"
        Image.fromarray(_rgb_array(64, 64, seed=1)).save(full)
        data = full.read_bytes()
        cut = tmp_path / f"cut.{suffix}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=rf"cut\.{suffix}.*truncated or corrupt"):
            load_image(cut)


# --------------------------------------------------------------------------- COCO files


def _coco_dict():
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "sub/b.png", "width": 32, "height": 48},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [20, 5, 15, 20]},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1, 1, 30, 40], "iscrowd": 1, "area": 1200},
            {"id": 13, "image_id": 2, "category_id": 2, "bbox": [4, 8, 20, 30], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _write_dataset(root: Path, data=None, make_images=True) -> Path:
    data = _coco_dict() if data is None else data
    if make_images:
        for img in data["images"]:
            path = root / "images" / img["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rgb_array(img["width"], img["height"], seed=img["id"])).save(path)
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann


def test_load_coco_valid(tmp_path):
    coco = load_coco(_write_dataset(tmp_path, make_images=False))
    assert list(coco.images) == [1, 2] and coco.category_names == {1: "cat", 2: "dog"}
    assert [a["area"] for a in coco.annotations] == [120.0, 300.0, 1200, 600.0]
    assert coco.annotations[1]["iscrowd"] == 0
    assert [a["id"] for a in coco.annotations_by_image[2]] == [12, 13]
    assert len(coco.coco().getAnnIds()) == 4


def _mutations():
    def drop(section, key, index=0):
        return lambda d: d[section][index].pop(key)

    def setv(section, key, value, index=0):
        return lambda d: d[section][index].__setitem__(key, value)

    return {
        "no images key": (lambda d: d.pop("images"), "missing top-level key.*'images'"),
        "no annotations key": (lambda d: d.pop("annotations"), "missing top-level key.*'annotations'"),
        "no categories key": (lambda d: d.pop("categories"), "missing top-level key.*'categories'"),
        "images not list": (lambda d: d.__setitem__("images", {}), "'images' is a dict"),
        "image lacks file_name": (drop("images", "file_name"), r"images\[0\] \(id 1\) lacks 'file_name'"),
        "image lacks id": (drop("images", "id"), r"images\[0\] lacks 'id'"),
        "ann lacks bbox": (drop("annotations", "bbox", 1), r"annotations\[1\] \(id 11\) lacks 'bbox'"),
        "ann lacks id": (drop("annotations", "id"), r"annotations\[0\] lacks 'id'"),
        "category lacks name": (drop("categories", "name"), r"categories\[0\] \(id 1\) lacks 'name'"),
        "bad width": (setv("images", "width", 0), "width 0"),
        "zero box width": (
            setv("annotations", "bbox", [1, 1, 0, 5], 1),
            r"annotation id 11 has a bbox with width or height <= 0",
        ),
        "negative box height": (
            setv("annotations", "bbox", [1, 1, 5, -2]),
            "annotation id 10 has a bbox with width or height",
        ),
        "malformed bbox": (setv("annotations", "bbox", [1, 2, 3]), "annotation id 10 has a malformed bbox"),
        "nan bbox": (setv("annotations", "bbox", [1, 2, 3, float("nan")]), "malformed bbox"),
        "unknown image": (setv("annotations", "image_id", 99), "annotation id 10 has an image_id not in 'images'"),
        "unknown category": (
            setv("annotations", "category_id", 7, 2),
            "annotation id 12 has a category_id not in 'categories'",
        ),
        "duplicate image id": (setv("images", "id", 1, 1), r"duplicate image id 1 \(images\[0\] and images\[1\]\)"),
        "duplicate ann id": (setv("annotations", "id", 10, 3), "duplicate annotation id 10"),
        "duplicate category id": (setv("categories", "id", 1, 1), "duplicate category id 1"),
        "bool id": (setv("images", "id", True), "ids must be integers"),
        "empty dataset": (lambda d: d.update(images=[], annotations=[]), "no images listed"),
        "top level list": (lambda d: None, "top level is a list"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_malformed_annotation_files(tmp_path, case):
    mutate, pattern = _mutations()[case]
    data = _coco_dict()
    mutate(data)
    if case == "top level list":
        data = [data]
    ann = tmp_path / "broken.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=pattern) as err:
        load_coco(ann)
    message = str(err.value)
    assert message.startswith(str(ann)) and "\n" not in message


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2,')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON .*line 1"):
        load_coco(bad)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="bin.json: not valid JSON"):
        load_coco(tmp_path / "bin.json")
    with pytest.raises(DataError, match="missing.json: annotation file not found"):
        load_coco(tmp_path / "missing.json")


def test_multiple_bad_boxes_counted_and_drop_option(tmp_path):
    data = _coco_dict()
    data["annotations"][0]["bbox"] = [0, 0, 0, 3]
    data["annotations"][2]["bbox"] = [0, 0, 4, 0]
    ann = _write_dataset(tmp_path, data, make_images=False)
    with pytest.raises(DataError, match="2 annotations have a bbox with width or height <= 0 .first: annotation id 10"):
        load_coco(ann)
    with pytest.warns(UserWarning, match="dropped 2 annotation"):
        coco = load_coco(ann, invalid_boxes="drop")
    assert [a["id"] for a in coco.annotations] == [11, 13] and coco.dropped_boxes == 2


def test_annotations_optional_for_image_lists(tmp_path):
    data = _coco_dict()
    del data["annotations"]
    ann = _write_dataset(tmp_path, data, make_images=False)
    assert load_coco(ann, require_annotations=False).annotations == []


# --------------------------------------------------------------------------- datasets


def test_detection_dataset_and_loader(tmp_path):
    ann = _write_dataset(tmp_path)
    cfg = InputConfig(min_size=32, max_size=64, size_divisibility=32)
    ds = DetectionDataset(ann, tmp_path / "images", cfg)
    assert len(ds) == 2 and ds.num_missing == 0
    image, info = ds[0]
    assert info["image_id"] == 1 and info["original_size"] == (30, 40) == info["loaded_size"]
    assert info["resized_size"] == (32, 42) and image.shape == (3, 32, 42)
    assert info["file"].endswith("a.png")
    assert info["index"] == 0 and ds[1][1]["index"] == 1
    # different padded sizes (32x64 and 64x32): never padded together, whatever the batch size
    assert ds.padded_sizes() == [(32, 64), (64, 32)]
    batches = list(make_loader(ds, batch_size=2, workers=0))
    assert [b[0].shape for b in batches] == [(1, 3, 32, 64), (1, 3, 64, 32)]
    assert [b[1] for b in batches] == [[(32, 42)], [(48, 32)]] and [b[2][0]["image_id"] for b in batches] == [1, 2]
    # collate itself still pads a mixed batch to its largest image
    images, sizes, infos = ds.collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and sizes == [(32, 42), (48, 32)]


def test_size_grouped_batch_sampler():
    keys = ["a", "b", "a", "a", "c", "b", "a", "a"]
    sampler = SizeGroupedBatchSampler(keys, 2)
    batches = list(sampler)
    assert batches == [[0, 2], [1, 5], [3, 6], [4], [7]]  # full batches as they fill, then the rest
    assert len(sampler) == len(batches)
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert all(len({keys[i] for i in b}) == 1 for b in batches)
    assert list(SizeGroupedBatchSampler(keys, 1)) == [[i] for i in range(len(keys))]
    with pytest.raises(ValueError):
        SizeGroupedBatchSampler(keys, 0)


def test_default_workers():
    assert default_workers("cpu") in (0, 1)
    assert 1 <= default_workers("cuda") <= 8


def test_missing_images_skipped_with_warning(tmp_path):
    ann = _write_dataset(tmp_path)
    (tmp_path / "images" / "a.png").unlink()
    with pytest.warns(UserWarning, match="1 of 2 images listed in .* are missing"):
        ds = DetectionDataset(ann, tmp_path / "images", InputConfig())
    assert len(ds) == 1 and ds.num_missing == 1 and ds.missing == ["a.png"]
    with pytest.raises(DataError, match="none of the 2 images was found"):
        DetectionDataset(ann, tmp_path / "elsewhere", InputConfig())


def test_dataset_exif_auto_follows_annotation_size(tmp_path):
    data = _coco_dict()
    data["images"] = [{"id": 1, "file_name": "rot.png", "width": 20, "height": 30}]
    data["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    ann = _write_dataset(tmp_path, data, make_images=False)
    (tmp_path / "images").mkdir()
    _exif_rotated(tmp_path / "images" / "rot.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no size-mismatch warning: the json size is the rotated one
        _, info = DetectionDataset(ann, tmp_path / "images", InputConfig(min_size=20, max_size=100))[0]
    assert info["loaded_size"] == (30, 20)


def test_training_dataset_targets(tmp_path):
    ann = _write_dataset(tmp_path)
    transform = TrainTransform(InputConfig(), min_sizes=(30, 60), max_size=200, flip_prob=0.5)
    ds = TrainingDataset(ann, tmp_path / "images", transform, seed=5)
    assert len(ds) == 2
    for index in range(2):
        image, target = ds[index]
        h, w = target["resized_size"]
        assert image.shape == (3, h, w)
        assert target["boxes"].dtype == torch.float32 and target["category_ids"].dtype == torch.int64
        assert len(target["boxes"]) == len(target["category_ids"])
    # image 2: the crowd box is removed, the other is clipped to the 32x48 image: x2 = 4+20-1, y2 = min(8+30-1, 47)
    _, target = ds[1]
    assert target["category_ids"].tolist() == [2]
    oh, ow = target["resized_size"]
    expected = torch.tensor([[4.0, 8.0, 23.0, 37.0]]) * torch.tensor([ow / 32, oh / 48, ow / 32, oh / 48])
    if target["flipped"]:
        expected = torch.stack(
            [ow - expected[:, 2] - 1, expected[:, 1], ow - expected[:, 0] - 1, expected[:, 3]], dim=1
        )
    assert torch.allclose(target["boxes"], expected)
    # reproducible per (seed, epoch, index), different across epochs eventually
    again = TrainingDataset(ann, tmp_path / "images", transform, seed=5)
    assert [again[i][1]["resized_size"] for i in range(2)] == [ds[i][1]["resized_size"] for i in range(2)]
    draws = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        draws.add((ds[0][1]["resized_size"], ds[0][1]["flipped"]))
    assert len(draws) > 1
    images, sizes, targets = next(iter(make_loader(ds, batch_size=2, shuffle=True, seed=0)))
    assert images.shape[0] == 2 and len(targets) == 2


def test_training_dataset_drops_images_without_boxes(tmp_path):
    data = _coco_dict()
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]
    ann = _write_dataset(tmp_path, data)
    ds = TrainingDataset(ann, tmp_path / "images", TrainTransform(InputConfig()))
    assert [e[0] for e in ds.entries] == [1]


def test_coco_boxes_to_xyxy_reference_convention():
    boxes = torch.tensor([[10.0, 20.0, 5.0, 1.0], [0.0, 0.0, 0.5, 3.0]])
    assert coco_boxes_to_xyxy(boxes).tolist() == [[10.0, 20.0, 14.0, 20.0], [0.0, 0.0, 0.0, 2.0]]
