"""The shared inference core: chunked prompts (image work shared across chunks) and batches of
mixed image sizes (results independent of the batch size)."""

from __future__ import annotations

import pytest
import torch

from glip_transfer.config import variant_config
from glip_transfer.inference import EncodedPrompt, detect_batch
from glip_transfer.model.glip import build_glip
from glip_transfer.model.postprocess import merge_chunk_detections
from glip_transfer.prompts import build_detection_prompt

NAMES = ["red square", "blue circle", "cat", "dog", "traffic light", "teddy bear", "zebra", "kite", "toothbrush", "oven"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_glip(variant_config("test-tiny"))
    with torch.no_grad():
        m.rpn.head.bias0.fill_(2.0)  # scores above the candidate threshold: non-empty detections
    return m.eval()


def chunked_prompt(tokenizer, max_len: int = 10) -> EncodedPrompt:
    prompt = build_detection_prompt(tokenizer, list(enumerate(NAMES, start=1)), max_len=max_len, warn=False)
    return EncodedPrompt.from_chunks(tokenizer, prompt.chunks, max_len)


def per_chunk_full_model(model, images, sizes, prompt):
    """What inference did before the image work was shared: the whole model once per chunk."""
    per_chunk, first = [], 0
    for index, chunk in enumerate(prompt.chunks):
        text = prompt.features(model, index, images.device)
        dets = model.detect(images, sizes, text, chunk.positive_map)
        for d in dets:
            d.labels = d.labels + first
        per_chunk.append(dets)
        first += len(chunk.category_ids)
    limit = model.cfg.postprocess.detections_per_img
    return [merge_chunk_detections([c[i] for c in per_chunk], limit) for i in range(len(sizes))]


def test_chunks_share_the_backbone_and_give_identical_detections(model, tokenizer):
    prompt = chunked_prompt(tokenizer)
    assert len(prompt.chunks) >= 3
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    sizes = [(96, 128), (96, 128)]
    calls = []
    hook = model.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        shared = detect_batch(model, images, sizes, prompt)
    finally:
        hook.remove()
    assert len(calls) == 1  # the image side once for all chunks
    before = per_chunk_full_model(model, images, sizes, prompt)
    for a, b in zip(shared, before):
        assert len(a) > 0
        assert torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores) and torch.equal(a.boxes, b.boxes)
    assert {int(label) for d in shared for label in d.labels} - {0} <= set(range(1, len(NAMES) + 1))
