"""Training data as grounding: images, boxes and, per box, the tokens of its phrase.

* :class:`DetectionGroundingDataset` — a detection dataset under ONE fixed prompt (official ODinW
  fine-tuning: ``convert_od_to_grounding_simple`` with ``DISABLE_SHUFFLE``, every category in the
  caption, sorted by id): each box gets the positive-map row of its category.
* :class:`CaptionGroundingDataset` — grounding data (MDETR / GoldG layout: a COCO JSON whose images
  carry a ``caption`` and whose boxes carry ``tokens_positive`` character spans).
* :class:`DetectionPretrainDataset` — detection data as grounding for pretraining (official
  ``convert_object_detection_to_grounding_optimized_for_od``): per image a caption of its positive
  categories and randomly sampled negative ones in shuffled order, kept within the token budget.

Augmentation (:class:`glip_transfer.transforms.TrainTransform`) and the caption sampling draw from
``random.Random(f"{seed}:{epoch}:{index}")``: reproducible, independent of the number of loader
workers and processes. ``copies`` repeats the data ``copies`` times per epoch (official
``DATASETS.GENERAL_COPY``); every copy has its own random draw.

Few-shot subsets: :func:`few_shot_image_ids` (the official greedy rule).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import MAX_QUERY_LEN
from ..data import CocoData, DataError, TrainingDataset, _load_for_dataset, clip_and_filter, coco_boxes_to_xyxy
from ..model.loss import GroundingTarget
from ..prompts import SEPARATOR, PromptChunk, clean_name, span_to_tokens, tokenize
from ..transforms import TrainTransform, pad_batch

# --------------------------------------------------------------------------- few-shot subsets


def has_valid_annotation(anns: Sequence[dict]) -> bool:
    """Official ``has_valid_annotation``: some annotation, and not every box 1 px wide or high or less."""
    if not anns:
        return False
    return not all(any(o <= 1 for o in a["bbox"][2:]) for a in anns)


def _sort_key(value: Any):
    return (type(value).__name__, value)


def few_shot_image_ids(coco: CocoData, shots: int, seed: int) -> list:
    """The images of a ``shots``-shot subset, as the official ``COCODataset`` draws it
    (``DATASETS.FEW_SHOT`` with ``DATASETS.SHUFFLE_SEED``): image ids sorted, images without a
    valid annotation dropped, the list shuffled with ``random.Random(seed)`` (not shuffled for
    seed 0), then greedily: an image is taken when any of its categories still has fewer than
    ``shots`` images, and every category it contains counts it (so some categories get more
    than ``shots``). Categories are counted over all of an image's annotations (crowd ones too)."""
    if shots < 1:
        raise ValueError(f"few-shot subsets need shots >= 1, got {shots}")
    by_image = coco.annotations_by_image
    ids = [i for i in sorted(coco.images, key=_sort_key) if has_valid_annotation(by_image.get(i, []))]
    if seed:
        random.Random(seed).shuffle(ids)
    need = {cid: shots for cid in coco.categories}
    chosen = []
    for image_id in ids:
        cats = {a["category_id"] for a in by_image[image_id]}
        if any(need.get(c, 0) > 0 for c in cats):
            chosen.append(image_id)
            for c in cats:
                if c in need:
                    need[c] -= 1
    return chosen


# --------------------------------------------------------------------------- the fixed prompt


@dataclass
class FixedPrompt:
    """The one caption of a fine-tuning run: its text, token ids ``[1, 256]`` (padded, as the
    evaluation tokenises), attention mask, the positive map ``[L, 256]`` (row = label) and the
    category id of each row."""

    caption: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positive_map: torch.Tensor
    category_ids: list

    @property
    def length(self) -> int:
        """Real tokens (special tokens included)."""
        return int(self.attention_mask.sum())


def fixed_prompt(tokenizer, chunk: PromptChunk, max_len: int = MAX_QUERY_LEN) -> FixedPrompt:
    """The :class:`FixedPrompt` of a :class:`glip_transfer.prompts.PromptChunk` (the caption and
    positive map of ``glip_transfer.prompts.build_detection_prompt``, official semantics)."""
    enc = tokenize(tokenizer, chunk.text, max_len)
    return FixedPrompt(
        chunk.text, enc["input_ids"], enc["attention_mask"], chunk.positive_map.clone(), list(chunk.category_ids)
    )


# --------------------------------------------------------------------------- datasets


class AugmentedCoco(TrainingDataset):
    """A :class:`TrainingDataset` repeated ``copies`` times whose item ``i`` draws from
    ``random.Random(f"{seed}:{epoch}:{i}")`` (each copy differently)."""

    def __init__(
        self,
        coco,
        image_root,
        transform: TrainTransform,
        *,
        seed: int = 0,
        image_ids=None,
        copies: int = 1,
        exif="auto",
    ):
        super().__init__(coco, image_root, transform, seed=seed, image_ids=image_ids, exif=exif)
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.copies = copies

    def __len__(self) -> int:
        return len(self.entries) * self.copies

    @property
    def num_images(self) -> int:
        return len(self.entries)

    def rng(self, index: int, what: str = "") -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{index}{what}")

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, list[dict], dict]:
        """(image ``[3, h, w]``, boxes ``[N, 4]`` in it, the kept annotations, info) of item ``index``."""
        image_id, path, json_wh = self.entries[index % len(self.entries)]
        pil = _load_for_dataset(path, json_wh, self.exif)
        anns = self.annotations[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes, keep = clip_and_filter(coco_boxes_to_xyxy(boxes), pil.width, pil.height)
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        out = self.transform(pil, boxes, rng=self.rng(index))
        info = {
            "image_id": image_id,
            "file": str(path),
            "original_size": (pil.height, pil.width),
            "resized_size": out.size,
            "flipped": out.flipped,
        }
        return out.image, out.boxes, anns, info


class DetectionGroundingDataset(AugmentedCoco):
    """Detection data under one fixed prompt: item = ``(image, target)`` with ``target`` =
    ``{"boxes" [N, 4], "positive_map" [N, T] (the prompt's row of each box's category),
    "image_id", ...}``. Boxes of categories the prompt does not contain are dropped (official:
    only boxes whose label appears in the caption)."""

    def __init__(self, coco, image_root, transform, prompt: FixedPrompt, **kwargs):
        super().__init__(coco, image_root, transform, **kwargs)
        self.prompt = prompt
        self.row_of = {cid: i for i, cid in enumerate(prompt.category_ids)}

    def __getitem__(self, index: int):
        image, boxes, anns, info = self.load(index)
        rows = [self.row_of.get(a["category_id"], -1) for a in anns]
        keep = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        rows_t = torch.tensor([r for r in rows if r >= 0], dtype=torch.int64)
        info["boxes"] = boxes[keep] if len(rows) else boxes
        info["positive_map"] = self.prompt.positive_map[rows_t]
        info["category_ids"] = [a["category_id"] for a, r in zip(anns, rows) if r >= 0]
        return image, info


def _token_rows(
    encoding, spans_per_box: Sequence[Sequence[tuple[int, int]]], max_len: int
) -> tuple[torch.Tensor, list[bool]]:
    """Rows ``[N, max_len]`` of 0/1 token maps (official ``create_positive_map`` on char spans) and
    which boxes map to at least one token inside ``max_len``."""
    rows = torch.zeros((len(spans_per_box), max_len), dtype=torch.float32)
    for i, spans in enumerate(spans_per_box):
        for start, end in spans:
            found = span_to_tokens(encoding, int(start), int(end))
            if found is None:
                continue
            first, last = found
            if first >= max_len:
                continue
            rows[i, first : min(last, max_len - 1) + 1] = 1.0
    return rows, [bool(r.any()) for r in rows]


class CaptionGroundingDataset(AugmentedCoco):
    """Grounding data (MDETR / GoldG): each image entry has a ``caption``; each box a
    ``tokens_positive`` list of ``[start, end)`` character spans into it. Item = ``(image,
    target)`` with ``target["input_ids"]`` ``[T]`` (the caption's tokens, at most ``max_len``) and
    ``target["positive_map"]`` ``[N, T]``; boxes whose phrase has no token (or lies past
    ``max_len``) are dropped."""

    def __init__(self, coco, image_root, transform, tokenizer, *, max_len: int = MAX_QUERY_LEN, **kwargs):
        super().__init__(coco, image_root, transform, **kwargs)
        self.tokenizer = tokenizer
        self.max_len = max_len
        missing = [e[0] for e in self.entries if not isinstance(self.coco.images[e[0]].get("caption"), str)]
        if missing:
            raise DataError(
                f"{self.coco.path}: image {missing[0]!r} has no 'caption'; grounding data needs a caption per image"
            )
        for anns in self.annotations.values():
            for a in anns:
                if not isinstance(a.get("tokens_positive"), list):
                    raise DataError(
                        f"{self.coco.path}: annotation {a.get('id')!r} has no 'tokens_positive' list of [start, end] "
                        "character spans"
                    )

    def __getitem__(self, index: int):
        image, boxes, anns, info = self.load(index)
        caption = self.coco.images[info["image_id"]]["caption"]
        enc = self.tokenizer(caption, truncation=True, max_length=self.max_len)
        rows, ok = _token_rows(enc, [a["tokens_positive"] for a in anns], self.max_len)
        keep = torch.tensor(ok, dtype=torch.bool)
        n = len(enc["input_ids"])
        info.update(
            boxes=boxes[keep] if ok else boxes[:0],
            positive_map=rows[keep][:, :n] if ok else rows[:0, :n],
            input_ids=torch.tensor(enc["input_ids"], dtype=torch.int64),
            caption=caption,
        )
        return image, info


class DetectionPretrainDataset(AugmentedCoco):
    """Detection data as grounding for pretraining (official
    ``convert_object_detection_to_grounding_optimized_for_od``, ``RANDOM_SAMPLE_NEG``,
    ``CONTROL_PROB (0, 0, 0.5, 0)``, separator ``". "``): the image's categories (shuffled, the
    ones beyond the token budget dropped with their boxes, as ``check_for_positive_overflow``)
    and negatives — with probability ``full_negative_prob`` ``negatives`` of them, else a uniform
    1..``negatives`` — drawn among all categories, kept while they fit, the whole list shuffled."""

    def __init__(
        self,
        coco,
        image_root,
        transform,
        tokenizer,
        *,
        negatives: int = 85,
        max_len: int = MAX_QUERY_LEN,
        full_negative_prob: float = 0.5,
        **kwargs,
    ):
        super().__init__(coco, image_root, transform, **kwargs)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.negatives = negatives
        self.full_negative_prob = full_negative_prob
        self.names = {cid: clean_name(c["name"]) for cid, c in self.coco.categories.items()}
        ids = list(self.names)
        lengths = tokenizer([self.names[c] + SEPARATOR for c in ids], add_special_tokens=False)["input_ids"]
        self.name_tokens = {c: len(t) for c, t in zip(ids, lengths)}

    def caption_for(self, positives: list, rng: random.Random) -> tuple[str, dict, list]:
        budget = self.max_len - 2  # [CLS] and [SEP]
        positives = list(positives)
        rng.shuffle(positives)
        kept, used = [], 0
        for c in positives:
            used += self.name_tokens[c]
            if used > budget:
                break
            kept.append(c)
        all_ids = list(self.names)
        full = min(self.negatives, len(all_ids))
        if rng.random() < self.full_negative_prob:
            count = full
        else:
            count = rng.randrange(max(1, full)) + 1
        count = min(count, len(all_ids))
        negatives = [c for c in rng.sample(all_ids, count) if c not in set(positives)]
        rng.shuffle(negatives)
        room = budget - used
        screened = []
        for c in negatives:
            room -= self.name_tokens[c]
            if room <= 0:
                break
            screened.append(c)
        labels = screened + kept
        rng.shuffle(labels)
        caption, spans = "", {}
        for i, c in enumerate(labels):
            start = len(caption)
            caption += self.names[c]
            spans[c] = (start, len(caption))
            if i != len(labels) - 1:
                caption += SEPARATOR
        return caption, spans, kept

    def __getitem__(self, index: int):
        image, boxes, anns, info = self.load(index)
        cats = [a["category_id"] for a in anns]
        caption, spans, kept = self.caption_for(sorted(set(cats), key=_sort_key), self.rng(index, ":text"))
        enc = self.tokenizer(caption, truncation=True, max_length=self.max_len)
        rows, ok = _token_rows(enc, [[spans[c]] if c in spans else [] for c in cats], self.max_len)
        keep = torch.tensor(ok, dtype=torch.bool).reshape(-1)
        n = len(enc["input_ids"])
        info.update(
            boxes=boxes[keep],
            positive_map=rows[keep][:, :n],
            input_ids=torch.tensor(enc["input_ids"], dtype=torch.int64),
            caption=caption,
        )
        return image, info


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A training batch: images ``[B, 3, H, W]`` (zero-padded), their unpadded sizes, one
    :class:`GroundingTarget` per image, and per-image captions ``input_ids`` / ``attention_mask``
    ``[B, T]`` (None when the run has one fixed prompt)."""

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[GroundingTarget]
    image_ids: list
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        targets = [GroundingTarget(t.boxes.to(device), t.positive_map.to(device)) for t in self.targets]
        return Batch(
            move(self.images),
            self.image_sizes,
            targets,
            self.image_ids,
            move(self.input_ids),
            move(self.attention_mask),
        )


class Collate:
    """Picklable collate function (loader workers): images padded to ``size_divisibility``."""

    def __init__(self, size_divisibility: int = 32):
        self.size_divisibility = size_divisibility

    def __call__(self, items) -> Batch:
        images, sizes = pad_batch([it[0] for it in items], self.size_divisibility)
        targets = [GroundingTarget(it[1]["boxes"], it[1]["positive_map"]) for it in items]
        ids = [it[1]["image_id"] for it in items]
        if "input_ids" not in items[0][1]:
            return Batch(images, sizes, targets, ids)
        longest = max(int(it[1]["input_ids"].numel()) for it in items)
        input_ids = torch.zeros((len(items), longest), dtype=torch.int64)
        mask = torch.zeros((len(items), longest), dtype=torch.int64)
        for i, it in enumerate(items):
            n = int(it[1]["input_ids"].numel())
            input_ids[i, :n] = it[1]["input_ids"]
            mask[i, :n] = 1
        return Batch(images, sizes, targets, ids, input_ids, mask)


class EpochBatchSampler(Sampler):
    """The batches of one epoch for one process.

    The epoch's order is a permutation of the items drawn from ``(seed, epoch)``; it is cut into
    global batches of ``batch_size`` (the last incomplete one dropped, as the official iteration-
    based sampler effectively does; a dataset smaller than one batch gives a single batch), and
    process ``rank`` of ``world`` takes its contiguous ``batch_size / world`` slice of each, so the
    processes together see exactly the global batches of a single process. ``start`` skips the
    first batches (resuming within an epoch)."""

    def __init__(
        self, length: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0
    ):
        if batch_size % world:
            raise ValueError(f"the global batch size {batch_size} is not divisible by the {world} processes")
        self.length, self.batch_size, self.seed, self.epoch = length, batch_size, seed, epoch
        self.rank, self.world, self.start = rank, world, start

    @staticmethod
    def num_batches(length: int, batch_size: int) -> int:
        return max(1, length // batch_size) if length else 0

    def global_batches(self) -> list[list[int]]:
        order = list(range(self.length))
        random.Random(f"order:{self.seed}:{self.epoch}").shuffle(order)
        n = self.num_batches(self.length, self.batch_size)
        size = min(self.batch_size, self.length)
        return [order[i * size : (i + 1) * size] for i in range(n)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start :]:
            per = len(batch) // self.world
            if per == 0:
                raise ValueError(
                    f"a batch of {len(batch)} images cannot be split over {self.world} processes; use more images or "
                    "fewer processes"
                )
            yield batch[self.rank * per : (self.rank + 1) * per]

    def __len__(self) -> int:
        return max(0, self.num_batches(self.length, self.batch_size) - self.start)


def make_train_loader(
    dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
    workers: int = 0,
    size_divisibility: int = 32,
):
    """A DataLoader over one epoch of ``dataset`` (its random stream set to ``epoch``)."""
    dataset.set_epoch(epoch)
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, epoch=epoch, rank=rank, world=world, start=start)
    generator = torch.Generator()
    generator.manual_seed(seed * 100003 + epoch)  # worker seeds; keeps the global RNG untouched
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(size_divisibility),
        generator=generator,
        persistent_workers=False,
    )


def is_grounding_file(coco: CocoData) -> bool:
    """Whether a COCO JSON is grounding data (captions per image, ``tokens_positive`` per box)."""
    images = list(coco.images.values())
    return bool(images) and all(isinstance(i.get("caption"), str) for i in images[: min(len(images), 20)])
