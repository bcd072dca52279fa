"""The vocabulary of the synthetic scenes: shapes (drawn as anti-aliased masks), colours, sizes
and backgrounds, each with the words captions use for it.

A shape is drawn into a square mask of side ``size`` pixels (the object's nominal extent),
rotated by ``angle`` degrees; the mask's visible pixels give the box. Drawing is supersampled
(x4, box-filtered), so edges are anti-aliased and the same arguments give the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4

Point = tuple[float, float]


@dataclass(frozen=True)
class Shape:
    """A shape word, its plural, and how it is drawn: ``draw(d, s)`` paints the shape (fill 255,
    holes 0) onto ``d``, an ``ImageDraw`` of an ``s x s`` canvas, centred, unrotated."""

    name: str
    plural: str
    draw: Callable[[ImageDraw.ImageDraw, float], None]
    max_rotation: float = 360.0  # rotations beyond this look the same (or turn it into another shape)


def _regular(n: int, radius: float, c: float, start: float = -90.0) -> list[Point]:
    return [(c + radius * math.cos(math.radians(start + 360.0 * i / n)),
             c + radius * math.sin(math.radians(start + 360.0 * i / n)))
            for i in range(n)]  # fmt: skip


def _polygon(points: list[Point]) -> Callable[[ImageDraw.ImageDraw, float], None]:
    """A shape given by a polygon in unit coordinates (0..1 over the canvas)."""

    def draw(d: ImageDraw.ImageDraw, s: float) -> None:
        d.polygon([(x * s, y * s) for x, y in points], fill=255)

    return draw


def _circle(d, s):
    d.ellipse([0.04 * s, 0.04 * s, 0.96 * s, 0.96 * s], fill=255)


def _ring(d, s):
    d.ellipse([0.04 * s, 0.04 * s, 0.96 * s, 0.96 * s], fill=255)
    d.ellipse([0.27 * s, 0.27 * s, 0.73 * s, 0.73 * s], fill=0)


def _crescent(d, s):
    d.ellipse([0.04 * s, 0.04 * s, 0.96 * s, 0.96 * s], fill=255)
    d.ellipse([0.30 * s, -0.02 * s, 1.12 * s, 0.80 * s], fill=0)


def _star_points(points: int = 5, inner: float = 0.42) -> list[Point]:
    outer = _regular(points, 0.48, 0.5)
    inner_pts = _regular(points, 0.48 * inner, 0.5, start=-90.0 + 180.0 / points)
    return [p for pair in zip(outer, inner_pts) for p in pair]


def _heart_points(n: int = 64) -> list[Point]:
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((0.5 + x / 36.0, 0.45 - y / 36.0))
    return pts


_ARROW = [(0.04, 0.38), (0.58, 0.38), (0.58, 0.14), (0.96, 0.5), (0.58, 0.86), (0.58, 0.62), (0.04, 0.62)]
_CROSS = [(0.33, 0.04), (0.67, 0.04), (0.67, 0.33), (0.96, 0.33), (0.96, 0.67), (0.67, 0.67), (0.67, 0.96),
          (0.33, 0.96), (0.33, 0.67), (0.04, 0.67), (0.04, 0.33), (0.33, 0.33)]  # fmt: skip

SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("circle", "circles", _circle, 0.0),
        Shape("square", "squares", _polygon([(0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.1, 0.9)]), 30.0),
        Shape("triangle", "triangles", _polygon(_regular(3, 0.5, 0.5, start=-90.0)), 360.0),
        Shape("star", "stars", _polygon(_star_points()), 72.0),
        Shape("hexagon", "hexagons", _polygon(_regular(6, 0.48, 0.5)), 60.0),
        Shape("pentagon", "pentagons", _polygon(_regular(5, 0.48, 0.5)), 72.0),
        Shape("diamond", "diamonds", _polygon([(0.5, 0.02), (0.82, 0.5), (0.5, 0.98), (0.18, 0.5)]), 40.0),
        Shape("cross", "crosses", _polygon(_CROSS), 30.0),
        Shape("ring", "rings", _ring, 0.0),
        Shape("heart", "hearts", _polygon(_heart_points()), 50.0),
        Shape("crescent", "crescents", _crescent, 360.0),
        Shape("arrow", "arrows", _polygon(_ARROW), 360.0),
    )
}


def shape_mask(shape: Shape, size: int, angle: float) -> np.ndarray:
    """The anti-aliased mask (float32 in 0..1) of ``shape`` drawn at ``size`` pixels and rotated
    by ``angle`` degrees (counter-clockwise) about its centre, cropped to its visible pixels."""
    big = size * SUPERSAMPLE
    pad = big // 4  # room for the corners of a rotated shape
    canvas = Image.new("L", (big + 2 * pad, big + 2 * pad), 0)
    layer = Image.new("L", (big, big), 0)
    shape.draw(ImageDraw.Draw(layer), float(big))
    canvas.paste(layer, (pad, pad))
    if angle:
        canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    side = size + 2 * (pad // SUPERSAMPLE)
    mask = np.asarray(canvas.resize((side, side), Image.Resampling.BOX), dtype=np.float32) / 255.0
    rows, cols = np.nonzero(mask > 0)
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


# --------------------------------------------------------------------------- colours


@dataclass(frozen=True)
class Colour:
    name: str
    rgb: tuple[int, int, int]
    jitter: int = 18  # per-channel uniform jitter of each object's colour


COLOURS: dict[str, Colour] = {
    c.name: c
    for c in (
        Colour("red", (215, 30, 35)),
        Colour("orange", (245, 135, 20)),
        Colour("yellow", (245, 220, 30)),
        Colour("green", (40, 170, 60)),
        Colour("blue", (35, 80, 215)),
        Colour("purple", (130, 45, 175)),
        Colour("pink", (245, 130, 190)),
        Colour("white", (245, 245, 245), 8),
        Colour("black", (20, 20, 20), 8),
    )
}

# --------------------------------------------------------------------------- sizes


SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}


def size_word(extent: float, image_side: int, small_below: float, large_from: float) -> str:
    """``small``, ``large`` or ``''`` for an object of ``extent`` pixels in an image whose short
    side is ``image_side``: small below ``small_below`` of the side, large from ``large_from``."""
    frac = extent / image_side
    if frac < small_below:
        return "small"
    if frac >= large_from:
        return "large"
    return ""


# --------------------------------------------------------------------------- backgrounds


@dataclass(frozen=True)
class Background:
    name: str
    words: tuple[str, ...]  # what a caption calls it ("on a striped background")
    paint: Callable[[np.random.Generator, int, int], np.ndarray]  # -> [H, W, 3] float32 0..255


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A background colour: grey-ish (low saturation), mid luminance, so every object colour
    (white and black included) stands out."""
    base = rng.uniform(85, 175)
    tint = rng.uniform(-22, 22, size=3)
    return np.clip(base + tint, 0, 255).astype(np.float32)


def _two_muted(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = _muted(rng)
    b = np.clip(a + rng.choice([-1.0, 1.0]) * rng.uniform(22, 45), 0, 255).astype(np.float32)
    return a, b


def _plain(rng, h, w):
    return np.broadcast_to(_muted(rng), (h, w, 3)).astype(np.float32)


def _gradient(rng, h, w):
    a, b = _two_muted(rng)
    theta = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = x * math.cos(theta) + y * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]


def _noise(rng, h, w):
    base = _muted(rng)
    cell = int(rng.integers(4, 17))
    coarse = rng.normal(0, 1, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    img = Image.fromarray(coarse).resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.Resampling.BICUBIC)
    smooth = np.asarray(img, dtype=np.float32)[:h, :w]
    fine = rng.normal(0, 1, size=(h, w)).astype(np.float32)
    field = smooth * rng.uniform(10, 22) + fine * rng.uniform(3, 8)
    return np.clip(base[None, None] + field[..., None], 0, 255)


def _stripes(rng, h, w):
    a, b = _two_muted(rng)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(10, 30)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (x * math.cos(theta) + y * math.sin(theta)) / period
    on = (t - np.floor(t)) < 0.5
    return np.where(on[..., None], a[None, None], b[None, None])


def _checkerboard(rng, h, w):
    a, b = _two_muted(rng)
    cell = int(rng.integers(10, 33))
    y, x = np.mgrid[0:h, 0:w]
    on = ((x // cell + y // cell) % 2) == 0
    return np.where(on[..., None], a[None, None], b[None, None]).astype(np.float32)


def _dots(rng, h, w):
    a, b = _two_muted(rng)
    period = rng.uniform(12, 26)
    radius = period * rng.uniform(0.15, 0.3)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dy = (y % period) - period / 2
    dx = ((x + (y // period) % 2 * period / 2) % period) - period / 2
    on = dx * dx + dy * dy < radius * radius
    return np.where(on[..., None], b[None, None], a[None, None]).astype(np.float32)


def _grid(rng, h, w):
    a, b = _two_muted(rng)
    period = int(rng.integers(12, 30))
    width = int(rng.integers(1, 4))
    y, x = np.mgrid[0:h, 0:w]
    on = ((x % period) < width) | ((y % period) < width)
    return np.where(on[..., None], b[None, None], a[None, None]).astype(np.float32)


def _waves(rng, h, w):
    a, b = _two_muted(rng)
    period = rng.uniform(14, 34)
    amp = rng.uniform(4, 12)
    wave = rng.uniform(40, 90)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (y + amp * np.sin(2 * math.pi * x / wave)) / period
    mix = 0.5 + 0.5 * np.sin(2 * math.pi * t)
    return a[None, None] * (1 - mix[..., None]) + b[None, None] * mix[..., None]


BACKGROUNDS: dict[str, Background] = {
    bg.name: bg
    for bg in (
        Background("plain", ("plain",), _plain),
        Background("gradient", ("gradient", "shaded"), _gradient),
        Background("noise", ("noisy", "grainy"), _noise),
        Background("stripes", ("striped",), _stripes),
        Background("checkerboard", ("checkered", "checkerboard"), _checkerboard),
        Background("dots", ("dotted", "polka-dot"), _dots),
        Background("grid", ("grid",), _grid),
        Background("waves", ("wavy",), _waves),
    )
}
