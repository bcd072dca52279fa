"""Images and COCO-format datasets: robust image loading, annotation validation, datasets, loaders.

Image loading (:func:`load_image`) decisions:

* **Colour modes** follow ``Image.convert("RGB")``, which is what the reference's loader did
  (``Image.open(f).convert("RGB")``): grayscale is replicated, palettes are looked up, CMYK /
  YCbCr are converted by PIL, and the **alpha channel of RGBA / LA / PA images is dropped** (the
  stored colour values are kept, no compositing on any background), so a GLIP model sees the same
  pixels as the reference did.
* **16-bit images** (modes ``I;16*``, and ``I`` holding values above 255) are scaled
  ``round(v / 257)`` to 0..255 (65535 -> 255, and 8-bit data stored as ``v * 257`` comes back
  exactly), instead of PIL's clipping, which turns most 16-bit images white. 32-bit ``I`` / ``F``
  images with other ranges are min-max scaled.
* **EXIF orientation** (``exif=``): ``"apply"`` (used by ``glip predict``) rotates/flips the image
  as a viewer would (``ImageOps.exif_transpose``). ``"ignore"`` keeps the stored pixel order, as the
  reference and pycocotools-era annotation files do. ``"auto"`` (used for datasets) applies the
  orientation only when the annotation file's ``(width, height)`` equals the *transposed* size
  and differs from the stored one; otherwise (including 180-degree rotations and mirrorings, where
  sizes cannot tell) the stored orientation is kept, consistent with the reference.
* Missing files, files that are not images and truncated / corrupt files raise :class:`DataError`
  naming the file (truncated files are never silently padded with grey).

Annotation files are validated by :func:`load_coco`; every problem raises a one-line
:class:`DataError` naming the file, the entry and the fix. Boxes in COCO files are ``[x, y, w, h]``;
training targets use the reference's xyxy convention ``x2 = x + w - 1`` (inclusive pixels).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import InputConfig
from .transforms import TrainTransform, pad_batch, padded_size, resize_size, test_transform


class DataError(ValueError):
    """An image or annotation file is missing or malformed; the message names the file and the fix."""


ExifMode = Literal["apply", "ignore", "auto"]
_ORIENTATION_TAG = 0x0112
_SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # orientations that exchange width and height

# --------------------------------------------------------------------------- images


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """``image`` as 8-bit RGB (see the module docstring for the per-mode rules)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16"):
        array = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.round(array / 257.0).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("I", "F"):
        array = np.asarray(image).astype(np.float64)
        if array.size == 0 or not np.isfinite(array).all():
            raise DataError(
                f"{path}: image of mode {mode} has no or non-finite pixel values; re-export it as 8-bit PNG/JPEG"
            )
        lo, hi = float(array.min()), float(array.max())
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = array * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = array
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            scaled = array / 257.0  # 16-bit data opened as 32-bit integers
        else:
            scaled = (array - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(array)
        return Image.fromarray(np.round(scaled).clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA"
            warnings.simplefilter("ignore", UserWarning)
            return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot convert image mode {mode!r} to RGB ({exc}); re-export it as RGB PNG/JPEG") from None


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of ``image`` (1 = as stored, when absent or unreadable)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make an image unloadable
        return 1


def load_image(
    path: str | os.PathLike, *, exif: ExifMode = "apply", expected_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode the image at ``path`` fully into memory as a PIL RGB image.

    ``exif`` chooses how the EXIF orientation is handled (module docstring): ``"apply"``,
    ``"ignore"`` or ``"auto"``, which needs ``expected_size = (width, height)`` from the annotation
    file (without it ``"auto"`` behaves like ``"apply"``). Raises :class:`DataError` for a missing,
    unreadable, non-image or truncated file.
    """
    path = Path(path)
    if exif not in ("apply", "ignore", "auto"):
        raise ValueError(f"load_image: exif must be 'apply', 'ignore' or 'auto', got {exif!r}")
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "not found"
        raise DataError(f"{path}: image {what}; check the path / image root")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: truncated or corrupt data fails here, not later
            orientation = exif_orientation(opened)
            stored = opened.size
            if exif == "auto" and expected_size is not None:
                swapped = (stored[1], stored[0])
                transpose = orientation in _SWAPPING_ORIENTATIONS and tuple(expected_size) == swapped and swapped != stored
            else:
                transpose = exif == "apply" or exif == "auto"
            image = opened
            if transpose and orientation != 1:
                try:
                    image = ImageOps.exif_transpose(opened)
                except Exception as exc:  # noqa: BLE001 - broken EXIF: keep the stored orientation
                    warnings.warn(f"{path}: cannot apply the EXIF orientation ({exc}); using the stored orientation", stacklevel=2)
            return _to_rgb(image, path)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image PIL can read; remove it or convert it to PNG/JPEG") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large ({exc}); downscale it or raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except DataError:
        raise
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: image is truncated or corrupt ({reason}); re-download or re-encode it") from None


# --------------------------------------------------------------------------- COCO annotation files

InvalidBoxes = Literal["error", "drop"]


@dataclass
class CocoData:
    """A validated COCO-format annotation file.

    ``images`` / ``categories`` map ids to their JSON entries (in file order); ``annotations`` is the
    list of (validated) annotation entries, each with ``area`` and ``iscrowd`` filled in when the
    file lacked them. ``dropped_boxes`` counts annotations removed by ``invalid_boxes="drop"``.
    """

    path: Path
    images: dict[Any, dict]
    annotations: list[dict]
    categories: dict[Any, dict]
    info: dict = field(default_factory=dict)
    dropped_boxes: int = 0
    _coco: Any = field(default=None, repr=False, compare=False)

    @property
    def annotations_by_image(self) -> dict[Any, list[dict]]:
        """Image id -> its annotations (every image id present, possibly with an empty list)."""
        by_image: dict[Any, list[dict]] = {image_id: [] for image_id in self.images}
        for ann in self.annotations:
            by_image[ann["image_id"]].append(ann)
        return by_image

    @property
    def category_names(self) -> dict[Any, str]:
        """Category id -> name, in file order."""
        return {cid: cat["name"] for cid, cat in self.categories.items()}

    def as_dict(self) -> dict:
        """The validated dataset as a COCO JSON dict."""
        out = dict(self.info)
        out.update(
            images=list(self.images.values()), annotations=self.annotations, categories=list(self.categories.values())
        )
        return out

    def coco(self):
        """A ``pycocotools.coco.COCO`` of this data (built once, without pycocotools' printing)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO()
                coco.dataset = self.as_dict()
                coco.createIndex()
            self._coco = coco
        return self._coco


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_entries(path: Path, section: str, entries: list, required: Sequence[str]) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(
                f"{path}: {section}[{i}] is a {type(entry).__name__}, not an object; each entry must be an object"
            )
        missing = [key for key in required if key not in entry]
        if missing:
            ident = f" (id {entry['id']!r})" if "id" in entry else ""
            raise DataError(
                f"{path}: {section}[{i}]{ident} lacks {', '.join(repr(k) for k in missing)}; "
                f"every {_SINGULAR[section]} entry needs {', '.join(required)}"
            )
        if not _is_id(entry["id"]):
            raise DataError(f"{path}: {section}[{i}] has id {entry['id']!r}; ids must be integers (or strings)")


def _index_unique(path: Path, section: str, entries: list[dict]) -> dict[Any, dict]:
    index: dict[Any, dict] = {}
    first_pos: dict[Any, int] = {}
    for i, entry in enumerate(entries):
        key = entry["id"]
        if key in index:
            raise DataError(
                f"{path}: duplicate {_SINGULAR[section]} id {key!r} ({section}[{first_pos[key]}] and {section}[{i}]); "
                "ids must be unique"
            )
        index[key] = entry
        first_pos[key] = i
    return index


def _problem(path: Path, items: list, what: str, fix: str) -> DataError:
    first = items[0]
    count = f"{len(items)} annotations have" if len(items) > 1 else "annotation"
    if len(items) > 1:
        prefix = f"{count} {what} (first: annotation id {first[0]!r}, {first[1]})"
    else:
        prefix = f"annotation id {first[0]!r} has {what} ({first[1]})"
    return DataError(f"{path}: {prefix}; {fix}")


def load_coco(
    ann_file: str | os.PathLike, *, invalid_boxes: InvalidBoxes = "error", require_annotations: bool = True
) -> CocoData:
    """Read and validate a COCO-format detection annotation file.

    Checks: valid JSON; a top-level object with ``images``, ``annotations`` and ``categories`` lists
    (``annotations`` may be absent when ``require_annotations`` is False, e.g. test-dev image
    lists); required keys (images: ``id``, ``file_name``, ``width``, ``height``; annotations:
    ``id``, ``image_id``, ``category_id``, ``bbox``; categories: ``id``, ``name``); unique ids;
    boxes of four finite numbers with positive width and height (``invalid_boxes="drop"`` removes
    bad ones with a warning instead); annotations referring to known images and categories; at
    least one image. Raises :class:`DataError` naming the file, the entry and the fix.
    """
    path = Path(ann_file)
    if invalid_boxes not in ("error", "drop"):
        raise ValueError(f"load_coco: invalid_boxes must be 'error' or 'drop', got {invalid_boxes!r}")
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; check the path")
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text); pass a COCO-format .json annotation file") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); fix or re-export the file"
        ) from None
    if not isinstance(raw, dict):
        raise DataError(
            f"{path}: top level is a {type(raw).__name__}; "
            "a COCO file is an object with 'images', 'annotations' and 'categories'"
        )
    required = ["images", "annotations", "categories"] if require_annotations else ["images", "categories"]
    missing = [key for key in required if key not in raw]
    if missing:
        raise DataError(
            f"{path}: missing top-level key(s) {', '.join(repr(k) for k in missing)}; a COCO file needs {', '.join(required)}"
        )
    raw.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw[key], list):
            raise DataError(f"{path}: '{key}' is a {type(raw[key]).__name__}; it must be a list")

    _check_entries(path, "images", raw["images"], ("id", "file_name", "width", "height"))
    _check_entries(path, "annotations", raw["annotations"], ("id", "image_id", "category_id", "bbox"))
    _check_entries(path, "categories", raw["categories"], ("id", "name"))
    if not raw["images"]:
        raise DataError(f"{path}: no images listed ('images' is empty); add images or pass the right annotation file")
    for i, img in enumerate(raw["images"]):
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DataError(
                f"{path}: images[{i}] (id {img['id']!r}) has file_name {img['file_name']!r}; it must be a non-empty path string"
            )
        for key in ("width", "height"):
            if not _is_number(img[key]) or img[key] <= 0:
                raise DataError(
                    f"{path}: images[{i}] (id {img['id']!r}) has {key} {img[key]!r}; it must be a positive number of pixels"
                )
    images = _index_unique(path, "images", raw["images"])
    categories = _index_unique(path, "categories", raw["categories"])
    _index_unique(path, "annotations", raw["annotations"])

    malformed, nonpositive, unknown_image, unknown_category, bad_crowd = [], [], [], [], []
    kept: list[dict] = []
    for ann in raw["annotations"]:
        box = ann["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            malformed.append((ann["id"], f"bbox {box!r}"))
            continue
        if ann["image_id"] not in images:
            unknown_image.append((ann["id"], f"image_id {ann['image_id']!r}"))
        if ann["category_id"] not in categories:
            unknown_category.append((ann["id"], f"category_id {ann['category_id']!r}"))
        if ann.get("iscrowd", 0) not in (0, 1):
            bad_crowd.append((ann["id"], f"iscrowd {ann['iscrowd']!r}"))
        if box[2] <= 0 or box[3] <= 0:
            nonpositive.append((ann["id"], f"bbox {list(box)}"))
            if invalid_boxes == "drop":
                continue
        kept.append(ann)
    if malformed:
        raise _problem(path, malformed, "a malformed bbox", "a bbox is [x, y, width, height], four finite numbers")
    if unknown_image:
        raise _problem(path, unknown_image, "an image_id not in 'images'", "add the image entry or remove the annotation")
    if unknown_category:
        raise _problem(path, unknown_category, "a category_id not in 'categories'", "add the category or fix the annotation")
    if bad_crowd:
        raise _problem(path, bad_crowd, "an iscrowd that is not 0 or 1", "set iscrowd to 0 or 1")
    if nonpositive and invalid_boxes == "error":
        raise _problem(path, nonpositive, "a bbox with width or height <= 0", "fix the box or load with invalid_boxes='drop'")
    if nonpositive:
        warnings.warn(f"{path}: dropped {len(nonpositive)} annotation(s) whose bbox has width or height <= 0", stacklevel=2)
    for ann in kept:
        ann.setdefault("iscrowd", 0)
        if not _is_number(ann.get("area")):
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    info = {k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")}
    dropped = len(nonpositive) if invalid_boxes == "drop" else 0
    return CocoData(path, images, kept, categories, info=info, dropped_boxes=dropped)


def _as_coco_data(coco: CocoData | str | os.PathLike) -> CocoData:
    return coco if isinstance(coco, CocoData) else load_coco(coco)


def _existing_images(
    coco: CocoData, image_root: Path, image_ids: Iterable | None, left_out: str = "skipped"
) -> tuple[list[tuple[Any, Path, tuple[int, int]]], list[str]]:
    """``(image_id, path, (json_width, json_height))`` of the listed images found on disk, and the
    ``file_name`` of each one that is not; warns once with the count of missing ones (saying what
    happens to them: ``left_out``) and raises :class:`DataError` when none is found."""
    ids = list(coco.images) if image_ids is None else list(image_ids)
    unknown = [i for i in ids if i not in coco.images]
    if unknown:
        raise DataError(
            f"{coco.path}: image id {unknown[0]!r} is not in the annotation file; pass ids listed under 'images'"
        )
    found, missing = [], []
    for image_id in ids:
        entry = coco.images[image_id]
        file = image_root / entry["file_name"]
        if file.is_file():
            found.append((image_id, file, (int(entry["width"]), int(entry["height"]))))
        else:
            missing.append(entry["file_name"])
    if not found:
        raise DataError(
            f"{coco.path}: none of the {len(ids)} images was found under {image_root} "
            f"(first: {image_root / missing[0]}); check the image root"
        )
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(ids)} images listed in {coco.path.name} are missing under {image_root} "
            f"(first: {missing[0]}): {left_out}",
            stacklevel=3,
        )
    return found, missing


def _load_for_dataset(path: Path, json_wh: tuple[int, int], exif: ExifMode) -> Image.Image:
    image = load_image(path, exif=exif, expected_size=json_wh)
    if image.size != tuple(json_wh):
        warnings.warn(
            f"{path}: image is {image.width}x{image.height} but the annotation file says {json_wh[0]}x{json_wh[1]}; "
            "boxes are mapped to the annotation file's size",
            stacklevel=3,
        )
    return image


class DetectionDataset(Dataset):
    """Evaluation images of a COCO-format dataset, transformed as the reference test transform.

    Item ``i`` is ``(image, info)``: ``image`` float32 ``[3, h, w]`` (normalised BGR*255, not padded)
    and ``info`` = ``{"image_id", "index": i, "file", "original_size": (H, W) from the annotation
    file (the size predictions are mapped back to, as the reference does), "loaded_size": (H, W) of
    the decoded image, "resized_size": (h, w)}``. Images listed but missing on disk are skipped with
    one warning; :attr:`missing` lists their file names (the metrics leave them out and say so).
    """

    def __init__(
        self,
        coco: CocoData | str | os.PathLike,
        image_root: str | os.PathLike,
        cfg: InputConfig,
        *,
        image_ids: Iterable | None = None,
        exif: ExifMode = "auto",
    ) -> None:
        self.coco = _as_coco_data(coco)
        self.image_root = Path(image_root)
        self.cfg = cfg
        self.exif = exif
        ids = list(self.coco.images) if image_ids is None else list(image_ids)
        self.entries, self.missing = _existing_images(
            self.coco, self.image_root, ids, "skipped, and left out of the metrics"
        )

    @property
    def num_missing(self) -> int:
        """Images listed in the annotation file but missing on disk (:attr:`missing` names them)."""
        return len(self.missing)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id, path, json_wh = self.entries[index]
        pil = _load_for_dataset(path, json_wh, self.exif)
        tensor, resized = test_transform(pil, self.cfg)
        info = {
            "image_id": image_id,
            "index": index,
            "file": str(path),
            "original_size": (json_wh[1], json_wh[0]),
            "loaded_size": (pil.height, pil.width),
            "resized_size": resized,
        }
        return tensor, info

    def collate(self, batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict]]:
        """``[(image, info)]`` -> ``(images [B, 3, H, W] zero-padded, image_sizes [(h, w)], infos)``."""
        return collate_detection(batch, self.cfg.size_divisibility)

    def padded_sizes(self) -> list[tuple[int, int]]:
        """The network input size ``(H, W)`` of each item alone (resized, then padded to
        ``size_divisibility``), from the annotation file's sizes, without reading any image."""
        cfg = self.cfg
        sizes = []
        for _, _, (w, h) in self.entries:
            ow, oh = resize_size(w, h, cfg.min_size, cfg.max_size)
            sizes.append(padded_size(oh, ow, cfg.size_divisibility))
        return sizes


class ImageFiles(Dataset):
    """Image files to run a model on (``glip predict``), transformed as the reference test transform.

    Item ``i`` is ``(image, info)``: ``image`` float32 ``[3, h, w]`` and ``info`` = ``{"index": i,
    "file", "loaded_size": (H, W) of the decoded image (EXIF orientation applied with
    ``exif="apply"``), "resized_size": (h, w)}``; for a file that cannot be read ``image`` is None
    and ``info["error"]`` says why (one bad file does not stop a run, in loader workers neither).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], cfg: InputConfig, *, exif: ExifMode = "apply") -> None:
        self.paths = [Path(p) for p in paths]
        self.cfg = cfg
        self.exif = exif

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, dict]:
        path = self.paths[index]
        try:
            pil = load_image(path, exif=self.exif)
        except DataError as e:
            return None, {"index": index, "file": str(path), "error": str(e)}
        tensor, resized = test_transform(pil, self.cfg)
        return tensor, {"index": index, "file": str(path), "loaded_size": (pil.height, pil.width), "resized_size": resized}

    def collate(self, batch: list[tuple[torch.Tensor | None, dict]]) -> tuple[torch.Tensor | None, list[tuple[int, int]], list[dict]]:
        """``(images [b, 3, H, W] zero-padded or None, image_sizes [(h, w)], infos)``: ``infos`` of
        every item, ``images`` / ``image_sizes`` of those without an ``"error"``, in that order."""
        good = [image for image, _ in batch if image is not None]
        images, sizes = pad_batch(good, self.cfg.size_divisibility) if good else (None, [])
        return images, sizes, [info for _, info in batch]

    def padded_sizes(self) -> list[tuple[int, int] | None]:
        """The network input size of each file alone, from its header (no decoding); None for a
        file that cannot be opened (its item will carry the error)."""
        cfg = self.cfg
        sizes: list[tuple[int, int] | None] = []
        for path in self.paths:
            try:
                with Image.open(path) as opened:
                    w, h = opened.size
                    if self.exif != "ignore" and exif_orientation(opened) in _SWAPPING_ORIENTATIONS:
                        w, h = h, w
            except Exception:  # noqa: BLE001 - unreadable here means an error item later
                sizes.append(None)
                continue
            ow, oh = resize_size(w, h, cfg.min_size, cfg.max_size)
            sizes.append(padded_size(oh, ow, cfg.size_divisibility))
        return sizes


class SizeGroupedBatchSampler(Sampler):
    """Batches of items that share a key (the padded input size), so that no image of a batch is
    padded beyond its own size and every result equals the batch-1 result.

    Items are taken in dataset order; each goes to its key's open batch, which is emitted when it
    holds ``batch_size`` items (so batches come out roughly in dataset order, and few are open at a
    time); the incomplete ones follow at the end, in the order they were opened.
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"SizeGroupedBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.keys = list(keys)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        open_batches: dict[Hashable, list[int]] = {}
        for index, key in enumerate(self.keys):
            batch = open_batches.setdefault(key, [])
            batch.append(index)
            if len(batch) == self.batch_size:
                del open_batches[key]
                yield batch
        yield from open_batches.values()

    def __len__(self) -> int:
        counts: dict[Hashable, int] = {}
        for key in self.keys:
            counts[key] = counts.get(key, 0) + 1
        return sum(-(-n // self.batch_size) for n in counts.values())


def default_workers(device: torch.device | str = "cpu") -> int:
    """Image loading processes that keep ``device`` fed on this machine: one on a CPU (decoding is
    small next to the CPU forward, and a second process overlaps it), up to 8 on a GPU (one core
    left for the main process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return max(1, min(8, cpus - 1))
    return 1 if cpus > 1 else 0


def collate_detection(
    batch: list[tuple[torch.Tensor, dict]], size_divisibility: int = 32
) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict]]:
    """Collate :class:`DetectionDataset` items: ``(images [B, 3, H, W], image_sizes [(h, w)], infos)``."""
    images, sizes = pad_batch([item[0] for item in batch], size_divisibility)
    return images, sizes, [item[1] for item in batch]


def coco_boxes_to_xyxy(boxes_xywh: torch.Tensor) -> torch.Tensor:
    """COCO ``[N, 4]`` ``(x, y, w, h)`` to the reference's inclusive xyxy: ``x2 = x + max(w - 1, 0)``
    (``BoxList(..., mode="xywh").convert("xyxy")``)."""
    x, y, w, h = boxes_xywh.unbind(-1)
    return torch.stack((x, y, x + (w - 1).clamp(min=0), y + (h - 1).clamp(min=0)), dim=-1)


def clip_and_filter(boxes: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip xyxy ``boxes`` ``[N, 4]`` to ``[0, W-1] x [0, H-1]`` and drop empty ones (``x2 <= x1`` or
    ``y2 <= y1``), as ``BoxList.clip_to_image(remove_empty=True)``; returns (boxes, kept mask ``[N]``)."""
    x = boxes[:, 0::2].clamp(min=0, max=width - 1)
    y = boxes[:, 1::2].clamp(min=0, max=height - 1)
    clipped = torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)
    keep = (clipped[:, 3] > clipped[:, 1]) & (clipped[:, 2] > clipped[:, 0])
    return clipped[keep], keep


class TrainingDataset(Dataset):
    """Training images of a COCO-format dataset with boxes, augmented by a :class:`TrainTransform`.

    Item ``i`` is ``(image, target)``: ``image`` float32 ``[3, h, w]`` and ``target`` =
    ``{"boxes": [N, 4] float32 xyxy in the resized (possibly flipped) image, "category_ids": [N]
    int64 (the annotation file's category ids), "image_id", "file", "original_size": (H, W),
    "resized_size": (h, w), "flipped": bool}``. Crowd annotations are removed; boxes are converted
    with the reference's ``x2 = x + w - 1``, clipped to the image and empty ones dropped. With
    ``remove_images_without_annotations`` images without a usable (non-crowd, both sides > 1 px)
    box are left out, as the reference does for training.

    Randomness is reproducible and independent of the number of loader workers: item ``i`` of epoch
    ``e`` uses ``random.Random(f"{seed}:{e}:{i}")``; call :meth:`set_epoch` every epoch.
    """

    def __init__(
        self,
        coco: CocoData | str | os.PathLike,
        image_root: str | os.PathLike,
        transform: TrainTransform,
        *,
        seed: int = 0,
        remove_images_without_annotations: bool = True,
        image_ids: Iterable | None = None,
        exif: ExifMode = "auto",
    ) -> None:
        self.coco = _as_coco_data(coco)
        self.image_root = Path(image_root)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.exif = exif
        by_image = self.coco.annotations_by_image
        entries, _ = _existing_images(self.coco, self.image_root, image_ids, "not trained on")
        self.annotations = {
            image_id: [a for a in by_image[image_id] if not a.get("iscrowd", 0)] for image_id, _, _ in entries
        }
        if remove_images_without_annotations:
            entries = [e for e in entries if any(a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in self.annotations[e[0]])]
            if not entries:
                raise DataError(
                    f"{self.coco.path}: no image has a usable (non-crowd, larger than 1 px) box; nothing to train on"
                )
        self.entries = entries

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (affects workers started afterwards)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id, path, json_wh = self.entries[index]
        pil = _load_for_dataset(path, json_wh, self.exif)
        anns = self.annotations[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        category_ids = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64).reshape(-1)
        boxes, keep = clip_and_filter(coco_boxes_to_xyxy(boxes), pil.width, pil.height)
        category_ids = category_ids[keep]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        out = self.transform(pil, boxes, rng=rng)
        target = {
            "boxes": out.boxes,
            "category_ids": category_ids,
            "image_id": image_id,
            "file": str(path),
            "original_size": (pil.height, pil.width),
            "resized_size": out.size,
            "flipped": out.flipped,
        }
        return out.image, target

    def collate(self, batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict]]:
        """``[(image, target)]`` -> ``(images [B, 3, H, W] zero-padded, image_sizes [(h, w)], targets)``."""
        return collate_detection(batch, self.transform.cfg.size_divisibility)


def make_loader(
    dataset: DetectionDataset | TrainingDataset | ImageFiles,
    batch_size: int = 1,
    workers: int = 0,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(images [B, 3, H, W], image_sizes [(h, w)], infos_or_targets)``.

    Inference datasets (:class:`DetectionDataset`, :class:`ImageFiles`; not shuffled) are batched
    by padded size (:class:`SizeGroupedBatchSampler`): detections do not depend on ``batch_size``. ``shuffle``
    (for training) draws the order from a generator seeded with ``seed``. ``workers`` processes
    decode, resize and normalise the images while the model runs; ``pin_memory`` for CUDA.
    """
    if batch_size < 1:
        raise ValueError(f"make_loader: batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"make_loader: workers must be >= 0, got {workers}")
    common = dict(num_workers=workers, collate_fn=dataset.collate, pin_memory=pin_memory, persistent_workers=False)
    if isinstance(dataset, (DetectionDataset, ImageFiles)) and not shuffle:
        sampler = SizeGroupedBatchSampler(dataset.padded_sizes(), batch_size)
        return DataLoader(dataset, batch_sampler=sampler, **common)
    generator = None
    if shuffle and seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last, **common)
