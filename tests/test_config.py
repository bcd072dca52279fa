import pytest

from glip_transfer.config import (
    ConfigError,
    GLIPConfig,
    from_dict,
    override_dataclass,
    parse_override,
    to_dict,
    variant_config,
)


def test_round_trip_of_every_variant():
    for name in ("glip-t", "glip-t-a", "glip-l", "test-tiny"):
        cfg = variant_config(name)
        assert from_dict(GLIPConfig, to_dict(cfg)) == cfg


def test_overrides_are_typed_and_checked():
    cfg = override_dataclass(
        variant_config("glip-t"), ["postprocess.nms_thresh=0.5", "head.num_convs=8", "swin.depths=[2,2,18,2]"]
    )
    assert cfg.postprocess.nms_thresh == 0.5 and cfg.head.num_convs == 8 and cfg.swin.depths == (2, 2, 18, 2)
    assert parse_override("train.lr=2e-4") == (["train", "lr"], 2e-4)
    assert parse_override("a=text") == (["a"], "text")
    with pytest.raises(ConfigError, match="unknown key 'nms'"):
        override_dataclass(variant_config("glip-t"), ["postprocess.nms=0.5"])
    with pytest.raises(ConfigError, match="expected a whole number"):
        override_dataclass(variant_config("glip-t"), ["head.num_convs=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("postprocess.nms_thresh")


def test_unknown_variant():
    with pytest.raises(ConfigError, match="unknown variant"):
        variant_config("glip-xl")


def test_literal_fields_accept_only_their_choices():
    from dataclasses import dataclass
    from typing import Literal

    @dataclass
    class Choice:
        optimizer: Literal["adamw", "sgd"] = "adamw"

    assert from_dict(Choice, {"optimizer": "sgd"}).optimizer == "sgd"
    with pytest.raises(ConfigError, match=r"^train.optimizer: 'adam' is not one of adamw, sgd$"):
        from_dict(Choice, {"optimizer": "adam"}, "train")


def test_split_overrides_routes_by_section():
    from glip_transfer.config import split_overrides

    got = split_overrides(
        ["train.lr=1e-3", " model.head.gradient_checkpointing=true", "evaluation.min_size=600"], ("train", "model")
    )
    assert got == {
        "train": ["lr=1e-3"],
        "model": ["head.gradient_checkpointing=true"],
        "recipe": ["evaluation.min_size=600"],
    }
    assert split_overrides(None, ("model",)) == {"model": [], "recipe": []}
