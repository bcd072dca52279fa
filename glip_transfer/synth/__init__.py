"""A synthetic grounding corpus, rendered by the package (Pillow / numpy, no downloads).

Scenes hold several objects from a vocabulary of shapes x colours x sizes (:mod:`.shapes`),
with bounded occlusion, clutter strokes and varied backgrounds (:mod:`.scene`); each image has a
natural-language caption whose phrases are linked to their boxes by character spans
(:mod:`.captions`). The splits (:mod:`.splits`) are the pretraining corpus of glip-nano and the
demo targets, which hold out shape words and colour-shape pairs.

A split written by :func:`generate` into a folder::

    synth.json                 what was generated (split, seed, sizes, generator version)
    train/000001.jpg ...       images of each subset (train, val[, test])
    train.json ...             COCO detection annotations + the grounding fields: every image
                               has a ``caption``, every box ``tokens_positive`` spans into it
    few_shot/train_shot{K}_seed{S}.json     K-shot subsets of train (targets; K 1/3/5/10,
                                            S 3/30/300, the official greedy rule)

Everything is a function of (split, seed, images): the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from ..data import DataError
from .captions import category_list, describe
from .scene import ObjectSpec, render_scene
from .shapes import size_word
from .splits import HELD_OUT_PAIRS, HELD_OUT_SHAPES, SPLITS, SplitSpec

__all__ = [
    "SPLITS",
    "SynthError",
    "check_out",
    "ensure",
    "generate",
    "read_manifest",
    "split_spec",
    "subset_sizes",
    "HELD_OUT_PAIRS",
    "HELD_OUT_SHAPES",
]

GENERATOR_VERSION = 1
MANIFEST = "synth.json"
FORMAT = "glip-transfer-synth"
FEW_SHOTS = (1, 3, 5, 10)
FEW_SHOT_SEEDS = (3, 30, 300)
JPEG_QUALITY = 92
_SUBSET_CODES = {"train": 1, "val": 2, "test": 3}


class SynthError(DataError):
    """A synthetic-data request or folder is wrong; the message says what to do."""


def split_spec(name: str) -> SplitSpec:
    if name not in SPLITS:
        raise SynthError(f"unknown synthetic split {name!r}: choose one of {', '.join(SPLITS)}")
    return SPLITS[name]


def subset_sizes(spec: SplitSpec, images: int | None, subsets: dict[str, int] | None = None) -> dict[str, int]:
    """Images per subset: ``subsets`` (or the split's defaults), then ``images`` for train."""
    sizes = dict(spec.subsets if subsets is None else subsets)
    unknown = [k for k in sizes if k not in _SUBSET_CODES]
    if unknown or "train" not in sizes:
        raise SynthError(f"subsets {sorted(sizes)}: need train, and only {', '.join(_SUBSET_CODES)}")
    if images is not None:
        if images < 1:
            raise SynthError(f"--images must be >= 1, got {images}")
        sizes["train"] = images
    return sizes


def _scene_objects(rng: np.random.Generator, spec: SplitSpec) -> list[ObjectSpec]:
    """The objects of one image: targets (some repeating the previous one) and distractors, in a
    random drawing order."""
    objects: list[ObjectSpec] = []
    for _ in range(int(rng.integers(spec.targets_per_image[0], spec.targets_per_image[1] + 1))):
        if objects and rng.random() < spec.repeat:
            objects.append(objects[-1])
        else:
            c, s = spec.targets[int(rng.integers(len(spec.targets)))]
            objects.append(ObjectSpec(s, c, True))
    for _ in range(int(rng.integers(spec.distractors_per_image[0], spec.distractors_per_image[1] + 1))):
        c, s = spec.distractors[int(rng.integers(len(spec.distractors)))]
        objects.append(ObjectSpec(s, c, False))
    order = rng.permutation(len(objects))
    return [objects[int(i)] for i in order]


def render_image(spec: SplitSpec, seed: int, subset: str, index: int):
    """(PIL image, caption, annotations without ids) of image ``index`` of a subset: a function of
    its arguments only (its own random stream)."""
    split_code = sum(ord(ch) * 31**i for i, ch in enumerate(spec.name)) % (2**31)
    rng = np.random.default_rng([seed, split_code, _SUBSET_CODES[subset], index])
    scene = render_scene(rng, spec.style, _scene_objects(rng, spec))
    targets = [o for o in scene.objects if o.target]
    side = min(spec.style.width, spec.style.height)
    sizes = [size_word(max(o.box[2], o.box[3]), side, spec.small_below, spec.large_from) for o in targets]
    if targets and rng.random() < spec.describe:
        caption = describe(rng, targets, sizes, scene.background)
    else:
        caption = category_list(rng, targets, spec.vocabulary)
    anns = []
    for obj, size, spans in zip(targets, sizes, caption.spans):
        anns.append({"bbox": list(obj.box), "area": obj.area, "iscrowd": 0,
                     "category": spec.category_of(obj.colour, obj.shape), "tokens_positive": spans,
                     "shape": obj.shape, "colour": obj.colour, "size": size or "medium"})  # fmt: skip
    return scene.image, caption.text, scene.background, anns


def _write_json(path: Path, data) -> None:
    from ..evaluation import atomic_write_text

    atomic_write_text(path, json.dumps(data, separators=(",", ":")) + "\n")


def _owned(folder: Path) -> list[Path]:
    """What :func:`generate` writes in ``folder`` (and only that is ever removed)."""
    names = [MANIFEST, "few_shot"] + [f"{s}.json" for s in _SUBSET_CODES] + list(_SUBSET_CODES)
    return [folder / n for n in names if (folder / n).exists()]


def _clear(folder: Path) -> None:
    for p in _owned(folder):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_out(out: str | Path, force: bool) -> bool:
    """Whether ``out`` has content to replace; a :class:`SynthError` when it is a file, or not
    empty without ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: is a file; --out needs a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SynthError(
                f"{out} is not empty: pass --force to replace the synthetic data in it, or choose another --out"
            )
        return True
    return False


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def generate(out: str | Path, split: str = "pretrain", *, images: int | None = None, seed: int = 0, force: bool = False,
             progress: Callable[[int, int], None] | None = None,
             subsets: dict[str, int] | None = None) -> dict:  # fmt: skip
    """Render split ``split`` into the folder ``out`` and return its manifest. A folder with
    anything in it is refused unless ``force`` (then only what this function writes is
    replaced). ``progress(done, total)`` is called after every image. ``subsets`` replaces the
    split's subset sizes (``{"train": 8, "val": 4}``; ``images`` still sets train)."""
    spec = split_spec(split)
    sizes = subset_sizes(spec, images, subsets)
    out = Path(out)
    if check_out(out, force):
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(spec.category_names())]
    category_id = {c["name"]: c["id"] for c in categories}
    total, done = sum(sizes.values()), 0
    for subset, count in sizes.items():
        folder = out / subset
        folder.mkdir(exist_ok=True)
        coco = {"info": {"description": f"glip-transfer synthetic split {split!r}, {subset}", "seed": seed},
                "images": [], "annotations": [], "categories": categories}  # fmt: skip
        for index in range(count):
            image, caption, background, anns = render_image(spec, seed, subset, index)
            image_id = index + 1
            name = f"{image_id:06d}.jpg"
            image.save(folder / name, quality=JPEG_QUALITY, subsampling=0)
            coco["images"].append({"id": image_id, "file_name": name, "width": image.width, "height": image.height,
                                   "caption": caption, "background": background})  # fmt: skip
            for ann in anns:
                ann = {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category_id[ann.pop("category")],
                    **ann,
                }
                coco["annotations"].append(ann)
            done += 1
            if progress is not None:
                progress(done, total)
        _write_json(out / f"{subset}.json", coco)
        if subset == "train" and spec.few_shot:
            _write_few_shot(out, coco)
    manifest = {"format": FORMAT, "version": GENERATOR_VERSION, "split": split, "seed": seed, "images": images,
                "subsets": sizes, "categories": [c["name"] for c in categories], "summary": spec.summary}  # fmt: skip
    _write_json(out / MANIFEST, manifest)
    return manifest


def _write_few_shot(out: Path, coco: dict) -> None:
    from ..data import CocoData
    from ..training.data import few_shot_image_ids

    data = CocoData(out / "train.json", {i["id"]: i for i in coco["images"]}, coco["annotations"],
                    {c["id"]: c for c in coco["categories"]})  # fmt: skip
    (out / "few_shot").mkdir(exist_ok=True)
    for shots in FEW_SHOTS:
        for seed in FEW_SHOT_SEEDS:
            keep = set(few_shot_image_ids(data, shots, seed))
            subset = {**coco, "images": [i for i in coco["images"] if i["id"] in keep],
                      "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}  # fmt: skip
            _write_json(out / "few_shot" / f"train_shot{shots}_seed{seed}.json", subset)


def ensure(out: str | Path, split: str, *, images: int | None = None, seed: int = 0,
           notify: Callable[[str], None] | None = None,
           progress: Callable[[int, int], None] | None = None) -> bool:  # fmt: skip
    """Make sure ``out`` holds split ``split`` generated with these arguments: generate it when
    the folder is missing or holds only an unfinished generation (True), accept a matching one
    (False), refuse anything else with a one-line :class:`SynthError`."""
    out = Path(out)
    manifest = read_manifest(out)
    wanted = {
        "version": GENERATOR_VERSION,
        "split": split,
        "seed": seed,
        "subsets": subset_sizes(split_spec(split), images),
    }
    if manifest is not None:
        differs = [k for k, v in wanted.items() if manifest.get(k) != v]
        if not differs:
            return False
        k = differs[0]
        raise SynthError(f"{out} holds synthetic data made with {k}={manifest.get(k)!r}, not {wanted[k]!r}: "
                         f"regenerate it with glip data synth --out {out} --split {split} --seed {seed} "
                         "--force")  # fmt: skip
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p not in _owned(out))
        if foreign:
            raise SynthError(
                f"{out} holds other files ({foreign[0]}, ...) and no synthetic data: "
                "move them or choose another --data-root"
            )
    if notify is not None:
        notify(f"generating the synthetic {split!r} data into {out} (first use)")
    generate(out, split, images=images, seed=seed, force=True, progress=progress)
    return True
