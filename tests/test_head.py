"""The DyHead's DyConv and DyReLU against the reference's formulas (stacked terms, explicit max)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glip_transfer.model import head
from glip_transfer.model.head import DyConv, h_sigmoid


def reference_dyconv(self, visual):
    """The reference's DyConv level loop, term stacking and DyReLU written as it is there."""
    out = []
    for level, feature in enumerate(visual):
        offset_mask = self.offset(feature)
        offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
        terms = [self.DyConv[1](feature, offset, mask)]
        if level > 0:
            terms.append(self.DyConv[2](visual[level - 1], offset, mask))
        if level < len(visual) - 1:
            h, w = visual[level + 1].shape[-2:]
            small = [head._offset_for_smaller_output(t, h, w) for t in (offset, mask)]
            upper = self.DyConv[0](visual[level + 1], *small)
            terms.append(F.interpolate(upper, size=feature.shape[-2:], mode="bilinear", align_corners=True))
        stacked = torch.stack(terms)
        attn = h_sigmoid(torch.stack([self.AttnConv(t) for t in terms]))
        x = (stacked * attn).mean(dim=0)
        b, c = x.shape[:2]
        y = h_sigmoid(self.relu.fc(x.mean(dim=(2, 3)))).view(b, 4 * c, 1, 1)
        a1, b1, a2, b2 = torch.split(y, c, dim=1)
        a1, a2 = (a1 - 0.5) * 2 + 1.0, (a2 - 0.5) * 2
        out.append(torch.max(x * a1 + b1 - 0.5, x * a2 + b2 - 0.5))
    return out


@pytest.mark.parametrize("batch", [1, 2])
def test_dyconv_equals_the_reference_formula_bit_for_bit(batch):
    torch.manual_seed(0)
    dyconv = DyConv(32, 16).eval()
    with torch.no_grad():
        for p in dyconv.parameters():
            p.normal_(0, 0.3)
    visual = [torch.randn(batch, 32, h, w) for h, w in ((20, 23), (10, 12), (5, 6), (3, 3), (2, 2))]  # FPN sizes
    with torch.no_grad():
        got, want = dyconv(visual), reference_dyconv(dyconv, visual)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # and the gradients still flow (in-place updates only on fresh buffers)
    visual = [v.requires_grad_() for v in visual]
    sum(o.square().sum() for o in dyconv.train()(visual)).backward()
    assert all(v.grad is not None for v in visual) and dyconv.relu.fc[0].weight.grad is not None
