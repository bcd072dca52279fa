"""Anchors and the ATSS post-processor: from head outputs to detections, as the reference evaluates.

Per level: token probabilities are aggregated per phrase (MEAN or MAX), thresholded *before*
centerness, the top-n candidates by ``score * sigmoid(centerness)`` are decoded against their
anchors and scored ``sqrt(score * sigmoid(centerness))``; then class-aware NMS (+1 IoU) over all
levels and a per-image limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import boxes as box_ops
from ..config import AnchorConfig, PostprocessConfig
from .head import HeadOutputs


class AnchorGenerator(nn.Module):
    """One square anchor per location and level. The cell anchors are buffers
    (``cell_anchors.0..4``, ``[1, 4]``) because the checkpoints carry them."""

    def __init__(self, cfg: AnchorConfig):
        super().__init__()
        self.strides = tuple(cfg.strides)
        self.cell_anchors = nn.Module()
        for i, (stride, size) in enumerate(zip(cfg.strides, cfg.sizes)):
            self.cell_anchors.register_buffer(str(i), box_ops.cell_anchor(stride, size))

    def forward(self, feature_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Anchors ``[H*W, 4]`` per level for feature maps of the given ``(H, W)``."""
        return [
            box_ops.grid_anchors(getattr(self.cell_anchors, str(i)), self.strides[i], h, w)
            for i, (h, w) in enumerate(feature_sizes)
        ]


@dataclass
class Detections:
    """Detections of one image: ``boxes [N, 4]`` xyxy, ``scores [N]``, ``labels [N]`` (1-based
    indices into the prompt's phrases), ``levels [N]`` (pyramid level of each box)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    levels: torch.Tensor

    def __len__(self) -> int:
        return self.scores.numel()

    def index(self, keep: torch.Tensor) -> "Detections":
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], self.levels[keep])

    def to(self, device) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device), self.levels.to(device))

    @staticmethod
    def cat(parts: list["Detections"]) -> "Detections":
        return Detections(*(torch.cat([getattr(p, f) for p in parts]) for f in ("boxes", "scores", "labels", "levels")))

    def rescale(self, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> "Detections":
        """Boxes mapped from an image of size ``from_hw`` to ``to_hw`` (plain ratios, no +1)."""
        ratio_w = to_hw[1] / from_hw[1]
        ratio_h = to_hw[0] / from_hw[0]
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=self.boxes.dtype, device=self.boxes.device)
        return Detections(self.boxes * scale, self.scores, self.labels, self.levels)


def phrase_token_indices(positive_map: torch.Tensor) -> list[torch.Tensor]:
    """For a 0/1 (or normalised) ``[L, T]`` positive map: the token indices of each phrase."""
    return [torch.nonzero(row > 0).squeeze(1) for row in positive_map]


def phrase_scores(
    token_probs: torch.Tensor, token_indices: list[torch.Tensor], score_agg: str = "MEAN"
) -> torch.Tensor:
    """Per-phrase scores ``[B, N, L]`` from token probabilities ``[B, N, T]``: the MEAN (or MAX) of
    the probabilities of each phrase's tokens; a phrase without tokens scores 0."""
    b, n, _ = token_probs.shape
    scores = token_probs.new_zeros(b, n, len(token_indices))
    for j, idx in enumerate(token_indices):
        if idx.numel() == 0:
            continue
        selected = token_probs[:, :, idx.to(token_probs.device)]
        if score_agg == "MEAN":
            scores[:, :, j] = selected.mean(-1)
        elif score_agg == "MAX":
            scores[:, :, j] = selected.max(-1).values
        else:
            raise ValueError(f"score_agg must be MEAN or MAX, got {score_agg!r}")
    return scores


def level_candidates(
    box_regression: torch.Tensor,
    centerness: torch.Tensor,
    token_logits: torch.Tensor,
    anchors: torch.Tensor,
    token_indices: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    cfg: PostprocessConfig,
    level: int,
) -> list[Detections]:
    """Candidates of one pyramid level for every image (before NMS), sorted by score."""
    b = box_regression.shape[0]
    scores = phrase_scores(token_logits.sigmoid(), token_indices, cfg.score_agg)  # [B, HW, L]
    regression = box_regression.permute(0, 2, 3, 1).reshape(b, -1, 4)
    center = centerness.permute(0, 2, 3, 1).reshape(b, -1).sigmoid()
    candidate_mask = scores > cfg.pre_nms_thresh  # threshold before centerness
    weighted = scores * center[:, :, None]
    out = []
    for i in range(b):
        locations, labels = torch.nonzero(candidate_mask[i], as_tuple=True)  # row-major, as the reference
        values = weighted[i, locations, labels]
        k = min(values.numel(), cfg.pre_nms_top_n)
        values, top = values.topk(k, sorted=True)
        locations, labels = locations[top], labels[top]
        boxes = box_ops.decode(regression[i, locations], anchors[locations], cfg.box_coder_weights)
        h, w = image_sizes[i]
        boxes = box_ops.clip_boxes(boxes, h, w)
        keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= cfg.min_size) & ((boxes[:, 3] - boxes[:, 1] + 1) >= cfg.min_size)
        dets = Detections(boxes, values.sqrt(), labels + 1, torch.full_like(labels, level))
        out.append(dets.index(keep))
    return out


def select_detections(dets: Detections, cfg: PostprocessConfig) -> Detections:
    """Class-aware NMS, then the per-image limit: when more than ``detections_per_img`` remain keep
    those scoring at least the n-th largest score (ties can keep a few more, as the reference does).
    Sorted by descending score."""
    keep = box_ops.batched_nms(dets.boxes, dets.scores, dets.labels, cfg.nms_thresh)
    dets = dets.index(keep)
    n = cfg.detections_per_img
    if n > 0 and len(dets) > n:
        threshold = torch.kthvalue(dets.scores.cpu().float(), len(dets) - n + 1).values.item()
        dets = dets.index(torch.nonzero(dets.scores >= threshold).squeeze(1))
    order = torch.argsort(dets.scores, descending=True, stable=True)
    return dets.index(order)


def postprocess(
    outputs: HeadOutputs,
    anchors: list[torch.Tensor],
    positive_map: torch.Tensor,
    image_sizes: list[tuple[int, int]],
    cfg: PostprocessConfig,
) -> list[Detections]:
    """Detections per image in the coordinates of the resized (unpadded) image.

    ``positive_map [L, T]`` marks the tokens of each of the ``L`` phrases; labels are 1..L.
    """
    token_indices = phrase_token_indices(positive_map)
    per_level = [
        level_candidates(r, c, t, a, token_indices, image_sizes, cfg, level)
        for level, (r, c, t, a) in enumerate(
            zip(outputs.box_regression, outputs.centerness, outputs.token_logits, anchors)
        )
    ]
    return [select_detections(Detections.cat([lvl[i] for lvl in per_level]), cfg) for i in range(len(image_sizes))]


def merge_chunk_detections(parts: list[Detections], detections_per_img: int) -> Detections:
    """Merge the detections of one image from several prompt chunks (labels already global) and
    apply the per-image limit after merging."""
    dets = Detections.cat(parts)
    order = torch.argsort(dets.scores, descending=True, stable=True)
    if detections_per_img > 0:
        order = order[:detections_per_img]
    return dets.index(order)


def match_detections(a: Detections, b: Detections, iou_threshold: float = 0.99, score_tol: float = 1e-4) -> dict:
    """Compare two detection sets of one image that should be equal up to float noise (another
    batch size, another kernel, AMP): greedily, in ``a``'s score order, each detection of ``a`` is
    paired with the unpaired one of ``b`` with the same label, IoU above ``iou_threshold``, score
    within ``score_tol`` and the highest IoU (order alone cannot be compared: near-equal scores
    swap places). Returns ``{"a", "b", "matched", "max_score_diff", "max_box_diff"}`` (the diffs
    over the matched pairs, 0.0 when none)."""
    matched, score_diff, box_diff = 0, 0.0, 0.0
    if len(a) and len(b):
        iou = box_ops.box_iou(a.boxes.float(), b.boxes.float())
        ok = (a.labels[:, None] == b.labels[None]) & (iou > iou_threshold)
        ok &= (a.scores[:, None].float() - b.scores[None].float()).abs() <= score_tol
        iou = torch.where(ok, iou, torch.full_like(iou, -1.0))
        free = torch.ones(len(b), dtype=torch.bool)
        for i in torch.argsort(a.scores, descending=True, stable=True).tolist():
            candidates = torch.where(free, iou[i], torch.full_like(iou[i], -1.0))
            j = int(candidates.argmax())
            if candidates[j] < 0:
                continue
            free[j] = False
            matched += 1
            score_diff = max(score_diff, abs(float(a.scores[i]) - float(b.scores[j])))
            box_diff = max(box_diff, float((a.boxes[i].float() - b.boxes[j].float()).abs().max()))
    return {"a": len(a), "b": len(b), "matched": matched, "max_score_diff": score_diff, "max_box_diff": box_diff}
