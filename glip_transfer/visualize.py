"""Annotated images: boxes with a label and score, readable on any background."""

from __future__ import annotations

import colorsys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .files import write_file


def label_color(index: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per label (golden-ratio hue steps)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def draw_detections(image: Image.Image, detections: list[dict], label_names: list[str] | None = None) -> Image.Image:
    """A copy of ``image`` with ``detections`` (dicts with ``box`` [x1, y1, x2, y2], ``score``,
    ``label``) drawn: a dark halo under each coloured box, and a filled label tag."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    line = max(2, round(min(w, h) / 300))
    font = _font(max(12, round(min(w, h) / 40)))
    names = sorted({d["label"] for d in detections}) if label_names is None else label_names
    # lowest score first so the best boxes end up on top
    for det in sorted(detections, key=lambda d: d["score"]):
        x1, y1, x2, y2 = det["box"]
        color = label_color(names.index(det["label"]) if det["label"] in names else 0)
        draw.rectangle((x1, y1, x2, y2), outline=(0, 0, 0), width=line + 2)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(2, line)
        ty = y1 - th - 2 * pad if y1 - th - 2 * pad >= 0 else y1  # above the box, or inside at the top
        tx = min(max(0, x1), max(0, w - tw - 2 * pad))
        draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad), fill=color)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_color(color), font=font)
    return canvas


def save_png(image: Image.Image, path: str | Path) -> None:
    write_file(path, lambda tmp: image.save(tmp, format="PNG"))
