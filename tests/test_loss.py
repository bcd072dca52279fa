"""The GLIP training losses (``glip_transfer.model.loss``) on hand-built cases with known values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glip_transfer import boxes as box_ops
from glip_transfer.model.head import HeadOutputs
from glip_transfer.model.loss import (
    GLIPLoss,
    GroundingTarget,
    LossConfig,
    atss_assign,
    centerness_targets,
    giou_loss,
    token_sigmoid_focal_loss,
    token_targets,
)


def grid(stride: int, size: int, h: int, w: int) -> torch.Tensor:
    return box_ops.grid_anchors(box_ops.cell_anchor(stride, size), stride, h, w)


def positives(matched: torch.Tensor) -> list[int]:
    return torch.nonzero(matched >= 0).flatten().tolist()


def zero_outputs(shapes: list[tuple[int, int]], b: int, t: int) -> HeadOutputs:
    return HeadOutputs(
        [torch.zeros(b, 4, h, w, requires_grad=True) for h, w in shapes],
        [torch.zeros(b, 1, h, w, requires_grad=True) for h, w in shapes],
        [torch.zeros(b, h * w, t, requires_grad=True) for h, w in shapes],
    )


def test_defaults_are_official():
    cfg = LossConfig()
    assert (cfg.topk, cfg.focal_alpha, cfg.focal_gamma) == (9, 0.25, 2.0)
    assert (cfg.reg_weight, cfg.centerness_weight, cfg.token_weight, cfg.max_query_len) == (2.0, 1.0, 1.0, 256)


# ---------------------------------------------------------------------------- focal loss


def test_token_focal_loss_hand_values():
    logits = torch.tensor([[[0.0, 2.0, 5.0], [-1.0, 0.5, 9.0]]])  # [1, 2 anchors, 3 tokens]
    targets = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding

    def sig(x):
        return 1 / (1 + math.exp(-x))

    def pos(x):  # alpha * (1 - p)^2 * -log(p)
        p = sig(x)
        return 0.25 * (1 - p) ** 2 * -math.log(p)

    def neg(x):  # (1 - alpha) * p^2 * -log(1 - p)
        p = sig(x)
        return 0.75 * p**2 * -math.log(1 - p)

    expected = pos(0.0) + neg(2.0) + neg(-1.0) + pos(0.5)
    got = token_sigmoid_focal_loss(logits, targets, mask, 0.25, 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert pos(0.0) == pytest.approx(0.25 * 0.25 * math.log(2))


# ---------------------------------------------------------------------------- GIoU


def test_giou_identical_boxes_is_zero():
    b = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 6.0, 9.0]])
    assert torch.allclose(giou_loss(b, b), torch.zeros(2), atol=1e-6)


def test_giou_hand_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    # plain areas (no +1): overlap 1, union 7, hull 9; disjoint: union 2, hull 3;
    # inverted prediction: x2, y2 raised to x1, y1 -> a point at (2, 2): iou 0, hull 4, union 4
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 1 + 1 / 3, 1.0])
    assert torch.allclose(giou_loss(pred, target), expected, atol=1e-6)


# ---------------------------------------------------------------------------- ATSS


def test_atss_gt_equal_to_one_anchor():
    anchors = grid(8, 8, 4, 4)  # disjoint 8x8 anchors; location y*4 + x
    m = atss_assign([anchors], torch.tensor([[8.0, 8.0, 15.0, 15.0]]), 9)
    assert m.shape == (16,)
    assert positives(m) == [5] and m[5] == 0


def test_atss_gt_centre_between_four_anchors():
    anchors = grid(8, 8, 4, 4)
    # the box covers anchors 5, 6, 9, 10 exactly (IoU 0.25 each); its centre lies between them
    m = atss_assign([anchors], torch.tensor([[8.0, 8.0, 23.0, 23.0]]), 9)
    assert positives(m) == [5, 6, 9, 10]


def test_atss_threshold_uses_unbiased_std():
    anchors = grid(8, 16, 4, 4)
    # candidate 6's IoU lies between mean + biased std and mean + unbiased std
    m = atss_assign([anchors], torch.tensor([[19.0, 8.0, 31.0, 14.0]]), 9)
    assert positives(m) == [7]


@pytest.mark.parametrize("margin,expected", [(0.005, []), (0.02, [14])])
def test_atss_centre_must_be_inside_by_more_than_001(margin, expected):
    anchors = grid(8, 32, 6, 6)
    cx, cy = 19.5, 19.5  # centre of anchor 14 (y=2, x=2); anchors 14 and 15 have the same IoU
    gt = torch.tensor([[cx - margin, cy - 16, cx - margin + 7, cy + 16]])
    assert positives(atss_assign([anchors], gt, 9)) == expected


def test_atss_conflict_takes_highest_iou():
    anchors = grid(8, 8, 4, 4)
    big = [8.0, 8.0, 23.0, 23.0]  # positives 5, 6, 9, 10 at IoU 0.25
    small = [8.0, 8.0, 15.0, 15.0]  # positive 5 at IoU 1
    m = atss_assign([anchors], torch.tensor([big, small]), 9)
    assert positives(m) == [5, 6, 9, 10]
    assert m[[5, 6, 9, 10]].tolist() == [1, 0, 0, 0]


def test_atss_topk_per_level_and_no_gt():
    levels = [grid(8, 32, 8, 8), grid(16, 64, 4, 4), grid(32, 128, 2, 2), grid(64, 256, 1, 1)]
    gt = torch.tensor([[10.0, 12.0, 50.0, 60.0]])
    m = atss_assign(levels, gt, 9)
    assert m.shape == (64 + 16 + 4 + 1,)
    assert len(positives(m)) > 0 and set(m.tolist()) <= {-1, 0}
    empty = atss_assign(levels, torch.zeros(0, 4), 9)
    assert empty.shape == m.shape and (empty == -1).all()


# ---------------------------------------------------------------------------- targets


def test_centerness_target():
    anchors = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]])
    gts = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 19.0, 9.0]])
    got = centerness_targets(anchors, gts)
    assert got[0].item() == pytest.approx(1.0)
    assert got[1].item() == pytest.approx(math.sqrt(4.5 / 14.5))


def test_token_targets_binary_and_no_object_slot():
    matched = torch.tensor([-1, 0, 1, -1])
    pm = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # normalised rows: only > 0 matters
    t = token_targets(matched, pm, 6, no_object_slot=255)  # T < 256: the official slot is out of reach
    assert t.tolist() == [[0] * 6, [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0] * 6]
    t = token_targets(matched, pm, 6, no_object_slot=5)  # negatives target the last slot
    assert t[:, 5].tolist() == [1, 0, 0, 1] and t[:, :5].sum().item() == 3
    with pytest.raises(ValueError):
        token_targets(matched, torch.zeros(2, 7), 6, 5)


# ---------------------------------------------------------------------------- the module


def one_anchor_case(t: int = 4):
    """One level, 4x4 disjoint 8x8 anchors, one image, one box equal to anchor 5."""
    anchors = [grid(8, 8, 4, 4)]
    target = GroundingTarget(
        torch.tensor([[8.0, 8.0, 15.0, 15.0]]), torch.tensor([[0.0, 0.5, 0.5, 0.0] + [0.0] * (t - 4)])
    )
    return anchors, target


def test_loss_end_to_end_hand_values():
    anchors, target = one_anchor_case()
    torch.manual_seed(0)
    reg = torch.zeros(1, 4, 4, 4)
    reg[0, 0, 1, 1] = 5.0  # dx = 5 / 10 * width 8 = +4 pixels: predicted [12, 8, 19, 15]
    ctr = torch.randn(1, 1, 4, 4)
    tok = torch.randn(1, 16, 4) * 2
    mask = torch.tensor([[1, 1, 1, 0]])
    out = GLIPLoss(LossConfig())(HeadOutputs([reg], [ctr], [tok]), anchors, [target], mask)
    assert set(out) == {"loss_reg", "loss_centerness", "loss_dot_product_token"}
    assert all(v.dim() == 0 for v in out.values())

    # one positive anchor (5): normalisers are 1; GIoU with plain areas 49, 49, overlap 21, hull 77
    assert out["loss_reg"].item() == pytest.approx(2.0 * (1 - 21 / 77), rel=1e-5)
    # anchor centre = box centre: centerness target 1
    assert out["loss_centerness"].item() == pytest.approx(F.softplus(-ctr[0, 0, 1, 1]).item(), rel=1e-5)
    targets = torch.zeros(1, 16, 4)
    targets[0, 5, 1:3] = 1.0
    expected = token_sigmoid_focal_loss(tok, targets, mask)
    assert out["loss_dot_product_token"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_reg_loss_weighted_by_centerness_and_token_loss_normalised():
    anchors = [grid(8, 16, 6, 6)]
    gts = torch.tensor([[2.0, 3.0, 30.0, 25.0], [20.0, 18.0, 46.0, 44.0]])
    target = GroundingTarget(gts, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    torch.manual_seed(1)
    reg, ctr, tok = torch.randn(1, 4, 6, 6), torch.randn(1, 1, 6, 6), torch.randn(1, 36, 3)
    mask = torch.ones(1, 3)
    out = GLIPLoss(LossConfig())(HeadOutputs([reg], [ctr], [tok]), anchors, [target], mask)

    m = atss_assign(anchors, gts, 9)
    pos = torch.nonzero(m >= 0).flatten()
    assert pos.numel() == 6 and set(m[pos].tolist()) == {0, 1}
    a = anchors[0][pos]
    gt = gts[m[pos]]
    w = centerness_targets(a, gt)
    assert not torch.allclose(w, w[0].expand_as(w))  # different weights, so the weighting matters
    pred = box_ops.decode(reg.permute(0, 2, 3, 1).reshape(-1, 4)[pos], a)
    expected_reg = 2.0 * (giou_loss(pred, gt) * w).sum() / w.sum()
    assert out["loss_reg"].item() == pytest.approx(expected_reg.item(), rel=1e-5)
    expected_ctr = F.binary_cross_entropy_with_logits(ctr.reshape(-1)[pos], w, reduction="sum") / pos.numel()
    assert out["loss_centerness"].item() == pytest.approx(expected_ctr.item(), rel=1e-5)
    tt = token_targets(m, target.positive_map, 3, 255)[None]
    expected_tok = token_sigmoid_focal_loss(tok, tt, mask) / pos.numel()
    assert out["loss_dot_product_token"].item() == pytest.approx(expected_tok.item(), rel=1e-6)


def test_token_loss_counts_valid_tokens_only():
    anchors, target = one_anchor_case(t=6)
    torch.manual_seed(2)
    tok = torch.randn(1, 16, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    loss = GLIPLoss(LossConfig())
    base = loss(HeadOutputs([torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 1, 4, 4)], [tok]), anchors, [target], mask)
    tok2 = tok.clone()
    tok2[:, :, 4:] = torch.randn(1, 16, 2) * 10  # padding positions change: the loss does not
    other = loss(HeadOutputs([torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 1, 4, 4)], [tok2]), anchors, [target], mask)
    assert other["loss_dot_product_token"].item() == base["loss_dot_product_token"].item()
    tok3 = tok.clone()
    tok3[:, :, 3] += 1.0  # a valid (unmatched) token changes it
    third = loss(HeadOutputs([torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 1, 4, 4)], [tok3]), anchors, [target], mask)
    assert third["loss_dot_product_token"].item() != base["loss_dot_product_token"].item()


def test_no_object_slot_counts_for_full_captions():
    anchors, target = one_anchor_case(t=256)
    torch.manual_seed(3)
    tok = torch.randn(1, 16, 256)
    outputs = HeadOutputs([torch.zeros(1, 4, 4, 4)], [torch.zeros(1, 1, 4, 4)], [tok])
    loss = GLIPLoss(LossConfig())
    full = torch.ones(1, 256)  # a caption truncated to 256 tokens: the slot 255 is valid
    targets = torch.zeros(1, 16, 256)
    targets[0, 5, 1:3] = 1.0
    targets[0, :, 255] = 1.0
    targets[0, 5, 255] = 0.0  # negatives target the "no object" slot, the positive does not
    got = loss(outputs, anchors, [target], full)["loss_dot_product_token"]
    assert got.item() == pytest.approx(token_sigmoid_focal_loss(tok, targets, full).item(), rel=1e-6)
    short = torch.zeros(1, 256)
    short[0, :10] = 1  # a short caption: the slot is padding and has no effect
    targets[0, :, 255] = 0.0
    got = loss(outputs, anchors, [target], short)["loss_dot_product_token"]
    assert got.item() == pytest.approx(token_sigmoid_focal_loss(tok, targets, short).item(), rel=1e-6)


def test_images_without_boxes():
    anchors = [grid(8, 32, 4, 4), grid(16, 64, 2, 2)]
    shapes = [(4, 4), (2, 2)]
    empty = GroundingTarget(torch.zeros(0, 4), torch.zeros(0, 5))
    outputs = zero_outputs(shapes, 2, 5)
    out = GLIPLoss(LossConfig())(outputs, anchors, [empty, empty], torch.ones(2, 5))
    assert out["loss_reg"].item() == 0.0 and out["loss_centerness"].item() == 0.0
    assert all(v.requires_grad for v in out.values())
    # no positives: the token loss is the plain sum over all (negative) targets, divided by max(0, 1)
    n_anchors = 20
    assert out["loss_dot_product_token"].item() == pytest.approx(
        2 * n_anchors * 5 * 0.75 * 0.25 * math.log(2), rel=1e-5
    )
    sum(out.values()).backward()
    assert all(t.grad is not None for t in outputs.box_regression + outputs.centerness + outputs.token_logits)


def test_gradients_reach_every_head_output():
    anchors = [grid(8, 32, 8, 8), grid(16, 64, 4, 4), grid(32, 128, 2, 2)]
    shapes = [(8, 8), (4, 4), (2, 2)]
    torch.manual_seed(4)
    outputs = HeadOutputs(
        [torch.randn(2, 4, h, w, requires_grad=True) for h, w in shapes],
        [torch.randn(2, 1, h, w, requires_grad=True) for h, w in shapes],
        [torch.randn(2, h * w, 7, requires_grad=True) for h, w in shapes],
    )
    targets = [
        GroundingTarget(torch.tensor([[10.0, 12.0, 50.0, 40.0], [0.0, 0.0, 63.0, 63.0]]), torch.eye(2, 7)),
        GroundingTarget(torch.tensor([[20.0, 20.0, 30.0, 35.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])),
    ]
    out = GLIPLoss(LossConfig())(outputs, anchors, targets, torch.ones(2, 7))
    sum(out.values()).backward()
    for group in (outputs.box_regression, outputs.centerness, outputs.token_logits):
        grads = [t.grad for t in group]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_random_batch_is_finite():
    strides, sizes, hw = (8, 16, 32, 64, 128), (64, 128, 256, 512, 1024), (96, 160)
    shapes = [((hw[0] + s - 1) // s, (hw[1] + s - 1) // s) for s in strides]
    anchors = [grid(s, z, h, w) for s, z, (h, w) in zip(strides, sizes, shapes)]
    g = torch.Generator().manual_seed(5)
    t = 32
    outputs = HeadOutputs(
        [torch.randn(2, 4, h, w, generator=g) for h, w in shapes],
        [torch.randn(2, 1, h, w, generator=g) for h, w in shapes],
        [torch.randn(2, h * w, t, generator=g) * 5 for h, w in shapes],
    )
    targets = []
    for n in (5, 1):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([120.0, 70.0])
        wh = torch.rand(n, 2, generator=g) * 40 + 3
        pm = torch.zeros(n, t)
        pm[torch.arange(n), torch.randint(1, 20, (n,), generator=g)] = 1.0
        targets.append(GroundingTarget(torch.cat([xy, xy + wh], 1), pm))
    mask = torch.zeros(2, t)
    mask[0, :25] = 1
    mask[1, :12] = 1
    out = GLIPLoss(LossConfig())(outputs, anchors, targets, mask)
    for v in out.values():
        assert v.dim() == 0 and torch.isfinite(v) and v.item() > 0
