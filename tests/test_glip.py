"""The assembled model: ``GLIP.detect`` drops caption padding without changing the detections."""

from __future__ import annotations

import pytest
import torch

from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip
from glip_transfer.model.postprocess import postprocess
from glip_transfer.reference import apply_deterministic_weights


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = variant_config("test-tiny")
    m = build_glip(cfg)
    apply_deterministic_weights(m, cfg.head.num_convs)
    with torch.no_grad():  # break the deterministic weights' symmetry so scores differ
        for p in m.rpn.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _prompt(real: int, max_len: int = 256):
    ids = torch.zeros(1, max_len, dtype=torch.int64)
    ids[0, :real] = torch.tensor([101] + list(range(2000, 2000 + real - 2)) + [102])
    return ids, (ids != 0).long()


def _head_text_lengths(model):
    seen = []
    hook = model.rpn.head.register_forward_hook(lambda mod, args, out: seen.append(args[1].hidden.shape[1]))
    return seen, hook


def test_detect_drops_padding_and_keeps_the_detections(model):
    ids, mask = _prompt(real=7)
    pmap = torch.zeros(3, 256)
    pmap[0, [1, 2]] = 1
    pmap[1, 3] = 1
    pmap[2, 5] = 1
    images = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    sizes = [(128, 160), (120, 150)]
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        outputs, anchors = model(images, text)  # all 256 positions, as the reference runs
        padded = postprocess(outputs, anchors, pmap, sizes, model.cfg.postprocess)
    seen, hook = _head_text_lengths(model)
    try:
        trimmed = model.detect(images, sizes, text, pmap)
    finally:
        hook.remove()
    assert seen == [7]
    for a, b in zip(trimmed, padded):
        assert len(a.scores) == len(b.scores) > 10
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-3)


def test_detect_keeps_positions_a_phrase_maps_to(model):
    ids, mask = _prompt(real=5)
    pmap = torch.zeros(2, 256)
    pmap[0, 1] = 1
    pmap[1, 9] = 1  # beyond the caption: kept, whatever the model makes of it
    seen, hook = _head_text_lengths(model)
    try:
        with torch.no_grad():
            model.detect(torch.randn(1, 3, 96, 96), [(96, 96)], model.encode_text(ids, mask), pmap)
    finally:
        hook.remove()
    assert seen == [10]
