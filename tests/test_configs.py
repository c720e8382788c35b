"""The config files: every activation and size loads and validates; the 1B ones
build abstractly with the paper's parameter counts."""

import pathlib

import pytest

from polyjax import activations as acts
from polyjax import config as pc
from polyjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["dense", "moe"])
@pytest.mark.parametrize("size", ["tiny", "small", "1b"])
def test_every_activation_loads(family, size):
    for act in acts.REGISTRY:
        cfg = pc.load(f"{ROOT}/configs/{family}.py:act={act},size={size}")
        spec = train.Spec.from_config(cfg)
        assert spec.model.activation.name == act
        if spec.data.tokenizer == "bpe":
            assert spec.model.vocab_size >= spec.data.vocab_size


def test_default_config():
    spec = train.Spec.from_config(pc.load(f"{ROOT}/configs/default.py"))
    assert spec.model.activation.name == "polynorm" and spec.model.moe is None
    assert (spec.data.source, spec.data.tokenizer) == ("shakespeare", "bpe")


def test_unknown_size():
    with pytest.raises(ValueError, match="size"):
        pc.load(f"{ROOT}/configs/dense.py:size=7b")


@pytest.mark.parametrize(
    "family,act", [("dense", "polynorm"), ("dense", "swiglu"), ("moe", "polynorm")]
)
def test_1b_builds_abstractly(family, act):
    spec = train.Spec.from_config(pc.load(f"{ROOT}/configs/{family}.py:act={act},size=1b"))
    text = train.plan(spec)
    assert "sharding plan" in text
