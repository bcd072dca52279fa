"""Rendering one scene: a background, clutter strokes, objects placed with bounded occlusion,
and the exact box of every object's visible pixels.

Every random choice comes from one ``numpy.random.Generator``: the same generator state gives
the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .shapes import BACKGROUNDS, COLOURS, SHAPES, shape_mask

MIN_VISIBLE = 0.6  # an object keeps at least this fraction of its pixels when others cover it
PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw: a shape in a colour, annotated (``target``) or a distractor."""

    shape: str
    colour: str
    target: bool = True


@dataclass
class PlacedObject:
    shape: str
    colour: str
    target: bool
    extent: int  # the drawn size in pixels (before rotation)
    box: tuple[int, int, int, int]  # x, y, w, h of the visible pixels (COCO layout)
    area: int  # visible pixels
    centre: tuple[float, float]


@dataclass
class Scene:
    image: Image.Image
    background: str
    objects: list[PlacedObject] = field(default_factory=list)


@dataclass(frozen=True)
class SceneStyle:
    """How scenes of a split look: image size, object sizes (fractions of the short side),
    backgrounds, and clutter strokes per image."""

    width: int = 160
    height: int = 160
    extent: tuple[float, float] = (0.08, 0.36)
    backgrounds: tuple[str, ...] = ("plain", "gradient", "noise", "stripes", "checkerboard")
    clutter: tuple[int, int] = (0, 8)
    pixel_noise: float = 2.0  # std of the per-pixel noise over the finished image


def _object_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    c = COLOURS[name]
    return np.clip(np.array(c.rgb, dtype=np.float32) + rng.uniform(-c.jitter, c.jitter, size=3), 0, 255)


def _clutter(rng: np.random.Generator, image: Image.Image, count: int) -> None:
    """Thin strokes, dots and scribbles in muted or random colours: texture that is not an object."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(count):
        kind = rng.integers(3)
        colour = tuple(int(v) for v in rng.integers(40, 220, size=3))
        if kind == 0:  # a straight stroke
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            length, theta = rng.uniform(10, 60), rng.uniform(0, 2 * math.pi)
            draw.line(
                [(x0, y0), (x0 + length * math.cos(theta), y0 + length * math.sin(theta))],
                fill=colour,
                width=int(rng.integers(1, 3)),
            )
        elif kind == 1:  # a small dot
            x0, y0, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 3.5)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
        else:  # a scribble
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            points = [(x, y)]
            for _ in range(int(rng.integers(3, 7))):
                x, y = x + rng.uniform(-12, 12), y + rng.uniform(-12, 12)
                points.append((x, y))
            draw.line(points, fill=colour, width=1)


def render_scene(rng: np.random.Generator, style: SceneStyle, objects: list[ObjectSpec]) -> Scene:
    """Draw ``objects`` (in order; later ones on top) on a background of ``style``. An object that
    cannot be placed without covering more than ``1 - MIN_VISIBLE`` of an earlier one (or
    without leaving the image) is left out."""
    w, h = style.width, style.height
    side = min(w, h)
    background = style.backgrounds[int(rng.integers(len(style.backgrounds)))]
    canvas = BACKGROUNDS[background].paint(rng, h, w).astype(np.float32)
    under = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _clutter(rng, under, int(rng.integers(style.clutter[0], style.clutter[1] + 1)))
    canvas = np.asarray(under, dtype=np.float32).copy()

    label = np.full((h, w), -1, dtype=np.int16)
    full_area: list[int] = []
    placed: list[tuple[ObjectSpec, int]] = []
    for spec in objects:
        shape = SHAPES[spec.shape]
        for _ in range(PLACEMENT_TRIES):
            extent = int(round(rng.uniform(*style.extent) * side))
            angle = float(rng.uniform(-shape.max_rotation / 2, shape.max_rotation / 2)) if shape.max_rotation else 0.0
            alpha = shape_mask(shape, max(extent, 6), angle)
            mh, mw = alpha.shape
            if mh >= h or mw >= w:
                continue
            y0, x0 = int(rng.integers(0, h - mh + 1)), int(rng.integers(0, w - mw + 1))
            solid = alpha > 0.5
            region = label[y0 : y0 + mh, x0 : x0 + mw]
            covered = region[solid]
            ok = True
            for index in np.unique(covered[covered >= 0]):
                remaining = int((label == index).sum()) - int((covered == index).sum())
                if remaining < MIN_VISIBLE * full_area[index]:
                    ok = False
                    break
            if not ok:
                continue
            colour = _object_colour(rng, spec.colour)
            shade = 1.0 + rng.uniform(-0.08, 0.08) * np.linspace(-1, 1, mh, dtype=np.float32)[:, None, None]
            fill = np.clip(colour[None, None] * shade, 0, 255)
            patch = canvas[y0 : y0 + mh, x0 : x0 + mw]
            a = alpha[..., None]
            canvas[y0 : y0 + mh, x0 : x0 + mw] = patch * (1 - a) + fill * a
            region[solid] = len(full_area)
            full_area.append(int(solid.sum()))
            placed.append((spec, extent))
            break

    if style.pixel_noise > 0:
        canvas = canvas + rng.normal(0, style.pixel_noise, size=canvas.shape).astype(np.float32)
    scene = Scene(Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8)), background)
    for index, (spec, extent) in enumerate(placed):
        rows, cols = np.nonzero(label == index)
        x, y = int(cols.min()), int(rows.min())
        bw, bh = int(cols.max()) - x + 1, int(rows.max()) - y + 1
        scene.objects.append(PlacedObject(spec.shape, spec.colour, spec.target, extent, (x, y, bw, bh), int(len(rows)),
                                          (float(cols.mean()), float(rows.mean()))))  # fmt: skip
    return scene
