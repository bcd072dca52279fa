"""Test data: a tiny synthetic detection dataset (coloured rectangles on a plain background, COCO
JSON) that the training tests learn from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

COLOURS = ((220, 30, 30), (30, 190, 30), (30, 30, 220), (230, 200, 20))


def make_rectangles(
    root: str | Path,
    n_images: int = 12,
    names: Sequence[str] = ("red", "green", "blue"),
    colour_of: Sequence[int] | None = None,
    size: tuple[int, int] = (160, 128),
    per_image: int = 2,
    seed: int = 0,
    background: int = 200,
    box_range: tuple[int, int] = (28, 56),
) -> tuple[Path, Path]:
    """Write ``root/images/*.png`` and ``root/ann.json``; returns ``(ann_file, image_dir)``.

    Category ``i + 1`` is named ``names[i]`` and drawn in ``COLOURS[colour_of[i]]`` (default: the
    i-th colour); each image (``size`` = width, height) holds ``per_image`` rectangles of distinct
    categories with sides drawn from ``box_range``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    colour_of = list(colour_of) if colour_of is not None else list(range(len(names)))
    if len(colour_of) != len(names) or max(colour_of) >= len(COLOURS):
        raise ValueError(f"colour_of needs one index < {len(COLOURS)} per name")
    rng = np.random.default_rng(seed)
    width, height = size
    images, anns = [], []
    for i in range(n_images):
        canvas = np.full((height, width, 3), background, np.uint8)
        for c in rng.permutation(len(names))[: min(per_image, len(names))]:
            w, h = (int(rng.integers(box_range[0], box_range[1])) for _ in range(2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            canvas[y : y + h, x : x + w] = COLOURS[colour_of[int(c)]]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        Image.fromarray(canvas).save(root / "images" / f"{i:04d}.png")
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": width, "height": height})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann_file, root / "images"
