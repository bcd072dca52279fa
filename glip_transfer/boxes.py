"""Pure box operations with the reference's conventions.

Boxes are ``[N, 4]`` tensors ``(x1, y1, x2, y2)`` in pixels. The reference (maskrcnn-benchmark)
treats coordinates as inclusive pixel indices, so widths are ``x2 - x1 + 1``; that "+1" appears in
anchors, the box coder, box areas and NMS, and parity with the official model depends on it.
"""

from __future__ import annotations

import math

import torch

BBOX_XFORM_CLIP = math.log(1000.0 / 16)
TO_REMOVE = 1.0  # the reference's "+1" in widths and heights


def cell_anchor(stride: int, size: int) -> torch.Tensor:
    """The single ``[1, 4]`` anchor of a location at the origin: centred on ``(stride-1)/2``."""
    center = (stride - 1) / 2.0
    half = (size - 1) / 2.0
    return torch.tensor([[center - half, center - half, center + half, center + half]], dtype=torch.float32)


def grid_anchors(cell: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """Anchors ``[H*W, 4]`` for a feature map: the ``[1, 4]`` cell anchor shifted to every location,
    in ``y*W + x`` order."""
    kw = dict(dtype=torch.float32, device=cell.device)
    sy, sx = torch.meshgrid(
        torch.arange(0, height * stride, step=stride, **kw),
        torch.arange(0, width * stride, step=stride, **kw),
        indexing="ij",
    )
    shifts = torch.stack((sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)), dim=1)
    return (shifts[:, None, :] + cell[None]).reshape(-1, 4)


def encode(gt_boxes: torch.Tensor, anchors: torch.Tensor, weights=(10.0, 10.0, 5.0, 5.0)) -> torch.Tensor:
    """Regression targets ``[N, 4]`` of ``gt_boxes`` relative to ``anchors`` (both ``[N, 4]``).

    GLIP's head coder: widths carry the +1, centres are ``(x1 + x2) / 2`` (unlike the generic
    maskrcnn-benchmark coder, whose centres are ``x1 + w / 2``).
    """
    aw = anchors[:, 2] - anchors[:, 0] + TO_REMOVE
    ah = anchors[:, 3] - anchors[:, 1] + TO_REMOVE
    ax = (anchors[:, 2] + anchors[:, 0]) / 2
    ay = (anchors[:, 3] + anchors[:, 1]) / 2
    gw = gt_boxes[:, 2] - gt_boxes[:, 0] + TO_REMOVE
    gh = gt_boxes[:, 3] - gt_boxes[:, 1] + TO_REMOVE
    gx = (gt_boxes[:, 2] + gt_boxes[:, 0]) / 2
    gy = (gt_boxes[:, 3] + gt_boxes[:, 1]) / 2
    wx, wy, ww, wh = weights
    return torch.stack(
        (wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)), dim=1
    )


def decode(deltas: torch.Tensor, anchors: torch.Tensor, weights=(10.0, 10.0, 5.0, 5.0)) -> torch.Tensor:
    """Boxes ``[N, 4]`` from regression ``deltas`` ``[N, 4]`` against ``anchors`` ``[N, 4]`` (inverse of
    :func:`encode`; ``dw``/``dh`` clamped at ``log(1000/16)``)."""
    anchors = anchors.to(deltas.dtype)
    widths = anchors[:, 2] - anchors[:, 0] + TO_REMOVE
    heights = anchors[:, 3] - anchors[:, 1] + TO_REMOVE
    ctr_x = (anchors[:, 2] + anchors[:, 0]) / 2
    ctr_y = (anchors[:, 3] + anchors[:, 1]) / 2
    wx, wy, ww, wh = weights
    dx = deltas[:, 0] / wx
    dy = deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(deltas[:, 3] / wh, max=BBOX_XFORM_CLIP)
    pred_x = dx * widths + ctr_x
    pred_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths - 1)
    half_h = 0.5 * (torch.exp(dh) * heights - 1)
    return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``[N]`` with the +1 convention."""
    return (boxes[:, 2] - boxes[:, 0] + TO_REMOVE) * (boxes[:, 3] - boxes[:, 1] + TO_REMOVE)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, M]`` with the +1 convention (as the reference's ``boxlist_iou``)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt + TO_REMOVE).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip to ``[0, W-1] x [0, H-1]`` (inclusive pixel indices)."""
    x = boxes[:, 0::2].clamp(min=0, max=width - 1)
    y = boxes[:, 1::2].clamp(min=0, max=height - 1)
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-aware greedy NMS with +1 IoU; indices of kept boxes, by descending score.

    A box is dropped when its IoU with an already kept box of the same label exceeds the
    threshold. Each label is suppressed on its own (no coordinate-offset trick, which would lose
    float32 precision), and the +1 convention comes from growing every box by one pixel before
    torchvision's exact NMS.
    """
    import torchvision  # a second to import: only when boxes are suppressed (not for `glip --help`)

    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # torchvision computes (x2-x1)*(y2-y1): adding 1 to x2/y2 gives the +1 areas and intersections
    grown = boxes.clone()
    grown[:, 2:] += TO_REMOVE
    kept = []
    for label in labels.unique():
        idx = torch.nonzero(labels == label).squeeze(1)
        kept.append(idx[torchvision.ops.nms(grown[idx], scores[idx], iou_threshold)])
    keep = torch.cat(kept)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(x1, y1, x2, y2)`` to COCO ``(x, y, w, h)``; the reference adds 1 to widths when it exports
    detections (``BoxList.convert("xywh")`` uses the +1 convention)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1 + TO_REMOVE, y2 - y1 + TO_REMOVE), dim=-1)
