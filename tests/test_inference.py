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


# --------------------------------------------------------------------------- batch-size independence

SIZES = [(96, 128), (128, 96), (100, 150), (96, 128), (64, 64), (128, 96), (97, 129), (96, 128), (150, 100)]  # (h, w)


def mixed_size_dataset(root):
    """COCO files of photos-like noise images of several sizes and aspect ratios (one category)."""
    import json

    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(SIZES):
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        pixels[h // 4 : h // 2, w // 4 : w // 2] = (220, 20, 20)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": 50 + i, "file_name": f"{i}.png", "width": w, "height": h})
    anns = [{"id": 1, "image_id": 50, "category_id": 3, "bbox": [32, 24, 32, 24]}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 3, "name": "red square"}, {"id": 4, "name": "blue circle"}]}))
    return root / "ann.json", root / "images"


def by_image(results):
    out = {}
    for r in results:
        out.setdefault(r["image_id"], []).append(r)
    return out


def assert_same_results(a, b, score_tol=1e-4, box_tol=1e-2):
    """Equal COCO results up to float noise: same images in the same order, per image the same
    detections (paired by category and box; near-equal scores may swap places)."""
    from glip_transfer.model.postprocess import Detections, match_detections

    assert [r["image_id"] for r in a] == [r["image_id"] for r in b] or sorted(r["image_id"] for r in a) == sorted(r["image_id"] for r in b)
    assert list(dict.fromkeys(r["image_id"] for r in a)) == list(dict.fromkeys(r["image_id"] for r in b))
    ga, gb = by_image(a), by_image(b)
    assert ga.keys() == gb.keys()

    def dets(rs):
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rs)]).reshape(-1, 4)
        return Detections(boxes, torch.tensor([r["score"] for r in rs]), torch.tensor([r["category_id"] for r in rs]), torch.zeros(len(rs)))

    for image_id in ga:
        m = match_detections(dets(ga[image_id]), dets(gb[image_id]), iou_threshold=0.999, score_tol=score_tol)
        assert m["matched"] == m["a"] == m["b"], (image_id, m)
        assert m["max_box_diff"] <= box_tol, (image_id, m)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer):
    from glip_transfer.config import InputConfig
    from glip_transfer.data import DetectionDataset

    ann, images = mixed_size_dataset(tmp_path_factory.mktemp("mixed"))
    dataset = DetectionDataset(ann, images, InputConfig(min_size=96, max_size=160))
    prompt = build_detection_prompt(tokenizer, [(3, "red square"), (4, "blue circle")], warn=False)
    return dataset, EncodedPrompt.from_chunks(tokenizer, prompt.chunks, 256)


def test_padded_sizes_are_mixed(mixed):
    dataset, _ = mixed
    sizes = dataset.padded_sizes()
    assert len(set(sizes)) == 5 and sizes.count((96, 128)) == 4
    for i in range(len(dataset)):  # the prediction from the annotation file is the real size
        image, info = dataset[i]
        assert sizes[i] == tuple(-(-s // 32) * 32 for s in image.shape[-2:])


@pytest.mark.parametrize("batch_size", [2, 4, 9])
def test_evaluation_independent_of_batch_size(model, mixed, batch_size):
    """zero-shot eval and validation during fine-tuning (training/evaluate.py) share this path."""
    from glip_transfer.data import make_loader
    from glip_transfer.inference import evaluate_dataset
    from glip_transfer.training.evaluate import evaluate

    dataset, prompt = mixed
    run = lambda bs: evaluate_dataset(model, make_loader(dataset, batch_size=bs), prompt, device=torch.device("cpu"))  # noqa: E731
    one, many = run(1), run(batch_size)
    assert len(one) > 0
    assert list(dict.fromkeys(r["image_id"] for r in one)) == [e[0] for e in dataset.entries]  # dataset order
    assert_same_results(one, many)
    results, metrics = evaluate(model, dataset, prompt, batch_size=batch_size, device=torch.device("cpu"))
    assert_same_results(one, results)


def test_detect_batch_of_mixed_sizes_equals_batch_one(model, mixed):
    """A batch padded to its largest image (as glip predict makes it) gives each image's batch-1
    detections: images of other padded sizes run separately, at their own size."""
    from glip_transfer.model.postprocess import match_detections
    from glip_transfer.transforms import pad_batch

    dataset, prompt = mixed
    items = [dataset[i] for i in range(len(dataset))]
    batch, sizes = pad_batch([im for im, _ in items], 32)
    together = detect_batch(model, batch, sizes, prompt)
    for (image, _), dets in zip(items, together):
        alone = detect_batch(model, *pad_batch([image], 32), prompt)[0]
        m = match_detections(alone, dets, score_tol=1e-4)
        assert len(alone) > 0 and m["matched"] == m["a"] == m["b"]


def test_split_by_padded_size_rebuilds_each_images_own_input():
    from glip_transfer.inference import split_by_padded_size
    from glip_transfer.transforms import pad_batch

    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in ((40, 60), (64, 30), (33, 64), (64, 64))]
    batch, sizes = pad_batch(images, 32)  # [4, 3, 64, 64]; alone: 64x64, 64x32, 64x64, 64x64
    groups = split_by_padded_size(batch, sizes, 32)
    assert [indices for indices, _ in groups] == [[0, 2, 3], [1]]  # in order of first appearance
    assert [tuple(sub.shape) for _, sub in groups] == [(3, 3, 64, 64), (1, 3, 64, 32)]
    for indices, sub in groups:
        for j, i in enumerate(indices):
            alone, _ = pad_batch([images[i]], 32)
            assert torch.equal(sub[j : j + 1], alone)
    same, _ = pad_batch([images[0], images[2]], 32)
    [(indices, sub)] = split_by_padded_size(same, [sizes[0], sizes[2]], 32)
    assert indices == [0, 1] and sub is same  # already one padded size: no copy


def test_validation_metrics_leave_out_missing_images_and_say_so(model, tokenizer, tmp_path):
    """Validation / test in training (training/evaluate.py) evaluates exactly the images it ran."""
    from glip_transfer.config import InputConfig
    from glip_transfer.data import DetectionDataset
    from glip_transfer.training.evaluate import evaluate

    ann, images = mixed_size_dataset(tmp_path / "m")
    (images / "0.png").unlink()
    with pytest.warns(UserWarning, match="1 of 9 images"):
        dataset = DetectionDataset(ann, images, InputConfig(min_size=96, max_size=160))
    prompt = build_detection_prompt(tokenizer, [(3, "red square"), (4, "blue circle")], warn=False)
    encoded = EncodedPrompt.from_chunks(tokenizer, prompt.chunks, 256)
    _, metrics = evaluate(model, dataset, encoded, batch_size=2, device=torch.device("cpu"))
    assert metrics["num_images"] == 8
    assert metrics["num_skipped_images"] == 1 and metrics["skipped_images"] == ["0.png"]


def test_progress_counts_only_the_images_run(model, mixed):
    """Resuming: images already done are not run and not counted again (the bar showed 84/60)."""
    from glip_transfer.data import make_loader
    from glip_transfer.inference import evaluate_dataset

    dataset, prompt = mixed
    done = {e[0] for e in dataset.entries[:4]}
    counted = []
    results = evaluate_dataset(
        model,
        make_loader(dataset, batch_size=3),
        prompt,
        device=torch.device("cpu"),
        skip_image_ids=done,
        progress=counted.append,
    )
    assert sum(counted) == len(dataset) - len(done)
    assert {r["image_id"] for r in results}.isdisjoint(done)
