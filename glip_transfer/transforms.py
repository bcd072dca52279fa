"""Image transforms of the reference: the test transform, batch padding and training augmentation.

The test transform reproduces maskrcnn-benchmark's ``Resize -> ToTensor -> Normalize(bgr255)``
bit for bit (see ``../shared/reference/README.md``, "Image preprocessing"):

1. resize so the short side is ``min_size`` unless that makes the long side exceed ``max_size``
   (:func:`resize_size`), with PIL's antialiased bilinear filter;
2. ``uint8 / 255`` to float32 CHW, channels reordered to BGR, ``* 255``;
3. ``(x - mean) / std`` per channel (BGR mean/std of :class:`~glip_transfer.config.InputConfig`);
4. in a batch: zero padding at the bottom/right to a multiple of ``size_divisibility``
   (:func:`pad_batch`); the unpadded ``(h, w)`` is the size used to clip boxes. Padding changes
   the features near the borders, so evaluation batches only images of equal padded size
   (:func:`padded_size`; ``glip_transfer.data.SizeGroupedBatchSampler``): results do not depend
   on the batch size.

The float operations are done in the same order as the reference (``/255`` then ``*255`` is *not*
the identity in float32), so the result is identical, not merely close.

Boxes here are ``[N, 4]`` float32 ``(x1, y1, x2, y2)`` in the reference's inclusive-pixel
convention (width ``x2 - x1 + 1``), which matters for the horizontal flip.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .config import InputConfig

TO_REMOVE = 1.0  # the reference's "+1": a flipped box maps x to W - x - 1
DEFAULT_TRAIN_MIN_SIZES: tuple[int, ...] = tuple(range(480, 801, 32))  # 480, 512, ..., 800
DEFAULT_TRAIN_MAX_SIZE = 1333


def resize_size(w: int, h: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """Output size ``(ow, oh)`` of the reference resize (``Resize.get_size``) for a ``w x h`` image.

    The short side becomes ``min_size``, reduced to ``int(round(max_size * short / long))`` when the
    long side would otherwise exceed ``max_size``; the long side is then ``int(min_size * long /
    short)`` (truncated). An image whose short side already equals the target keeps its size.
    """
    if w <= 0 or h <= 0:
        raise ValueError(f"resize_size: image size must be positive, got w={w}, h={h}")
    size = int(min_size)
    if max_size is not None:
        min_original = float(min(w, h))
        max_original = float(max(w, h))
        if max_original / min_original * size > max_size:
            size = int(round(max_size * min_original / max_original))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def resize_image(image: Image.Image, min_size: int, max_size: int | None) -> Image.Image:
    """``image`` resized with :func:`resize_size` and PIL's (antialiased) bilinear filter, as
    ``torchvision.transforms.functional.resize(pil_image, (oh, ow))`` does."""
    ow, oh = resize_size(image.width, image.height, min_size, max_size)
    return image.resize((ow, oh), Image.Resampling.BILINEAR)


def to_normalized_tensor(image: Image.Image, cfg: InputConfig) -> torch.Tensor:
    """A PIL RGB image as the network input: float32 ``[3, h, w]``, BGR, ``*255``, normalised.

    Same float operations and order as the reference (``to_tensor`` -> ``[2, 1, 0]`` -> ``* 255``
    -> ``sub(mean).div(std)``).
    """
    if image.mode != "RGB":
        raise ValueError(
            f"to_normalized_tensor: expected an RGB image, got mode {image.mode!r}; load it with "
            "glip_transfer.data.load_image"
        )
    array = np.asarray(image, dtype=np.uint8)  # [h, w, 3]
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    x = x[[2, 1, 0]] * 255
    mean = torch.as_tensor(cfg.pixel_mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(cfg.pixel_std, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)


def test_transform(pil_image: Image.Image, cfg: InputConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """The reference test transform of one PIL RGB image.

    Returns the normalised BGR*255 float32 tensor ``[3, h, w]`` and its resized size ``(h, w)``
    (``min_size`` / ``max_size`` from ``cfg``; no padding, see :func:`pad_batch`).
    """
    resized = resize_image(pil_image, cfg.min_size, cfg.max_size)
    return to_normalized_tensor(resized, cfg), (resized.height, resized.width)


test_transform.__test__ = False  # not a pytest test despite the name


def padded_size(h: int, w: int, size_divisibility: int = 32) -> tuple[int, int]:
    """``(h, w)`` rounded up to multiples of ``size_divisibility`` (unchanged when it is 0): the
    input size of an image in a batch of its own."""
    if size_divisibility > 0:
        h = -(-h // size_divisibility) * size_divisibility
        w = -(-w // size_divisibility) * size_divisibility
    return h, w


def pad_batch(
    images: Sequence[torch.Tensor], size_divisibility: int = 32
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack ``[3, h_i, w_i]`` images into one zero-padded batch ``[B, 3, H, W]``.

    ``H``/``W`` are the largest ``h_i``/``w_i`` rounded up to a multiple of ``size_divisibility``
    (no rounding when it is 0); each image sits at the top-left, padding (value 0.0, i.e. after
    normalisation) is at the bottom/right. Also returns the unpadded sizes ``[(h_i, w_i)]``.
    """
    if len(images) == 0:
        raise ValueError("pad_batch: got no images; pass at least one [3, h, w] tensor")
    channels = images[0].shape[0]
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != channels:
            raise ValueError(
                f"pad_batch: image {i} has shape {tuple(img.shape)}; every image must be [{channels}, h, w]"
            )
    max_h, max_w = padded_size(
        max(int(img.shape[1]) for img in images), max(int(img.shape[2]) for img in images), size_divisibility
    )
    batch = images[0].new_zeros((len(images), channels, max_h, max_w))
    sizes = []
    for i, img in enumerate(images):
        h, w = int(img.shape[1]), int(img.shape[2])
        batch[i, :, :h, :w].copy_(img)
        sizes.append((h, w))
    return batch, sizes


# --------------------------------------------------------------------------- training augmentation


def resize_boxes(boxes: torch.Tensor, from_wh: tuple[int, int], to_wh: tuple[int, int]) -> torch.Tensor:
    """Scale xyxy ``boxes`` ``[N, 4]`` from an image of size ``from_wh`` to ``to_wh`` (``BoxList.resize``:
    x by ``ow / w``, y by ``oh / h``, no +1 terms)."""
    sx = float(to_wh[0]) / float(from_wh[0])
    sy = float(to_wh[1]) / float(from_wh[1])
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror xyxy ``boxes`` ``[N, 4]`` in an image ``width`` pixels wide, as ``BoxList.transpose(0)``:
    ``x1' = W - x2 - 1``, ``x2' = W - x1 - 1`` (inclusive pixel indices)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((width - x2 - TO_REMOVE, y1, width - x1 - TO_REMOVE, y2), dim=-1)


class Augmented(NamedTuple):
    """Output of :class:`TrainTransform`."""

    image: torch.Tensor  # [3, h, w] normalised BGR*255 float32
    boxes: torch.Tensor  # [N, 4] xyxy in the resized (and possibly flipped) image
    size: tuple[int, int]  # resized (h, w), unpadded
    flipped: bool


@dataclass
class TrainTransform:
    """The reference training transform: multi-scale resize, random horizontal flip, normalise.

    For each sample the short side is drawn uniformly from ``min_sizes`` (long side capped at
    ``max_size``, :func:`resize_size`), then the image and its boxes are flipped left-right with
    probability ``flip_prob``. Randomness comes from ``rng`` (a :class:`random.Random`): pass one
    per call for reproducible data loading across workers (the training dataset derives one from
    ``(seed, epoch, index)``); without it the transform's own ``rng`` is used, seeded by ``seed``.
    """

    cfg: InputConfig
    min_sizes: Sequence[int] = DEFAULT_TRAIN_MIN_SIZES
    max_size: int | None = DEFAULT_TRAIN_MAX_SIZE
    flip_prob: float = 0.5
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.min_sizes, int):
            self.min_sizes = (self.min_sizes,)
        self.min_sizes = tuple(int(s) for s in self.min_sizes)
        if not self.min_sizes or min(self.min_sizes) <= 0:
            raise ValueError(f"TrainTransform: min_sizes must be positive sizes, got {self.min_sizes}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"TrainTransform: flip_prob must be in [0, 1], got {self.flip_prob}")
        self.rng = random.Random(self.seed)

    def __call__(self, image: Image.Image, boxes: torch.Tensor, rng: random.Random | None = None) -> Augmented:
        """Augment a PIL RGB ``image`` and its xyxy ``boxes`` ``[N, 4]`` (original image coordinates)."""
        rng = self.rng if rng is None else rng
        min_size = rng.choice(self.min_sizes)
        w, h = image.size
        ow, oh = resize_size(w, h, min_size, self.max_size)
        image = image.resize((ow, oh), Image.Resampling.BILINEAR)
        boxes = resize_boxes(boxes.to(torch.float32).reshape(-1, 4), (w, h), (ow, oh))
        flipped = rng.random() < self.flip_prob
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = hflip_boxes(boxes, ow)
        return Augmented(to_normalized_tensor(image, self.cfg), boxes, (oh, ow), flipped)
