import csv

import pytest
import torch

from glip_transfer.checkpoint import CheckpointError, detect_variant, load_model, read_state_dict, save_model
from glip_transfer.config import variant_config
from glip_transfer.model.glip import build_glip


def manifest(reference_dir, name):
    with open(reference_dir / name, encoding="utf-8") as f:
        return {r["model_key"]: r["shape"] for r in csv.DictReader(f, delimiter="\t")}


def shapes(model):
    return {k: "x".join(map(str, v.shape)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "variant,file,count", [("glip-t", "glip_tiny_state_dict.tsv", 745), ("glip-l", "glip_large_state_dict.tsv", 1021)]
)
def test_state_dict_equals_official_manifest(reference_dir, variant, file, count):
    expected = manifest(reference_dir, file)
    assert len(expected) == count
    with torch.device("meta"):
        model = build_glip(variant_config(variant))
    assert shapes(model) == expected


def test_glip_t_a_has_no_fusion_layers():
    with torch.device("meta"):
        model = build_glip(variant_config("glip-t-a"))
    keys = model.state_dict().keys()
    assert not any(".b_attn." in k for k in keys)
    assert "rpn.head.dyhead_tower.5.DyConv.0.conv.weight" in keys
    assert detect_variant(model.state_dict()) == "glip-t-a"


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_glip(variant_config("test-tiny")).eval()


def official_file(model, path, extra_keys=True):
    state = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    if extra_keys:
        state["module.language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
    blob = {"model": state}
    if extra_keys:
        blob.update(optimizer={"state": {}, "param_groups": [{"lr": 0.1}]}, scheduler={"last_epoch": 3}, iteration=1234)
    torch.save(blob, path)
    return path


def test_official_layout_loads_with_nothing_missing(tmp_path, tiny_model):
    path = official_file(tiny_model, tmp_path / "glip_tiny_official.pth")
    model, report = load_model(path, variant="test-tiny")
    assert report.ok and not report.missing and not report.unexpected
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_variant_is_detected_from_keys(tmp_path, tiny_model):
    path = official_file(tiny_model, tmp_path / "w.pth")
    model, _ = load_model(path)
    assert model.cfg.variant == "test-tiny"


def test_other_variant_gives_clear_report_with_hint(tmp_path, tiny_model):
    path = official_file(tiny_model, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(path, variant="glip-t")
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit" in message and "looks like test-tiny" in message


def test_missing_and_unexpected_keys_are_reported(tmp_path, tiny_model):
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("rpn.head.bias0")}
    state["rpn.head.something_else"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="1 missing: rpn.head.bias0; 1 unexpected: rpn.head.something_else"):
        load_model(tmp_path / "w.pth", variant="test-tiny")


def test_truncated_checkpoint_is_one_line_error(tmp_path, tiny_model):
    path = official_file(tiny_model, tmp_path / "w.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_state_dict(path)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        read_state_dict(tmp_path / "nope.pth")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_state_dict(path)


def test_ema_weights_on_request(tmp_path, tiny_model):
    state = {"module." + k: v for k, v in tiny_model.state_dict().items()}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": state, "model_ema": ema}, tmp_path / "w.pth")
    model, _ = load_model(tmp_path / "w.pth", use_ema=True)
    key = "rpn.head.bias0"
    assert torch.allclose(model.state_dict()[key], tiny_model.state_dict()[key] + 1)
    with pytest.raises(CheckpointError, match="model_ema"):
        torch.save({"model": state}, tmp_path / "w2.pth")
        read_state_dict(tmp_path / "w2.pth", use_ema=True)


def test_other_cls_logits_size_is_tolerated(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state["rpn.head.cls_logits.weight"] = torch.zeros(1, state["rpn.head.cls_logits.weight"].shape[1], 1, 1)
    state["rpn.head.cls_logits.bias"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "w.pth")
    model, report = load_model(tmp_path / "w.pth")
    assert report.adapted == ["rpn.head.cls_logits.bias", "rpn.head.cls_logits.weight"]


def test_safetensors_round_trip_keeps_config(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path, metadata={"note": "x"})
    model, report = load_model(path)
    assert report.ok and model.cfg == tiny_model.cfg
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    assert not list(tmp_path.glob("*.tmp"))


def test_legacy_format_is_read_without_memory_mapping(tmp_path, tiny_model):
    """Files written before torch's zip format cannot be memory-mapped: read whole, same weights."""
    path = tmp_path / "legacy.pth"
    torch.save({"model": {"module." + k: v for k, v in tiny_model.state_dict().items()}}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    model, report = load_model(path)
    assert report.ok
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_model.state_dict().items())


def test_loaded_model_is_complete_and_float32(tmp_path, tiny_model):
    """Parameters come from the file (nothing left on the meta device), buffers that no file holds
    (BERT's position ids) are built, a float16 file is cast back to the model's float32."""
    from glip_transfer.checkpoint import convert_checkpoint

    path = official_file(tiny_model, tmp_path / "w.pth")
    half = convert_checkpoint(path, tmp_path / "h.safetensors", half=True).path
    for source in (path, half):
        model, _ = load_model(source)
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        assert not [k for k, t in tensors.items() if t.is_meta]
        assert {t.dtype for t in model.parameters()} == {torch.float32}
        ids = model.language_backbone.body.model.embeddings.position_ids
        assert torch.equal(ids.flatten()[:5], torch.arange(5))
