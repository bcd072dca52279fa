"""GLIP's training losses (the official ``ATSSLossComputation`` with the dot-product token loss).

Per image, ATSS assigns anchors to ground-truth boxes; over the batch:

* ``loss_dot_product_token``: sigmoid focal loss (alpha 0.25, gamma 2) between the dot-product
  logits ``[B, A, T]`` and binary token targets (the assigned box's positive-map row, > 0), over
  every anchor and every valid text token, summed and divided by the number of positive anchors;
* ``loss_centerness``: BCE-with-logits of the centerness logits of the positive anchors against
  their centerness targets, summed and divided by the number of positive anchors;
* ``loss_reg``: ``1 - GIoU`` between the decoded predictions and the boxes of the positive
  anchors, weighted by the centerness targets and divided by their sum (times reg_weight, 2).

Every negative anchor also targets the "no object" token slot ``max_query_len - 1`` (see
:class:`LossConfig`).

The positive counts and the centerness-target sums are averaged over ``torch.distributed``
processes when a process group is initialised (``reduce_sum / world_size``), as the official does.
Boxes follow the reference's "+1" convention (inclusive pixel indices) in the IoU of the
assignment and in the box coder, but not in the GIoU, which uses plain ``(x2 - x1) * (y2 - y1)``
areas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import boxes as box_ops
from ..config import MAX_QUERY_LEN
from .head import HeadOutputs


@dataclass
class LossConfig:
    """Loss settings; the defaults are the official ones (``maskrcnn_benchmark/config/defaults.py``)."""

    topk: int = 9  # MODEL.ATSS.TOPK: candidates per level and box (one anchor per location)
    focal_alpha: float = 0.25  # MODEL.DYHEAD.FUSE_CONFIG.TOKEN_ALPHA
    focal_gamma: float = 2.0  # MODEL.DYHEAD.FUSE_CONFIG.TOKEN_GAMMA
    reg_weight: float = 2.0  # MODEL.ATSS.REG_LOSS_WEIGHT
    centerness_weight: float = 1.0  # the official applies no weight to the centerness loss
    token_weight: float = 1.0  # MODEL.DYHEAD.FUSE_CONFIG.DOT_PRODUCT_TOKEN_LOSS_WEIGHT
    # MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN. The official pads captions to this length and makes
    # every negative anchor target the last slot (index max_query_len - 1, the "no object" token);
    # like any target it only counts where the text mask is 1 there, i.e. for a caption that fills
    # (or was truncated to) all max_query_len tokens. Shorter padding never reaches that slot.
    max_query_len: int = MAX_QUERY_LEN


@dataclass
class GroundingTarget:
    """The ground truth of one image.

    boxes:        ``[N, 4]`` xyxy in the resized (unpadded) image's pixels, float
    positive_map: ``[N, T']`` each row marks the tokens of the box's phrase (0/1 or normalised;
                  only ``> 0`` matters); ``T' <= T`` (narrower maps are padded with zeros)
    """

    boxes: torch.Tensor
    positive_map: torch.Tensor


# --------------------------------------------------------------------------------------------
# pure pieces


def atss_assign(anchors_per_level: list[torch.Tensor], gt_boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """ATSS: the index of the ground-truth box assigned to every anchor, ``-1`` for negatives.

    ``anchors_per_level``: ``[A_l, 4]`` per level (concatenated in this order); ``gt_boxes [G, 4]``.
    For each box: the ``topk`` anchors of each level closest (anchor centre to box centre) are the
    candidates; their IoUs (+1 convention) give the threshold ``mean + std`` (unbiased std); a
    candidate is positive when its IoU is ``>=`` the threshold and its centre lies inside the box
    by more than 0.01 pixel on every side. An anchor positive for several boxes takes the one of
    highest IoU (the first on ties). Returns ``[A]`` int64.
    """
    anchors = torch.cat(anchors_per_level)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if num_gt == 0:
        return torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    gt_boxes = gt_boxes.to(anchors)
    ious = box_ops.box_iou(anchors, gt_boxes)  # [A, G]

    anchor_points = torch.stack(((anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2), dim=1)
    gt_points = torch.stack(((gt_boxes[:, 0] + gt_boxes[:, 2]) / 2, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2), dim=1)
    distances = (anchor_points[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()  # [A, G]

    candidates = []
    start = 0
    for level_anchors in anchors_per_level:
        n = level_anchors.shape[0]
        k = min(topk, n)
        if k > 0:
            candidates.append(distances[start : start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    candidates = torch.cat(candidates)  # [C, G] anchor indices
    gt_index = torch.arange(num_gt, device=anchors.device).expand_as(candidates)

    candidate_ious = ious[candidates, gt_index]
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)
    is_pos = candidate_ious >= threshold[None, :]

    cx = anchor_points[candidates, 0]
    cy = anchor_points[candidates, 1]
    margins = torch.stack(
        (cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy), dim=0
    )  # [4, C, G]
    is_pos &= margins.min(dim=0).values > 0.01

    masked_ious = torch.full_like(ious, -1.0)  # IoUs are >= 0: -1 marks "not positive for this box"
    pos_anchor, pos_gt = candidates[is_pos], gt_index[is_pos]
    masked_ious[pos_anchor, pos_gt] = ious[pos_anchor, pos_gt]
    best, matched = masked_ious.max(dim=1)
    return torch.where(best >= 0, matched, torch.full_like(matched, -1))


def centerness_targets(anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of each anchor centre in its box (both ``[N, 4]``):
    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` with plain distances to the sides."""
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    left_right = torch.stack((cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx), dim=1)
    top_bottom = torch.stack((cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy), dim=1)
    return torch.sqrt(
        (left_right.min(dim=1).values / left_right.max(dim=1).values)
        * (top_bottom.min(dim=1).values / top_bottom.max(dim=1).values)
    )


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-box ``1 - GIoU`` ``[N]`` between xyxy boxes ``[N, 4]``, as the official ``GIoULoss``:
    plain areas (no +1), the predicted ``x2``/``y2`` raised to at least ``x1``/``y1``, 1e-7 added
    to the union and the enclosing area."""
    px1, py1 = pred[:, 0], pred[:, 1]
    px2 = torch.max(px1, pred[:, 2])
    py2 = torch.max(py1, pred[:, 3])
    tx1, ty1, tx2, ty2 = target.unbind(1)
    pred_area = (px2 - px1) * (py2 - py1)
    target_area = (tx2 - tx1) * (ty2 - ty1)

    iw = torch.min(px2, tx2) - torch.max(px1, tx1)
    ih = torch.min(py2, ty2) - torch.max(py1, ty1)
    inter = torch.where((iw > 0) & (ih > 0), iw * ih, torch.zeros_like(iw))
    enclosing = (torch.max(px2, tx2) - torch.min(px1, tx1)) * (torch.max(py2, ty2) - torch.min(py1, ty1)) + 1e-7
    union = pred_area + target_area - inter + 1e-7
    giou = inter / union - (enclosing - union) / enclosing
    return 1 - giou


def token_sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, text_mask: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Summed sigmoid focal loss (fvcore's) between ``logits [B, A, T]`` and float targets of the
    same shape, over the tokens where ``text_mask [B, T]`` is > 0 (every anchor)."""
    mask = (text_mask > 0)[:, None, :].expand_as(logits)
    x = logits[mask]
    t = targets[mask].to(x.dtype)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.sum()


def token_targets(
    matched: torch.Tensor, positive_map: torch.Tensor, num_tokens: int, no_object_slot: int
) -> torch.Tensor:
    """Binary token targets ``[A, T]`` of one image: a positive anchor gets the ``> 0`` pattern of
    its box's positive-map row, a negative one a 1 at ``no_object_slot`` alone (if ``< T``)."""
    if positive_map.shape[1] > num_tokens:
        raise ValueError(f"positive_map has {positive_map.shape[1]} token columns, the logits {num_tokens}")
    binary = (positive_map > 0).to(torch.float32)
    binary = F.pad(binary, (0, num_tokens - binary.shape[1]))
    out = binary.new_zeros(matched.shape[0], num_tokens)
    pos = matched >= 0
    out[pos] = binary[matched[pos]].to(out.device)
    if no_object_slot < num_tokens:
        out[~pos, no_object_slot] = 1.0
    return out


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


# --------------------------------------------------------------------------------------------
# the module


class GLIPLoss(nn.Module):
    """The official GLIP losses. ``forward`` returns ``{"loss_reg", "loss_centerness",
    "loss_dot_product_token"}`` (scalar tensors, weights applied; sum them for the total).

    The official also returns ``loss_cls`` as ``0 * (focal loss of the unused cls_logits)``;
    it is always 0 and left out.
    """

    def __init__(self, cfg: LossConfig, box_coder_weights=(10.0, 10.0, 5.0, 5.0)):
        super().__init__()
        self.cfg = cfg
        self.box_coder_weights = tuple(box_coder_weights)

    @torch.no_grad()
    def assign(self, anchors: list[torch.Tensor], gt_boxes: list[torch.Tensor]) -> torch.Tensor:
        """Matched box index ``[B, A]`` (``-1`` for negatives), anchors of all levels concatenated."""
        return torch.stack([atss_assign(anchors, boxes, self.cfg.topk) for boxes in gt_boxes])

    def forward(
        self,
        outputs: HeadOutputs,
        anchors: list[torch.Tensor],
        targets: list[GroundingTarget],
        text_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``outputs``: the head's per-level predictions for ``B`` images; ``anchors``: ``[H*W, 4]``
        per level (shared by the images); ``targets``: one per image; ``text_mask [B, T]``."""
        cfg = self.cfg
        b = len(targets)
        # the official runs the loss in float32 (custom_fwd(cast_inputs=torch.float32))
        regression = torch.cat([r.float().permute(0, 2, 3, 1).reshape(b, -1, 4) for r in outputs.box_regression], 1)
        centerness = torch.cat([c.float().reshape(b, -1) for c in outputs.centerness], 1)
        logits = torch.cat([t.float() for t in outputs.token_logits], 1)  # [B, A, T]
        device = regression.device
        anchors = [a.to(device=device, dtype=torch.float32) for a in anchors]
        all_anchors = torch.cat(anchors)
        num_tokens = logits.shape[-1]

        gt_boxes = [t.boxes.to(device=device, dtype=torch.float32) for t in targets]
        matched = self.assign(anchors, gt_boxes)
        token_target = torch.stack(
            [
                token_targets(m, t.positive_map.to(device), num_tokens, cfg.max_query_len - 1)
                for m, t in zip(matched, targets)
            ]
        )

        world = _world_size()
        pos_img, pos_anchor = torch.nonzero(matched >= 0, as_tuple=True)
        num_pos = pos_img.numel()
        total_pos = _reduce_sum(torch.tensor([float(num_pos)], device=device)).item()
        num_pos_avg = max(total_pos / world, 1.0)

        token_loss = token_sigmoid_focal_loss(
            logits, token_target, text_mask.to(device), cfg.focal_alpha, cfg.focal_gamma
        )
        token_loss = token_loss / num_pos_avg

        pos_regression = regression[pos_img, pos_anchor]
        pos_centerness = centerness[pos_img, pos_anchor]
        pos_anchors = all_anchors[pos_anchor]
        gt = torch.cat([boxes[m[m >= 0]] for boxes, m in zip(gt_boxes, matched)])  # same order as pos_*
        # the official encodes the boxes as regression targets and decodes them back for both the
        # GIoU and the centerness target (a float round trip; decode clamps dw, dh at log(1000/16))
        gt = box_ops.decode(
            box_ops.encode(gt, pos_anchors, self.box_coder_weights), pos_anchors, self.box_coder_weights
        )
        center_target = centerness_targets(pos_anchors, gt)
        center_sum_avg = _reduce_sum(center_target.sum()).item() / world  # every process joins the reduction
        if num_pos > 0:
            pred_boxes = box_ops.decode(pos_regression, pos_anchors, self.box_coder_weights)
            reg_loss = (giou_loss(pred_boxes, gt) * center_target).sum() / center_sum_avg
            centerness_loss = (
                F.binary_cross_entropy_with_logits(pos_centerness, center_target, reduction="sum") / num_pos_avg
            )
        else:
            # zero, but still attached to the graph
            reg_loss = pos_regression.sum()
            centerness_loss = pos_centerness.sum()

        return {
            "loss_reg": reg_loss * cfg.reg_weight,
            "loss_centerness": centerness_loss * cfg.centerness_weight,
            "loss_dot_product_token": token_loss * cfg.token_weight,
        }
