"""Training pieces on the test-tiny model: trainable sets per mode, optimiser groups, schedules,
few-shot sampling, grounding datasets, batches, checkpoints, artifacts, the training forward."""

from __future__ import annotations

import json
import math
import random
import re
import warnings

import pytest
import torch

from glip_transfer.config import ConfigError, variant_config
from glip_transfer.data import load_coco
from glip_transfer.model.autograd import needs_grad
from glip_transfer.model.glip import build_glip
from glip_transfer.model.loss import GroundingTarget
from glip_transfer.training.config import LoraSettings, TrainConfig
from glip_transfer.training.engine import Trainer, TrainModule
from glip_transfer.training.modes import MODES, apply_mode, set_train_modes, train_config_for
from synthetic import make_rectangles

LINEAR_PROBE = (
    "bbox_pred",
    "cls_logits",
    "centerness",
    "cosine_scale",
    "dot_product_projection_text",
    "head.log_scale",
    "head.bias_lang",
    "head.bias0",
)
"""The official linear_prob name patterns (``tools/finetune.py``), matched in ``model.rpn.named_parameters()`` names."""


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_glip(variant_config("test-tiny"))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- modes


def runs_with_autograd(model) -> dict[str, bool]:
    """Which parts a training forward records (the model's rule: frozen parts fed by inputs that
    need no gradient run under no_grad)."""
    text_grad = needs_grad(model.language_backbone) or model.prompt_offset is not None
    return {
        "backbone": needs_grad(model.backbone),
        "text": text_grad,
        "tower": text_grad or needs_grad(model.backbone) or needs_grad(model.rpn.head.dyhead_tower),
    }


def test_full_mode_freezes_stem_first_stage_and_cls_logits():
    model = tiny()
    plan = apply_mode(model, "full", TrainConfig())
    names = {n for n, _ in model.named_parameters()}
    frozen = {
        n
        for n in names
        if n.startswith(("backbone.body.patch_embed.", "backbone.body.layers.0.", "rpn.head.cls_logits."))
    }
    assert frozen and trainable(model) == names - frozen
    assert plan.definition is MODES["full"] and model.prompt_offset is None
    assert runs_with_autograd(model) == {"backbone": True, "text": True, "tower": True}


@pytest.mark.parametrize("k, frozen_layers", [(-1, 0), (0, 0), (1, 0), (2, 1), (3, 2)])
def test_freeze_backbone_at_follows_swin_frozen_stages(k, frozen_layers):
    model = tiny()
    apply_mode(model, "full", TrainConfig(freeze_backbone_at=k))
    got = trainable(model)
    assert any(n.startswith("backbone.body.patch_embed.") for n in got) == (k < 0)
    for i in range(4):
        assert any(n.startswith(f"backbone.body.layers.{i}.") for n in got) == (i >= frozen_layers)
    set_train_modes(model, apply_mode(tiny(), "full", TrainConfig(freeze_backbone_at=k)), True)


def test_prompt_mode_trains_only_the_offset():
    model = tiny()
    base_keys = set(model.state_dict())
    plan = apply_mode(model, "prompt", TrainConfig())
    assert trainable(model) == {"rpn.tunable_linear.weight"}  # the official name of the offset
    assert set(model.state_dict()) - base_keys == {"rpn.tunable_linear.weight"}
    module = TrainModule(model, plan)
    assert [n for n, _ in module.named_trainable()] == ["rpn.tunable_linear.weight"]
    assert tuple(model.prompt_offset.weight.shape) == (256, 32) and not model.prompt_offset.weight.any()
    assert runs_with_autograd(model) == {"backbone": False, "text": True, "tower": True}
    set_train_modes(model, plan, True)
    assert not any(m.training for m in model.modules())  # official: everything frozen runs in eval mode


def test_linear_mode_is_the_official_linear_prob_set():
    model = tiny()
    plan = apply_mode(model, "linear", TrainConfig())
    expected = {
        f"rpn.head.{n}"
        for n in (
            "bbox_pred.weight",
            "bbox_pred.bias",
            "centerness.weight",
            "centerness.bias",
            "dot_product_projection_text.weight",
            "dot_product_projection_text.bias",
            "log_scale",
            "bias_lang",
            "bias0",
        )
    }
    assert trainable(model) == expected
    # the official rule, applied literally to rpn.named_parameters(), minus the dot-product rule's cls_logits
    official = {
        "rpn." + k
        for k, _ in model.rpn.named_parameters()
        if any(p in k for p in LINEAR_PROBE) and "cls_logits" not in k
    }
    assert official == expected
    assert runs_with_autograd(model) == {"backbone": False, "text": False, "tower": False}
    set_train_modes(model, plan, True)
    assert model.rpn.head.training and not model.backbone.body.training and not model.backbone.fpn.training
    assert not model.language_backbone.training


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_runs_without_autograd_what_its_table_entry_says(mode):
    """The model's one rule (frozen parts fed by inputs without gradients run under no_grad) gives
    exactly the parts the mode's ``no_autograd`` lists, and the step still reaches every trainable
    parameter."""
    model = tiny()
    plan = apply_mode(model, mode, TrainConfig(dropout=0.0))
    module = TrainModule(model, plan)
    set_train_modes(model, plan, True)
    grad_mode = {}
    parts = {
        "backbone": model.backbone,
        "language_backbone": model.language_backbone,
        "tower": model.rpn.head.dyhead_tower[-1],
    }
    for name, part in parts.items():
        part.register_forward_hook(lambda *_, name=name: grad_mode.__setitem__(name, torch.is_grad_enabled()))
    images, targets, ids, mask = _batch()
    sum(module(images, targets, ids, mask).values()).backward()
    assert {name for name, enabled in grad_mode.items() if not enabled} == set(MODES[mode].no_autograd)
    assert all(p.grad is not None for _, p in module.named_trainable())


def test_text_mode_trains_the_language_backbone_only():
    model = tiny()
    plan = apply_mode(model, "text", TrainConfig())
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("language_backbone.")}
    set_train_modes(model, plan, True)
    assert model.language_backbone.training and not model.rpn.head.training and not model.backbone.body.training


@pytest.mark.parametrize(
    "targets, pattern",
    [
        (
            ("fusion",),
            r"rpn\.head\.dyhead_tower\.\d+\.b_attn\.attn\.(v_proj|l_proj|values_v_proj|values_l_proj|out_v_proj|out_l_proj)\.lora_[AB]\.default\.weight",
        ),
        (
            ("bert",),
            r"language_backbone\.body\.model\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)\.lora_[AB]\.default\.weight",
        ),
        (("swin",), r"backbone\.body\.layers\.\d+\.blocks\.\d+\.attn\.(qkv|proj)\.lora_[AB]\.default\.weight"),
        (
            ("head_bert",),
            r"rpn\.head\.dyhead_tower\.\d+\.attention\.(self\.(query|key|value)|output\.dense)\.lora_[AB]\.default\.weight",
        ),
    ],
)
def test_lora_mode_trains_only_adapters_on_the_chosen_modules(targets, pattern):
    model = tiny()
    cfg = TrainConfig(lora=LoraSettings(rank=4, targets=targets))
    plan = apply_mode(model, "lora", cfg)
    got = trainable(model)
    assert got and all(re.fullmatch(pattern, n) for n in got), sorted(got)[:4]
    a = [p for n, p in model.named_parameters() if n.endswith("lora_A.default.weight")]
    assert all(p.shape[0] == 4 for p in a)
    assert all(
        not p.any() for n, p in model.named_parameters() if n.endswith("lora_B.default.weight")
    )  # starts as the base
    assert plan.lora["r"] == 4


def test_lora_targets_bad_expression_is_a_config_error():
    with pytest.raises(ConfigError, match="matched no module"):
        apply_mode(tiny(), "lora", TrainConfig(lora=LoraSettings(targets=("nothing_here",))))


def test_glip_t_trainable_counts_without_building_weights():
    """Counts for the GLIP-T sizes (meta device: no memory)."""
    with torch.device("meta"):
        model = build_glip(variant_config("glip-t"))
    total = sum(p.numel() for p in model.parameters())
    counts = {}
    for mode in ("full", "linear", "text"):
        with torch.device("meta"):
            m = build_glip(variant_config("glip-t"))
        apply_mode(m, mode, TrainConfig())
        counts[mode] = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert counts["linear"] == 256 * 4 + 4 + 256 + 1 + 768 * 256 + 256 + 1 + 768 + 1
    assert 0.98 * total < counts["full"] < total
    assert 100e6 < counts["text"] < 120e6


# --------------------------------------------------------------------------- optimiser and schedule


def test_param_groups_follow_the_official_solver():
    from glip_transfer.training.optim import param_settings

    model = tiny()
    model.set_prompt_offset()
    roles = model.param_roles()

    def settings(name):
        return param_settings(roles[name], cfg)

    cfg = TrainConfig(lr=1e-4, language_lr=1e-5, weight_decay=0.05, bias_lr_factor=2.0, bias_weight_decay=0.0)
    assert settings("rpn.head.bbox_pred.weight") == (1e-4, 0.05)
    assert settings("rpn.head.bbox_pred.bias") == (2e-4, 0.0)
    assert settings("rpn.head.bias_lang") == (2e-4, 0.0)
    assert settings("backbone.body.layers.1.blocks.0.attn.relative_position_bias_table") == (2e-4, 0.0)
    assert settings("language_backbone.body.model.encoder.layer.0.output.dense.weight") == (1e-5, 0.05)
    assert settings("language_backbone.body.model.encoder.layer.0.output.dense.bias") == (2e-5, 0.0)
    assert settings("rpn.tunable_linear.weight") == (1e-4, 0.05)
    cfg.norm_weight_decay_factor = 0.0
    assert settings("backbone.body.norm1.weight") == (1e-4, 0.0)
    assert settings("rpn.head.dyhead_tower.2.DyConv.0.bn.weight") == (
        1e-4,
        0.05,
    )  # "bn": the official name test skips it


def _opt(lr=1.0, groups=1):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD(
        [{"params": [p], "lr": lr * (i + 1), "initial_lr": lr * (i + 1)} for i, p in enumerate(params)], lr=lr
    )


def test_warmup_multistep_matches_the_official_formula():
    from glip_transfer.training.optim import LRSchedule

    cfg = TrainConfig(schedule="multistep", warmup_iters=4, warmup_factor=0.25, milestones=(0.5, 0.75), gamma=0.1)
    opt = _opt()
    sched = LRSchedule(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[2] == pytest.approx(0.25 * 0.5 + 0.5)
    assert lrs[4:10] == [1.0] * 6 and lrs[10] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.01)


def test_plateau_matches_torch_reduce_on_plateau():
    from glip_transfer.training.optim import LRSchedule

    cfg = TrainConfig(schedule="plateau", lr_patience=2, gamma=0.1, min_lr=1e-3)
    opt = _opt(groups=2)
    sched = LRSchedule(opt, cfg, total_steps=10)
    ref_opt = _opt(groups=2)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="max", factor=0.1, patience=2, min_lr=1e-3)
    for ap in [0.1, 0.2, 0.2, 0.19, 0.2, 0.1, 0.3, 0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2]:
        sched.observe(ap)
        ref.step(ap)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in ref_opt.param_groups])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # floored at min_lr
    state = sched.state_dict()
    again = LRSchedule(_opt(groups=2), cfg, total_steps=10)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.state_dict() == state


def test_recipe_settings_per_mode_and_shots():
    from glip_transfer.recipes import load_recipe

    rec = load_recipe("odinw13/aquarium")
    full = train_config_for(rec, "full", shots=1)
    assert (full.lr, full.language_lr, full.weight_decay, full.freeze_backbone_at) == (1e-4, 1e-5, 0.05, 2)
    assert (full.copies, full.lr_patience, full.early_stop_patience, full.epochs, full.batch_size) == (8, 3, 8, 200, 4)
    prompt = train_config_for(rec, "prompt", shots=0)
    assert (prompt.lr, prompt.weight_decay, prompt.copies, prompt.lr_patience, prompt.early_stop_patience) == (
        0.05,
        0.25,
        1,
        2,
        4,
    )
    assert train_config_for(rec, "linear").lr == 1e-4
    assert train_config_for(rec, "lora").lr > 0 and train_config_for(rec, "text").language_lr is None
    with pytest.raises(ConfigError):
        train_config_for(rec, "full", shots=2)


# --------------------------------------------------------------------------- few-shot


def _official_few_shot(coco, shots, seed):
    """The official COCODataset code path (with a dict for cats_freq), for comparison."""
    by_image = coco.annotations_by_image
    ids = sorted(coco.images)
    ids = [i for i in ids if by_image[i] and not all(any(o <= 1 for o in a["bbox"][2:]) for a in by_image[i])]
    if seed:
        random.Random(seed).shuffle(ids)
    cats_freq = {c: shots for c in coco.categories}
    out = []
    for img_id in ids:
        cat = set(a["category_id"] for a in by_image[img_id])
        if sum(cats_freq[c] > 0 for c in cat):
            out.append(img_id)
            for c in cat:
                cats_freq[c] -= 1
    return out


@pytest.mark.parametrize("shots, seed", [(1, 3), (3, 30), (5, 300), (1, 0)])
def test_few_shot_subset_is_the_official_greedy_rule(tmp_path, shots, seed):
    from glip_transfer.training.data import few_shot_image_ids

    ann, _ = make_rectangles(tmp_path, n_images=30, names=("a", "b", "c", "d"), per_image=2, seed=1)
    coco = load_coco(ann)
    got = few_shot_image_ids(coco, shots, seed)
    assert got == _official_few_shot(coco, shots, seed)
    per_cat = {
        c: sum(any(a["category_id"] == c for a in coco.annotations_by_image[i]) for i in got) for c in coco.categories
    }
    assert all(v >= shots for v in per_cat.values())
    assert few_shot_image_ids(coco, shots, seed) == got  # deterministic


# --------------------------------------------------------------------------- datasets and batches


@pytest.fixture(scope="module")
def rect_data(tmp_path_factory):
    return make_rectangles(tmp_path_factory.mktemp("rect"), n_images=6, names=("red", "green", "blue"))


def _prompt(tokenizer, coco):
    from glip_transfer.prompts import build_detection_prompt
    from glip_transfer.training.data import fixed_prompt

    dp = build_detection_prompt(tokenizer, list(coco.categories.values()))
    return fixed_prompt(tokenizer, dp.chunks[0])


def test_detection_grounding_targets_use_the_prompt_rows(rect_data, tokenizer):
    from glip_transfer.training.data import DetectionGroundingDataset
    from glip_transfer.transforms import TrainTransform

    ann, images = rect_data
    coco = load_coco(ann)
    prompt = _prompt(tokenizer, coco)
    assert prompt.caption == "red. green. blue" and prompt.length == 7
    ds = DetectionGroundingDataset(
        coco,
        images,
        TrainTransform(variant_config("test-tiny").input, min_sizes=(64, 96, 128), max_size=200),
        prompt,
        copies=2,
    )
    assert len(ds) == 12 and ds.num_images == 6
    image, target = ds[0]
    cats = target["category_ids"]
    assert target["boxes"].shape == (len(cats), 4) and target["positive_map"].shape == (len(cats), 256)
    row_of = {1: 1, 2: 3, 3: 5}  # token positions of red / green / blue
    for c, row in zip(cats, target["positive_map"]):
        assert torch.nonzero(row).flatten().tolist() == [row_of[c]]

    # each copy of an image draws its own augmentation, and so does each epoch
    def draws():
        return [(tuple(ds[i][0].shape), bool(ds[i][1]["flipped"])) for i in range(12)]

    epoch0 = draws()
    assert ds[0][1]["image_id"] == ds[6][1]["image_id"]
    assert any(epoch0[i] != epoch0[i + 6] for i in range(6))
    assert draws() == epoch0  # reproducible
    ds.set_epoch(1)
    assert draws() != epoch0


def test_pretrain_caption_keeps_positives_and_budget(rect_data, tokenizer):
    from glip_transfer.training.data import DetectionPretrainDataset
    from glip_transfer.transforms import TrainTransform

    ann, images = rect_data
    ds = DetectionPretrainDataset(
        load_coco(ann),
        images,
        TrainTransform(variant_config("test-tiny").input, min_sizes=(96,)),
        tokenizer,
        negatives=2,
        max_len=12,
    )
    for i in range(len(ds)):
        _, t = ds[i]
        ids = t["input_ids"].tolist()
        assert len(ids) <= 12 and t["positive_map"].shape == (len(t["boxes"]), len(ids))
        assert set(t["caption"].split(". ")) <= {"red", "green", "blue"}
        for row in t["positive_map"]:  # every kept box grounds to the tokens of a category name
            words = tokenizer.convert_ids_to_tokens([ids[j] for j in torch.nonzero(row).flatten().tolist()])
            assert len(words) == 1 and words[0] in t["caption"].split(". ")
    captions = {ds[0][1]["caption"] for _ in range(1)} | {(ds.set_epoch(e), ds[0][1]["caption"])[1] for e in range(8)}
    assert len(captions) > 1  # shuffled order / sampled negatives change with the epoch


def test_caption_grounding_dataset_maps_char_spans(tmp_path, tokenizer):
    from glip_transfer.training.data import CaptionGroundingDataset, Collate, is_grounding_file
    from glip_transfer.transforms import TrainTransform

    ann, images = make_rectangles(tmp_path, n_images=2, names=("red", "green"), per_image=2)
    data = json.loads(ann.read_text())
    caption = "a red box next to a green box"
    for img in data["images"]:
        img["caption"] = caption
    for a in data["annotations"]:
        word = "red" if a["category_id"] == 1 else "green"
        start = caption.index(word)
        a["tokens_positive"] = [[start, start + len(word)]]
    ann.write_text(json.dumps(data))
    coco = load_coco(ann)
    assert is_grounding_file(coco)
    ds = CaptionGroundingDataset(
        coco, images, TrainTransform(variant_config("test-tiny").input, min_sizes=(96,)), tokenizer
    )
    _, t = ds[0]
    ids = t["input_ids"].tolist()
    for row in t["positive_map"]:
        toks = tokenizer.convert_ids_to_tokens([ids[j] for j in torch.nonzero(row).flatten().tolist()])
        assert toks in (["red"], ["green"])
    batch = Collate()([ds[0], ds[1]])
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.images.shape[0] == 2


def test_epoch_batches_split_over_processes_as_one_global_batch():
    from glip_transfer.training.data import EpochBatchSampler

    single = list(EpochBatchSampler(10, 4, seed=3, epoch=1))
    assert len(single) == 2 and all(len(b) == 4 for b in single)
    ranks = [list(EpochBatchSampler(10, 4, seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    assert [ranks[0][i] + ranks[1][i] for i in range(2)] == single
    assert list(EpochBatchSampler(10, 4, seed=3, epoch=1, start=1)) == single[1:]
    assert list(EpochBatchSampler(10, 4, seed=3, epoch=2)) != single
    assert (
        list(EpochBatchSampler(3, 4, seed=0, epoch=0)) and len(list(EpochBatchSampler(3, 4, seed=0, epoch=0))[0]) == 3
    )


# --------------------------------------------------------------------------- the training forward


def _batch(b=2, size=96, t=7):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=g)
    pmap = torch.zeros(2, 256)
    pmap[0, 1] = pmap[1, 3] = 1
    targets = [
        GroundingTarget(torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]]), pmap.clone())
        for _ in range(b)
    ]
    ids = torch.zeros(1, 256, dtype=torch.int64)
    ids[0, :t] = torch.tensor([101, 2417, 1012, 2665, 1012, 2630, 102])[:t]
    mask = torch.zeros(1, 256, dtype=torch.int64)
    mask[0, :t] = 1
    return images, targets, ids, mask


def test_caption_cut_to_its_length_gives_the_same_loss():
    """Padding positions never reach a real token or the loss: cutting them changes nothing."""
    model = tiny().eval()
    plan = apply_mode(model, "prompt", TrainConfig())
    module = TrainModule(model, plan)
    with torch.no_grad():
        model.prompt_offset.weight.normal_()
    images, targets, ids, mask = _batch()
    cut = module(images, targets, ids, mask)
    outputs, anchors = model(images, model.encode_text(ids, mask))  # the model adds its prompt offset
    full = module.criterion(outputs, anchors, targets, mask.expand(2, -1))
    for k in cut:
        assert cut[k].item() == pytest.approx(full[k].item(), rel=1e-4, abs=1e-5)


def test_linear_mode_runs_the_tower_without_autograd_and_gives_the_same_loss():
    model = tiny()
    plan = apply_mode(model, "linear", TrainConfig())
    module = TrainModule(model, plan)
    model.eval()  # deterministic (no dropout) for the comparison
    images, targets, ids, mask = _batch()
    grad_mode = {}
    for name, part in (
        ("backbone", model.backbone),
        ("tower", model.rpn.head.dyhead_tower[-1]),
        ("predictors", model.rpn.head.bbox_pred),
    ):
        part.register_forward_hook(lambda *_, name=name: grad_mode.__setitem__(name, torch.is_grad_enabled()))
    losses = module(images, targets, ids, mask)
    assert grad_mode == {"backbone": False, "tower": False, "predictors": True}
    loss = sum(losses.values())
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable(model)
    outputs, anchors = model(images, model.encode_text(ids[:, :7], mask[:, :7]))
    ref = module.criterion(
        outputs, anchors, [GroundingTarget(t.boxes, t.positive_map[:, :7]) for t in targets], mask[:, :7].expand(2, -1)
    )
    assert loss.item() == pytest.approx(sum(ref.values()).item(), rel=1e-5)


def test_frozen_text_is_encoded_once(monkeypatch, tmp_path):
    from glip_transfer.training.data import Batch, FixedPrompt

    model = tiny()
    plan = apply_mode(model, "prompt", TrainConfig())
    module = TrainModule(model, plan)
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda *a: calls.append(1) or original(*a))
    images, targets, ids, mask = _batch()
    prompt = FixedPrompt("red. green. blue", ids, mask, targets[0].positive_map, [1, 2])
    trainer = Trainer(
        module,
        TrainConfig(batch_size=2, amp=False),
        [0, 1],
        device=torch.device("cpu"),
        out_dir=tmp_path,
        prompt=prompt,
        progress=False,
    )
    set_train_modes(model, plan, True)  # as Trainer.fit does: the frozen BERT in eval mode
    for _ in range(3):
        out = trainer.train_step(Batch(images, [(96, 96)] * 2, targets, [1, 2]))
    assert len(calls) == 1 and math.isfinite(out["loss"])
    offset = model.prompt_offset.weight
    assert offset.grad is None and offset.abs().sum() > 0  # it trained


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    from glip_transfer.training.data import Batch, FixedPrompt

    model = tiny()
    plan = apply_mode(model, "linear", TrainConfig())
    module = TrainModule(model, plan)
    images, targets, ids, mask = _batch()
    prompt = FixedPrompt("x", ids, mask, targets[0].positive_map, [1, 2])
    trainer = Trainer(
        module,
        TrainConfig(batch_size=2, amp=False),
        [0, 1],
        device=torch.device("cpu"),
        out_dir=tmp_path,
        prompt=prompt,
        progress=False,
    )
    before = {n: p.detach().clone() for n, p in module.named_trainable()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = trainer.train_step(Batch(images * float("nan"), [(96, 96)] * 2, targets, [1, 2]))
    assert out["skipped"] and trainer.state.skipped == 1 and trainer.state.step == 1
    assert all(torch.equal(before[n], p) for n, p in module.named_trainable())
    out = trainer.train_step(Batch(images, [(96, 96)] * 2, targets, [1, 2]))
    assert not out["skipped"] and trainer.state.skipped == 1
    assert any(not torch.equal(before[n], p) for n, p in module.named_trainable())


# --------------------------------------------------------------------------- checkpoints


def test_training_state_round_trip_one_resumable_state_and_corrupt_last(tmp_path):
    from glip_transfer.checkpoint import CheckpointError
    from glip_transfer.training.state import load_last, load_state_file, rng_state, save_last, set_rng_state

    t1 = {"param/a": torch.arange(6.0).reshape(2, 3), "optim/0/step": torch.tensor(3.0)}
    save_last(tmp_path, t1, {"step": 1})
    t2 = {"param/a": torch.ones(2, 3), "optim/0/step": torch.tensor(4.0)}
    save_last(tmp_path, t2, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # one resumable state, no last.prev
    tensors, state, path = load_last(tmp_path)
    assert state == {"step": 2} and torch.equal(tensors["param/a"], t2["param/a"]) and path.name == "last.safetensors"
    raw = bytearray((tmp_path / "last.safetensors").read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the tensor data: the checksum catches it
    (tmp_path / "last.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch.*cannot be resumed; start it again with --force"):
        load_last(tmp_path)
    # a run folder of an earlier version, with last.prev beside a corrupt last: it falls back
    save_last(tmp_path / "old", t1, {"step": 1})
    (tmp_path / "old" / "last.safetensors").rename(tmp_path / "old" / "last.prev.safetensors")
    (tmp_path / "old" / "last.safetensors").write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="falling back"):
        tensors, state, path = load_last(tmp_path / "old")
    assert state == {"step": 1} and path.name == "last.prev.safetensors"
    save_last(tmp_path / "old", t2, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["last.safetensors"]
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError):
        load_state_file(tmp_path / "trunc.safetensors")
    rt, rj = rng_state()
    first = (torch.rand(3), random.random())
    set_rng_state(rt, json.loads(json.dumps(rj)))
    assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1]


# --------------------------------------------------------------------------- artifacts


def test_prompt_artifact_for_glip_t_sizes_is_under_one_megabyte(tmp_path):
    from safetensors import safe_open

    from glip_transfer.training.artifacts import save_prompt_artifact

    lang = variant_config("glip-t").language
    offset = torch.randn(lang.max_query_len, lang.hidden_size)
    path = save_prompt_artifact(
        tmp_path / "prompt.safetensors",
        offset,
        caption="fish. jellyfish. penguin",
        recipe="odinw13/aquarium",
        base="ab" * 32,
    )
    assert path.stat().st_size < 1_000_000 and path.stat().st_size >= 256 * 768 * 4
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert (
        meta["caption"] == "fish. jellyfish. penguin"
        and meta["recipe"] == "odinw13/aquarium"
        and meta["base_sha256"] == "ab" * 32
    )


def test_load_adapter_checks_base_and_caption(tmp_path):
    from glip_transfer.training.artifacts import (
        AdapterError,
        ArtifactKind,
        apply_adapter,
        load_adapter,
        save_prompt_artifact,
        save_weights_artifact,
        state_sha256,
    )

    model = tiny()
    base = state_sha256(model)
    base_keys = set(model.state_dict())
    offset = torch.randn(256, 32)
    path = save_prompt_artifact(tmp_path / "prompt.safetensors", offset, caption="red. blue", recipe=None, base=base)
    assert load_adapter(model, path, base_hash=base, caption="red. blue") is ArtifactKind.PROMPT
    assert torch.equal(model.prompt_offset.weight, offset) and not model.prompt_offset.weight.requires_grad
    assert set(model.state_dict()) - base_keys == {"rpn.tunable_linear.weight"}
    assert state_sha256(model) == base  # the base identity ignores what adapters add
    with pytest.raises(AdapterError, match="made for base weights") as e:
        load_adapter(model, path, base_hash="0" * 64, caption="red. blue")
    assert "\n" not in str(e.value)
    with pytest.raises(AdapterError, match="trained for the caption"):
        load_adapter(model, path, base_hash=base, caption="red. green")
    model2 = apply_adapter(tiny(), tmp_path, weights=None, captions=["red. blue"])  # a run folder works too
    assert torch.equal(model2.prompt_offset.weight, offset)
    with pytest.raises(AdapterError, match="one caption"):
        apply_adapter(tiny(), path, captions=["a", "b"])
    with pytest.raises(AdapterError, match="made for base weights"):
        apply_adapter(tiny(seed=1), path, captions=["red. blue"])
    # changed-weights artifact: applied in place
    w = {"rpn.head.bias0": torch.tensor([1.5])}
    wpath = save_weights_artifact(
        tmp_path / "w" / "weights.safetensors", w, mode="linear", caption="red. blue", recipe=None, base=base
    )
    m = tiny()
    with pytest.warns(UserWarning, match="used with"):
        assert load_adapter(m, wpath, base_hash=base, caption="other") is ArtifactKind.WEIGHTS
    assert m.rpn.head.bias0.item() == 1.5 and m.prompt_offset is None
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(m, tmp_path / "nope", base_hash=None, caption=None)


def test_adapter_of_another_variant_is_refused_naming_both(tmp_path):
    """A glip-nano adapter on GLIP-T weights (here: test-tiny) is refused before anything is applied."""
    from glip_transfer.training.artifacts import AdapterError, load_adapter, save_prompt_artifact

    path = save_prompt_artifact(tmp_path / "prompt.safetensors", torch.zeros(256, 32), caption="heart", recipe=None,
                                base="ab" * 32, extra={"variant": "glip-nano"})  # fmt: skip
    model = tiny()
    with pytest.raises(AdapterError, match="made for glip-nano, not test-tiny") as e:
        load_adapter(model, path, base_hash=None, caption=None)
    assert "\n" not in str(e.value) and model.prompt_offset is None


def test_prompt_artifact_written_by_earlier_versions_still_applies(tmp_path):
    """The prompt.safetensors format, written here byte for byte as earlier versions wrote it."""
    from safetensors.torch import save_file

    from glip_transfer.training.artifacts import apply_adapter, state_sha256

    model = tiny()
    offset = torch.randn(256, 32)
    meta = {
        "format": "glip-transfer-adapter",
        "mode": "prompt",
        "caption": "red. blue",
        "recipe": "",
        "base_sha256": state_sha256(model),
        "variant": "test-tiny",
        "shots": "0",
    }
    save_file({"prompt_offset": offset}, str(tmp_path / "prompt.safetensors"), metadata=meta)
    apply_adapter(model, tmp_path, captions=["red. blue"])
    assert torch.equal(model.prompt_offset.weight, offset)


def test_checkpoints_of_earlier_versions_name_the_prompt_offset_as_they_did():
    from glip_transfer.training.state import trained_tensors

    saved = {"param/prompt_offset": torch.ones(2, 3), "param/rpn.head.bias0": torch.zeros(1)}
    got = trained_tensors(saved, "param/", ["rpn.tunable_linear.weight", "rpn.head.bias0", "missing"])
    assert set(got) == {"rpn.tunable_linear.weight", "rpn.head.bias0"} and got["rpn.tunable_linear.weight"].sum() == 6


def test_prompt_offset_is_applied_by_the_model_forward():
    """Adding the offset to the text features by hand gives what the model with the offset computes."""
    model = tiny().eval()
    images, _, ids, mask = _batch()
    offset = torch.randn(256, 32)
    text = model.encode_text(ids, mask)
    with torch.no_grad():
        by_hand, _ = model(images, text.with_offset(offset))
        model.set_prompt_offset(offset)
        inside, _ = model(images, text)
    for a, b in zip(by_hand.token_logits, inside.token_logits):
        assert torch.equal(a, b)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        model.set_grad_checkpointing(checkpointing)
        plan = apply_mode(model, "full", TrainConfig(dropout=0.0))
        module = TrainModule(model, plan)
        set_train_modes(model, plan, True)
        images, targets, ids, mask = _batch()
        sum(module(images, targets, ids, mask).values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def count_forward_calls(modules) -> list[int]:
    """Forward calls of each module, counted by pre-hooks (a recompute in the backward pass counts
    too; it may stop early, before a forward hook would run)."""
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("setting, calls", [([], 1), (["model.head.gradient_checkpointing=true"], 2)])
def test_gradient_checkpointing_setting_recomputes_head_and_swin_in_backward(
    rect_data, vocab_dir, tmp_path, setting, calls
):
    """``--set model.head.gradient_checkpointing=true`` reaches the model a run trains: every
    fusion layer and DyConv of the head and every Swin block of the stages that train runs a
    second time, in the backward pass."""
    from glip_transfer.model.fusion import VLFuse
    from glip_transfer.model.head import DyConv
    from glip_transfer.model.swin import SwinTransformerBlock
    from glip_transfer.training.data import Collate
    from glip_transfer.training.run import RunSpec, prepare

    ann, images = rect_data
    spec = RunSpec(
        mode="full",
        ann=ann,
        images=images,
        variant="test-tiny",
        tokenizer=str(vocab_dir),
        batch_size=2,
        sets=["train.min_sizes=[96]", "train.max_size=128", "train.dropout=0.0", *setting],
    )
    prep = prepare(spec)
    model = prep.model
    assert model.rpn.head.grad_checkpointing == (calls == 2)
    head_layers = [m for m in model.rpn.head.dyhead_tower if isinstance(m, (VLFuse, DyConv))]
    blocks = [
        m for layer in model.backbone.body.layers[1:] for m in layer.modules() if isinstance(m, SwinTransformerBlock)
    ]
    counts = count_forward_calls(head_layers + blocks)  # stage 1 is frozen (train.freeze_backbone_at=2): no backward
    trainer = Trainer(
        prep.module,
        prep.cfg,
        prep.dataset,
        device=torch.device("cpu"),
        out_dir=tmp_path,
        prompt=prep.prompt,
        progress=False,
    )
    set_train_modes(model, prep.plan, True)
    out = trainer.train_step(Collate()([prep.dataset[0], prep.dataset[1]]))
    assert math.isfinite(out["loss"]) and not out["skipped"]
    assert counts == [calls] * len(counts), counts


def test_resume_decision_applies_only_what_decides_the_future():
    from glip_transfer.training.config import TrainConfig, resume_decision

    diff = {"train.epochs": (3, 4), "train.workers": (0, 2), "train.lr": (1e-4, 1e-3), "data.shots": (0, 5)}
    applied, refused = resume_decision(diff, TrainConfig(schedule="plateau"))
    assert set(applied) == {"train.epochs", "train.workers"} and set(refused) == {"train.lr", "data.shots"}
    # milestones given as fractions of the run: its length decides the schedule already followed
    applied, refused = resume_decision(diff, TrainConfig(schedule="multistep", milestones=(0.67, 0.89)))
    assert set(applied) == {"train.workers"} and set(refused) == {"train.epochs", "train.lr", "data.shots"}
    applied, _ = resume_decision({"train.epochs": (3, 4)}, TrainConfig(schedule="multistep", milestones=(100, 200)))
    assert set(applied) == {"train.epochs"}


def test_settings_that_change_no_weight_are_no_change_on_resume():
    from glip_transfer.config import ConfigError
    from glip_transfer.provenance import TRAINING, changes, identity
    from glip_transfer.training.config import TrainConfig, apply_train_overrides

    saved = {"model": {"head": {"gradient_checkpointing": False}}, "evaluation": {"batch_size": 1, "min_size": 800}}
    now = {"model": {"head": {"gradient_checkpointing": True}}, "evaluation": {"batch_size": 4, "min_size": 800}}
    assert changes(identity(saved, TRAINING), identity(now, TRAINING)) == {}
    now["evaluation"]["min_size"] = 600  # decides validation AP, hence the best weights
    assert changes(identity(saved, TRAINING), identity(now, TRAINING)) == {"evaluation.min_size": (800, 600)}
    moved = r"train.eval_batch_size is now evaluation.batch_size.*--set evaluation.batch_size=2"
    with pytest.raises(ConfigError, match=moved):
        apply_train_overrides(TrainConfig(), ["eval_batch_size=2"])
