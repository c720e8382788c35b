"""The config files: every activation and size loads and validates; the 1B ones
build abstractly, sharded over the whole mesh."""

import numpy as np
import pytest
from flax import nnx

import launch
from configs import common, default, dense, moe
from experiments import ladder
from polyjax import activations as acts
from polyjax.config import Spec
from polyjax.model import Transformer, flops_per_token, param_counts

FAMILIES = {"dense": dense, "moe": moe}


@pytest.mark.parametrize("family", ["dense", "moe"])
@pytest.mark.parametrize(
    "size", ["tiny", "cpu", "small", "gpu", "1b", *common.LADDER, *common.LADDER_NEXT]
)
def test_every_activation_loads(family, size):
    for act in acts.REGISTRY:
        spec = Spec.from_config(FAMILIES[family].get_config(f"act={act},size={size}"))
        assert spec.model.activation.name == act
        if spec.data.tokenizer == "bpe":
            assert spec.model.vocab_size >= spec.data.vocab_size


def test_default_config():
    spec = Spec.from_config(default.get_config())
    assert spec.model.activation.name == "polynorm" and spec.model.moe is None
    assert (spec.data.source, spec.data.tokenizer) == ("shakespeare", "bpe")


def test_cpu_size_is_the_small_model_narrowed():
    small, cpu = (dense.get_config(f"size={s}").to_dict() for s in ("small", "cpu"))
    assert (cpu["model"]["d_model"], cpu["model"]["n_heads"]) == (128, 4)
    assert cpu["model"]["d_ff"] == small["model"]["d_ff"]  # the FFN keeps its width
    assert (cpu["data"]["seq_len"], cpu["data"]["global_batch"]) == (128, 16)
    assert (cpu["train"]["steps"], cpu["train"]["eval_every"]) == (300, 50)


def test_ladder_starts_at_the_cpu_shape_and_spans_30x_in_compute():
    """Rung 0 is the cpu size's model (its vocabulary aside); parameters and tokens
    grow together up the rungs, the top >= 30x rung 0 in training FLOPs, within one
    pass over the ladder corpus; every rung evaluates on the same held-out batches."""
    for act in ("swiglu", "polynorm"):
        cpu = dense.get_config(f"act={act},size=cpu").model.to_dict()
        rung0 = dense.get_config(f"act={act},size=ladder0").model.to_dict()
        assert {k: v for k, v in rung0.items() if k not in ("vocab_size",)} == {
            k: v for k, v in cpu.items() if k not in ("vocab_size",)
        }
    compute, params, tokens, evals = [], [], [], set()
    for size in common.LADDER:
        cfg = dense.get_config(f"act=polynorm,size={size}")
        spec = Spec.from_config(cfg)
        tokens.append(cfg.train.steps * cfg.data.global_batch * cfg.data.seq_len)
        params.append(param_counts(spec.model)["total"])
        compute.append(flops_per_token(spec.model, cfg.data.seq_len) * tokens[-1])
        evals.add(
            (cfg.data.source, cfg.data.seq_len, cfg.data.global_batch, cfg.train.eval_batches)
        )
    assert params == sorted(params) and tokens == sorted(tokens) and compute == sorted(compute)
    assert compute[-1] / compute[0] >= 30
    assert tokens[-1] < 0.95 * 57e6  # the corpus's training split: no rung repeats its data
    assert len(evals) == 1
    # the next rung (an accelerator's, not in the default ladder) keeps the recipe:
    # the cpu shape grown together, tokens in proportion to the FLOPs per token
    per_flop = [t / (c / t) for t, c in zip(tokens, compute, strict=True)]  # t / (C / t)
    for size in common.LADDER_NEXT:
        cfg = dense.get_config(f"act=polynorm,size={size}")
        spec = Spec.from_config(cfg)
        t = cfg.train.steps * cfg.data.global_batch * cfg.data.seq_len
        fpt = flops_per_token(spec.model, cfg.data.seq_len)
        assert t / fpt == pytest.approx(np.mean(per_flop), rel=0.02)
        assert spec.model.n_layers == spec.model.n_heads == spec.model.d_model // 32
        assert fpt * t > 5 * compute[-1] and t < 0.95 * 57e6
        assert size not in [r.name for r in ladder.rungs_of(None)]
        assert [r.name for r in ladder.rungs_of(f"ladder3,{size}")] == ["ladder3", size]


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_1b_reads_a_token_store_and_its_tokenizer(family):
    data = FAMILIES[family].get_config("size=1b").data
    store = data.source.removeprefix("tokens:")
    assert data.source.startswith("tokens:") and data.tokenizer == f"{store}/tokenizer.json"


def test_gpu_size_keeps_parameters_equal_across_activations():
    """The gpu size's own FFN widths follow the equal-parameter rule: SwiGLU's
    three matrices hold as many parameters as the two of an ungated FFN (within
    the rounding to 32), dense and per MoE expert."""
    for family in ("dense", "moe"):
        counts = {
            act: param_counts(
                Spec.from_config(FAMILIES[family].get_config(f"act={act},size=gpu")).model
            )
            for act in ("swiglu", "polynorm")
        }
        swiglu, polynorm = counts["swiglu"]["total"], counts["polynorm"]["total"]
        assert abs(swiglu - polynorm) / polynorm < 0.01


def test_unknown_size():
    with pytest.raises(ValueError, match="size"):
        dense.get_config("size=7b")


@pytest.mark.parametrize(
    "family,act", [("dense", "polynorm"), ("dense", "swiglu"), ("moe", "polynorm")]
)
def test_1b_builds_abstractly(family, act):
    """The plan lists every parameter of the model; on the 1B mesh (fsdp over all
    eight devices; the MoE's experts over 8 of them, fsdp over the rest) each one
    with an ``embed`` axis is sharded over ``fsdp``."""
    spec = Spec.from_config(FAMILIES[family].get_config(f"act={act},size=1b"))
    shape = dict(spec.mesh.shape)
    assert (shape["fsdp"], shape["expert"]) == ((8, 1) if family == "dense" else (1, 8))
    text = launch.plan(spec)
    rows = {r.split()[0]: r for r in text.split("sharding plan")[1].splitlines()[2:]}
    abstract = nnx.eval_shape(lambda: Transformer(spec.model, rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    assert len(rows) == len(params)
    for path, var in params:
        row = rows["/".join(map(str, path))]
        assert str(tuple(var.get_value().shape)) in row
        if "embed" in var.get_metadata()["axes"]:
            assert "'fsdp'" in row.split("->")[1], row
