"""Swin + FPN image backbone: state-dict layout of the official model, parity with the reference
features, a cross-check against timm's Swin, odd input sizes and the small test config."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glip_transfer.config import SwinConfig, variant_config
from glip_transfer.model.backbone import build_backbone
from glip_transfer.model.swin import PatchMerging, WindowAttention, build_swin, shifted_window_mask, window_partition
from glip_transfer.reference import apply_deterministic_weights


def _wrapped(variant: str) -> nn.Module:
    """The backbone under ``backbone.``, as inside the full model (the weight rule needs full keys)."""
    cfg = variant_config(variant)
    m = nn.Module()
    m.backbone = build_backbone(cfg.swin, cfg.fpn)
    return m


def _manifest(path) -> dict[str, tuple[str, str, str]]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {
        r["model_key"]: (r["shape"], r["dtype"], r["kind"])
        for r in rows
        if r["model_key"].startswith(("backbone.body.", "backbone.fpn."))
    }


def _ours(m: nn.Module) -> dict[str, tuple[str, str, str]]:
    params = {k for k, _ in m.named_parameters()}
    return {
        k: ("x".join(map(str, t.shape)), str(t.dtype).removeprefix("torch."), "parameter" if k in params else "buffer")
        for k, t in m.state_dict().items()
    }


@pytest.mark.parametrize(
    "variant,manifest", [("glip-t", "glip_tiny_state_dict.tsv"), ("glip-l", "glip_large_state_dict.tsv")]
)
def test_state_dict_matches_manifest(reference_dir, variant, manifest):
    expected = _manifest(reference_dir / manifest)
    with torch.device("meta"):  # shapes only: skip allocating and initialising GLIP-L's 195M weights
        got = _ours(_wrapped(variant))
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert {k: v for k, v in got.items() if v != expected[k]} == {}


def test_weight_rule_and_relative_position_index(reference_dir):
    """The deterministic weights of every backbone tensor reproduce the reference's sums, and the
    int64 ``relative_position_index`` equals the reference's constructed value (sum, first values)."""
    m = apply_deterministic_weights(_wrapped("glip-t"), num_convs=6)
    sd = m.state_dict()
    with open(reference_dir / "glip_tiny_weight_rule_check.tsv", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["model_key"] in sd]
    assert len(rows) == len(sd)
    for r in rows:
        t = sd[r["model_key"]]
        assert t.double().sum().item() == pytest.approx(float(r["sum_float64"]), rel=1e-9, abs=1e-7), r["model_key"]
        first = [float(v) for v in r["first_values"].split(",")]
        assert t.flatten()[: len(first)].double().tolist() == pytest.approx(first, abs=1e-7), r["model_key"]


@pytest.fixture(scope="module")
def astronaut_features(reference_dir):
    from safetensors.torch import load_file

    ref = load_file(str(reference_dir / "glip_tiny_astronaut.safetensors"))
    m = apply_deterministic_weights(_wrapped("glip-t"), num_convs=6).eval()
    with torch.no_grad():
        c = m.backbone.body(ref["image.input"])
        p = m.backbone.fpn(c)
    return ref, c, p


def test_astronaut_parity_swin(astronaut_features):
    ref, c, _ = astronaut_features
    assert len(c) == 3
    for name, got in zip(("C3", "C4", "C5"), c):
        want = ref[f"backbone.body.{name}"]
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=0, atol=5e-5, msg=name)  # measured 4.3e-6 (test_parity.TOL_SWIN)


def test_astronaut_parity_fpn(astronaut_features):
    ref, _, p = astronaut_features
    assert len(p) == 5
    for level, got in enumerate(p, start=3):
        want = ref[f"backbone.fpn.P{level}"]
        assert got.shape == want.shape, level
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=f"P{level}")


def test_matches_timm_swin_at_224():
    """At 224x224 (all stage sizes multiples of the window, so padding-before-shift is moot) the
    detection Swin equals timm's Swin with ``always_partition`` (which, like the reference, keeps
    shifting the 7x7 last stage). timm puts ``downsample`` at the start of the next stage."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    cfg = SwinConfig(
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=7,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3),
    )
    torch.manual_seed(0)
    ours = build_swin(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped tensor shows
        for t in ours.parameters():
            t.add_(torch.randn_like(t) * 0.05)
    ref = timm_swin.SwinTransformer(
        img_size=224,
        patch_size=4,
        embed_dim=cfg.embed_dim,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_size=cfg.window_size,
        always_partition=True,
        num_classes=0,
    ).eval()

    remapped = {}
    for k, v in ours.state_dict().items():
        if k.endswith("relative_position_index") or k.startswith("norm"):
            continue
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i + 1}.downsample")
        remapped[k] = v
    missing, unexpected = ref.load_state_dict(remapped, strict=False)
    assert unexpected == [] and set(missing) == {"norm.weight", "norm.bias"}
    for i, layer in enumerate(ours.layers):  # same relative position indexing
        want_index = ref.layers[i].blocks[0].attn.relative_position_index
        assert torch.equal(layer.blocks[0].attn.relative_position_index, want_index)

    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = ours(x)
        h = ref.patch_embed(x)
        want = []
        for i, layer in enumerate(ref.layers):
            h = layer(h)
            out = getattr(ours, f"norm{i}")(h) if i > 0 else h  # our outputs 1-3 are normalised
            want.append(out.permute(0, 3, 1, 2))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape == (2, cfg.embed_dim * 2**i, 56 >> i, 56 >> i)
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4, msg=f"stage {i}")


@pytest.mark.parametrize("variant", ["test-tiny", "glip-t"])
def test_odd_input_sizes(variant):
    """Sizes that are multiples of neither 32 nor the window: every downsampling rounds up."""
    cfg = variant_config(variant)
    backbone = build_backbone(cfg.swin, cfg.fpn).eval()
    x = torch.randn(1, 3, 100, 148)
    with torch.no_grad():
        c = backbone.body(x)
        p = backbone.fpn(c)
    sizes = [(13, 19), (7, 10), (4, 5)]  # strides 8, 16, 32 of 100x148
    assert [tuple(t.shape) for t in c] == [(1, ch, *s) for ch, s in zip(cfg.swin.out_channels, sizes)]
    sizes += [(2, 3), (1, 2)]
    assert [tuple(t.shape) for t in p] == [(1, cfg.fpn.out_channels, *s) for s in sizes]
    assert all(torch.isfinite(t).all() for t in c + p)


def test_shifted_window_mask_matches_reference_construction():
    """The vectorised mask equals the reference's slice-assignment construction, padded sizes included."""
    for hp, wp, ws in [(14, 21, 7), (7, 7, 7), (24, 12, 12), (35, 28, 7)]:
        shift = ws // 2
        img = torch.zeros(1, hp, wp, 1)
        cnt = 0
        for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                img[:, h, w, :] = cnt
                cnt += 1
        win = window_partition(img, ws).squeeze(-1)
        diff = win.unsqueeze(1) - win.unsqueeze(2)
        want = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        assert torch.equal(shifted_window_mask(hp, wp, ws, shift, "cpu", torch.float32), want)


@pytest.mark.parametrize("batch", [1, 3])
def test_window_attention_fused_equals_explicit(batch):
    """The SDPA path (inference, frozen bias) and the explicit product (a trainable bias on the CPU)
    compute the same attention, shifted-window mask and relative-position bias included."""
    torch.manual_seed(0)
    attn = WindowAttention(16, 7, 4)
    mask = shifted_window_mask(14, 21, 7, 3, "cpu", torch.float32)  # 6 windows
    x = torch.randn(batch * 6, 49, 16)
    for m in (None, mask):
        with torch.no_grad():
            fused = attn(x, m)
        explicit = attn(x, m)  # the bias table requires grad: explicit path
        assert explicit.requires_grad
        torch.testing.assert_close(fused, explicit.detach(), rtol=0, atol=1e-6)


def test_patch_merging_order_and_odd_sizes():
    torch.manual_seed(0)
    merge = PatchMerging(4)
    x = torch.randn(2, 5, 7, 4)
    xp = F.pad(x, (0, 0, 0, 1, 0, 1))
    cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)), rtol=0, atol=0)
    assert merge(x).shape == (2, 3, 4, 8)


def test_test_tiny_config_forward_backward_and_checkpointing():
    cfg = variant_config("test-tiny")
    torch.manual_seed(0)
    plain = build_backbone(cfg.swin, cfg.fpn).train()
    ckpt = build_backbone(cfg.swin, cfg.fpn, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 96, 64)
    grads = []
    for m in (plain, ckpt):
        out = m(x)
        shapes = [(2, 32, 96 // s, 64 // s) for s in (8, 16, 32)] + [(2, 32, 2, 1), (2, 32, 1, 1)]
        assert [tuple(t.shape) for t in out] == shapes
        sum(t.square().mean() for t in out).backward()
        grads.append(m.body.patch_embed.proj.weight.grad.clone())
        assert all(p.grad is not None for p in m.parameters())
    torch.testing.assert_close(grads[0], grads[1])


def test_drop_path_only_in_training():
    cfg = dataclasses.replace(variant_config("test-tiny").swin, drop_path_rate=0.5)
    torch.manual_seed(0)
    body = build_swin(cfg)
    no_drop = build_swin(dataclasses.replace(cfg, drop_path_rate=0.0))
    no_drop.load_state_dict(body.state_dict())
    x = torch.randn(4, 3, 64, 64)
    body.eval(), no_drop.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(body(x), no_drop(x)))
        body.train()
        assert any(not torch.equal(a, b) for a, b in zip(body(x), no_drop(x)))
