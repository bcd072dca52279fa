"""Batched inference shared by ``glip predict``, ``glip zeroshot eval`` and evaluation during
training: prompts are encoded by BERT once per chunk and reused for every image; for a prompt split
into chunks the image backbone runs once per batch and the fused head once per chunk, and the
detections are merged per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .evaluation import detections_to_coco
from .model.glip import GLIP
from .model.language import TextFeatures
from .model.postprocess import Detections, merge_chunk_detections
from .prompts import PromptChunk, tokenize
from .runtime import autocast
from .transforms import padded_size


@dataclass
class EncodedPrompt:
    """A prompt ready for the model: its chunks (:class:`glip_transfer.prompts.PromptChunk`), their
    token ids ``[1, T]`` and masks, and the BERT features of each (computed once, then cached).

    ``label_ids`` lists, over all chunks in order, what each phrase stands for (a dataset category
    id, or for free-text prompts the phrase's 1-based position); ``names`` their display names.
    """

    chunks: list[PromptChunk]
    input_ids: list[torch.Tensor]
    attention_masks: list[torch.Tensor]
    _features: dict[tuple[int, str], TextFeatures] = field(default_factory=dict, repr=False)

    @classmethod
    def from_chunks(cls, tokenizer, chunks: Iterable[PromptChunk], max_len: int) -> "EncodedPrompt":
        chunks = list(chunks)
        encoded = [tokenize(tokenizer, chunk.text, max_len) for chunk in chunks]
        return cls(chunks, [e["input_ids"] for e in encoded], [e["attention_mask"] for e in encoded])

    @property
    def label_ids(self) -> list[Any]:
        return [cid for chunk in self.chunks for cid in chunk.category_ids]

    @property
    def names(self) -> list[str]:
        return [name for chunk in self.chunks for name in chunk.names]

    @property
    def captions(self) -> list[str]:
        return [chunk.text for chunk in self.chunks]

    @torch.no_grad()
    def features(self, model: GLIP, index: int, device: torch.device) -> TextFeatures:
        key = (index, str(device))
        if key not in self._features:
            self._features[key] = model.encode_text(
                self.input_ids[index].to(device), self.attention_masks[index].to(device)
            )
        return self._features[key]

    def clear_cache(self) -> None:
        """Forget the cached text features (after the language backbone changed, e.g. in training)."""
        self._features.clear()


@torch.no_grad()
def detect_batch(
    model: GLIP,
    images: torch.Tensor,
    image_sizes: list[tuple[int, int]],
    prompt: EncodedPrompt,
    cache_text: bool = True,
    amp: bool = False,
) -> list[Detections]:
    """Detections per image (resized-image coordinates) with labels ``1..len(prompt.label_ids)``
    indexing :attr:`EncodedPrompt.label_ids` across chunks. The per-image limit applies after the
    chunks are merged. ``amp``: CUDA autocast (bf16 where supported, else fp16).

    Each image is run at its own padded size (its size rounded up to ``size_divisibility``, as in
    a batch of one): images of other sizes in ``images`` go in separate sub-batches, so an image's
    detections do not depend on the batch it came in (padding changes the features near the
    borders). Loaders that batch by size (:class:`glip_transfer.data.SizeGroupedBatchSampler`)
    make this one sub-batch."""
    device = images.device
    with autocast(device, amp):
        groups = split_by_padded_size(images, image_sizes, model.cfg.input.size_divisibility)
        if len(groups) == 1:
            return _detect_batch(model, groups[0][1], image_sizes, prompt, cache_text)
        out: list[Detections | None] = [None] * len(image_sizes)
        for indices, sub in groups:
            dets = _detect_batch(model, sub, [image_sizes[i] for i in indices], prompt, cache_text)
            for i, d in zip(indices, dets):
                out[i] = d
        return out


def split_by_padded_size(
    images: torch.Tensor, image_sizes: list[tuple[int, int]], size_divisibility: int
) -> list[tuple[list[int], torch.Tensor]]:
    """``images [B, 3, H, W]`` (zero-padded at the bottom/right) as sub-batches of the images that
    share a padded size: ``[(indices, images [b, 3, h, w])]``, each at exactly that size, in order
    of first appearance (``images`` itself when it already is one such batch)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(image_sizes):
        groups.setdefault(padded_size(h, w, size_divisibility), []).append(i)
    if len(groups) == 1 and next(iter(groups)) == tuple(images.shape[-2:]):
        return [(list(range(len(image_sizes))), images)]
    out = []
    for (h, w), indices in groups.items():
        sub = images.new_zeros((len(indices), images.shape[1], h, w))
        ch, cw = min(h, images.shape[-2]), min(w, images.shape[-1])
        sub[:, :, :ch, :cw] = images[indices, :, :ch, :cw]
        out.append((indices, sub))
    return out


def _detect_batch(model, images, image_sizes, prompt, cache_text) -> list[Detections]:
    device = images.device
    # the image side (Swin + FPN) once per batch; only the fused head and the decoding run per chunk
    features = model.forward_features(images) if len(prompt.chunks) > 1 else None
    per_chunk = []
    first_label = 0
    for index, chunk in enumerate(prompt.chunks):
        if cache_text:
            text = prompt.features(model, index, device)
        else:
            text = model.encode_text(prompt.input_ids[index].to(device), prompt.attention_masks[index].to(device))
        dets = model.detect(images, image_sizes, text, chunk.positive_map.to(device), features)
        for d in dets:
            d.labels = d.labels + first_label
        per_chunk.append(dets)
        first_label += len(chunk.category_ids)
    if len(per_chunk) == 1:
        return per_chunk[0]
    limit = model.cfg.postprocess.detections_per_img
    return [merge_chunk_detections([chunk[i] for chunk in per_chunk], limit) for i in range(len(image_sizes))]


def to_original_size(dets: Detections, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> Detections:
    """Boxes from the resized image back to the original image's pixels, as the reference does."""
    return dets.rescale(resized_hw, original_hw)


def evaluate_dataset(
    model: GLIP,
    loader: Iterable,
    prompt: EncodedPrompt,
    *,
    device: torch.device,
    cache_text: bool = True,
    on_batch: Callable[[list, list[dict]], None] | None = None,
    skip_image_ids: set | None = None,
    progress: Callable[[int], None] | None = None,
    amp: bool = False,
) -> list[dict]:
    """COCO detection results (``image_id``, ``category_id``, ``bbox`` xywh with the +1 convention,
    ``score``) for every image of ``loader`` (batches of ``(images, image_sizes, infos)`` as
    :func:`glip_transfer.data.collate_detection` makes). Labels map to ``prompt.label_ids``, which
    must be the dataset's category ids. ``on_batch`` receives each batch's results as soon as they
    exist, with the batch's image ids (for incremental writing); images in ``skip_image_ids`` are
    not run. Results come in dataset order (the ``"index"`` of each info, else the order of
    arrival), whatever order the loader's batches had. ``progress`` receives the number of
    images run in each batch (those skipped are not counted again)."""
    label_to_category = {i + 1: cid for i, cid in enumerate(prompt.label_ids)}
    per_image: dict[int, list[dict]] = {}
    model.eval()
    for images, image_sizes, infos in loader:
        keep = [i for i, info in enumerate(infos) if not skip_image_ids or info["image_id"] not in skip_image_ids]
        if keep:
            if len(keep) < len(infos):
                images = images[keep]
                image_sizes = [image_sizes[i] for i in keep]
                infos = [infos[i] for i in keep]
            dets = detect_batch(model, images.to(device, non_blocking=True), image_sizes, prompt, cache_text, amp)
            batch_results = []
            for d, info in zip(dets, infos):
                d = to_original_size(d.to("cpu"), info["resized_size"], info["original_size"])
                image_results = detections_to_coco(info["image_id"], d.boxes, d.scores, d.labels, label_to_category)
                per_image[info.get("index", len(per_image))] = image_results
                batch_results.extend(image_results)
            if on_batch is not None:
                on_batch([info["image_id"] for info in infos], batch_results)
            if progress is not None:
                progress(len(infos))
    return [r for index in sorted(per_image) for r in per_image[index]]
