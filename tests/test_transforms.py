"""The reference test transform (exact parity), batch padding and training augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from glip_transfer.config import InputConfig
from glip_transfer.transforms import (
    TrainTransform,
    hflip_boxes,
    pad_batch,
    resize_boxes,
    resize_size,
    test_transform,
)


@pytest.mark.parametrize(
    "w, h, min_size, max_size, expected",
    [
        (512, 512, 500, 800, (500, 500)),
        (640, 480, 800, 1333, (1066, 800)),  # long side truncated: int(800 * 640 / 480) = int(1066.67)
        (480, 640, 800, 1333, (800, 1066)),
        (2000, 500, 800, 1333, (1332, 333)),  # capped: int(round(1333 * 500 / 2000)) = 333
        (400, 100, 800, 1330, (1328, 332)),  # round(332.5) = 332 (Python rounds half to even)
        (800, 1000, 800, 1333, (800, 1000)),  # short side already the target: unchanged
        (333, 500, 400, None, (400, 600)),  # no cap; int(600.6) = 600
        (1, 1, 800, 1333, (800, 800)),
    ],
)
def test_resize_size(w, h, min_size, max_size, expected):
    assert resize_size(w, h, min_size, max_size) == expected


def test_astronaut_parity_exact(reference_dir):
    from safetensors.torch import load_file

    expected = load_file(str(reference_dir / "glip_tiny_astronaut.safetensors"))["image.input"]
    with Image.open(reference_dir / "astronaut.png") as f:
        image = f.convert("RGB")
    tensor, size = test_transform(image, InputConfig(min_size=500, max_size=800))
    assert size == (500, 500) and tensor.shape == (3, 500, 500) and tensor.dtype == torch.float32
    batch, sizes = pad_batch([tensor], 32)
    assert sizes == [(500, 500)]
    assert batch.shape == expected.shape == (1, 3, 512, 512)
    assert (batch - expected).abs().max().item() == 0.0
    assert torch.equal(batch, expected)


def test_matches_torchvision_pipeline_on_non_square_image():
    """Same numbers as the reference's torchvision ops (resize -> to_tensor -> BGR*255 -> normalize)."""
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (75, 130, 3), dtype=np.uint8))
    cfg = InputConfig(min_size=64, max_size=100)
    tensor, (h, w) = test_transform(image, cfg)
    ow, oh = resize_size(130, 75, 64, 100)
    assert (h, w) == (oh, ow)
    ref = F.to_tensor(F.resize(image, [oh, ow]))[[2, 1, 0]] * 255
    ref = F.normalize(ref, mean=list(cfg.pixel_mean), std=list(cfg.pixel_std))
    assert torch.equal(tensor, ref)


def test_pad_batch_shapes_and_zero_padding():
    a = torch.ones(3, 20, 50)
    b = torch.full((3, 33, 10), 2.0)
    batch, sizes = pad_batch([a, b], 32)
    assert batch.shape == (2, 3, 64, 64)
    assert sizes == [(20, 50), (33, 10)]
    assert (
        torch.equal(batch[0, :, :20, :50], a)
        and batch[0, :, 20:].abs().sum() == 0
        and batch[0, :, :, 50:].abs().sum() == 0
    )
    assert (
        torch.equal(batch[1, :, :33, :10], b)
        and batch[1, :, 33:].abs().sum() == 0
        and batch[1, :, :, 10:].abs().sum() == 0
    )
    assert pad_batch([a], 0)[0].shape == (1, 3, 20, 50)
    with pytest.raises(ValueError, match="no images"):
        pad_batch([])
    with pytest.raises(ValueError, match="image 1"):
        pad_batch([a, torch.ones(1, 4, 4)])


def test_box_resize_and_flip_conventions():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert torch.equal(hflip_boxes(boxes, 100), torch.tensor([[69.0, 20.0, 89.0, 40.0]]))  # x' = W - x - 1
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 100), 100), boxes)
    assert torch.equal(resize_boxes(boxes, (100, 50), (200, 25)), torch.tensor([[20.0, 10.0, 60.0, 20.0]]))


def test_train_transform_flip_matches_pixels():
    """A box on inclusive pixel indices still covers the same (flipped) pixels."""
    array = np.zeros((48, 64, 3), dtype=np.uint8)
    array[5:15, 10:20] = 255  # pixels x 10..19, y 5..14
    box = torch.tensor([[10.0, 5.0, 19.0, 14.0]])
    transform = TrainTransform(InputConfig(), min_sizes=(48,), max_size=None, flip_prob=1.0)
    out = transform(Image.fromarray(array), box)
    assert out.flipped and out.size == (48, 64)
    x1, y1, x2, y2 = out.boxes[0].tolist()
    white = (out.image[0] > 0).nonzero()
    assert (white[:, 1].min().item(), white[:, 1].max().item()) == (x1, x2) == (44, 53)
    assert (white[:, 0].min().item(), white[:, 0].max().item()) == (y1, y2) == (5, 14)


def test_train_transform_is_seedable_and_multiscale():
    image = Image.fromarray(np.zeros((60, 80, 3), dtype=np.uint8))
    boxes = torch.tensor([[0.0, 0.0, 39.0, 29.0]])
    sizes = (30, 45, 60)

    def run(seed):
        t = TrainTransform(InputConfig(), min_sizes=sizes, max_size=1000, flip_prob=0.5, seed=seed)
        return [t(image, boxes) for _ in range(8)]

    a, b = run(3), run(3)
    assert [(o.size, o.flipped, o.boxes.tolist()) for o in a] == [(o.size, o.flipped, o.boxes.tolist()) for o in b]
    assert {o.size[0] for o in a} <= set(sizes)
    for o in a:
        scale = o.size[0] / 60
        expected = torch.tensor([[0.0, 0.0, 39.0 * scale, 29.0 * scale]])
        if o.flipped:
            expected = hflip_boxes(expected, o.size[1])
        assert torch.allclose(o.boxes, expected)
        assert o.image.shape == (3, *o.size)
    # an explicit rng overrides the transform's own stream
    t = TrainTransform(InputConfig(), min_sizes=sizes, flip_prob=0.5)
    assert t(image, boxes, rng=random.Random(7)).size == t(image, boxes, rng=random.Random(7)).size
