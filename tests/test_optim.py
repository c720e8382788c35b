"""The optimizer against hand computations: schedule, weight-decay mask, AdamW, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from polyjax import optim
from polyjax.activations import ActivationConfig
from polyjax.layers import FFN, NoDecayParam
from polyjax.model import ModelConfig, Transformer, preset


def test_schedule_matches_hand_values():
    cfg = optim.OptimConfig(lr=1.0, final_lr=0.1, warmup_steps=4)
    sched = optim.lr_schedule(cfg, total_steps=14)  # cosine over steps 4..13
    cosine = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 9))
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 7: cosine(7), 9: cosine(9), 13: 0.1, 20: 0.1}
    for step, value in expected.items():
        assert float(sched(step)) == pytest.approx(value, rel=1e-6), step


def test_schedule_without_warmup_starts_at_peak():
    sched = optim.lr_schedule(optim.OptimConfig(lr=2.0, final_lr=0.0, warmup_steps=0), 3)
    np.testing.assert_allclose([float(sched(s)) for s in range(3)], [2.0, 1.0, 0.0], atol=1e-6)


class Block(nnx.Module):
    """A norm scale, a bias and a PolyNorm FFN (matrices + coefficients)."""

    def __init__(self, rngs):
        self.norm = NoDecayParam(jnp.ones((4,)), axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((4,)), axes=("embed",))
        init = nnx.initializers.normal(0.5)
        self.ffn = FFN(4, 8, ActivationConfig("polynorm"), init=init, rngs=rngs)


def _params():
    return nnx.split(Block(nnx.Rngs(0)), nnx.Param, ...)[1]


def test_decay_mask_excludes_coefficients_norms_and_biases():
    mask = nnx.to_flat_state(optim.decay_mask(_params()))
    got = {"/".join(map(str, path)): bool(v.get_value()) for path, v in mask}
    assert got == {
        "bias": False,
        "norm": False,
        "ffn/act/coeffs/bias": False,
        "ffn/act/coeffs/weight": False,
        "ffn/w_in": True,
        "ffn/w_out": True,
    }


def test_decay_mask_on_the_transformer():
    cfg = ModelConfig.from_dict(preset("dense", "tiny", "polynorm"))
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    decayed = {
        "/".join(map(str, path))
        for path, v in nnx.to_flat_state(optim.decay_mask(params))
        if v.get_value()
    }
    every = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(params)}
    assert decayed == {
        p
        for p in every
        if p.split("/")[-1] in ("embed", "head", "w_in", "w_out", "w_q", "w_k", "w_v", "w_o")
    }
    assert any("coeffs" in p for p in every - decayed) and any("norm" in p for p in every - decayed)


def _one_step(cfg, params, grads):
    tx = optim.make_optimizer(cfg, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return jax.tree.map(jnp.add, params, updates)


def test_first_adamw_step_matches_hand_computation():
    cfg = optim.OptimConfig(lr=0.1, final_lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0)
    params = _params()
    grads = jax.tree.map(
        lambda x: jnp.full_like(x, 0.01) * (1 + jnp.arange(x.size).reshape(x.shape) % 3), params
    )
    new = _one_step(cfg, params, grads)
    mask = optim.decay_mask(params)
    for (path, p), (_, g), (_, n), (_, m) in zip(
        *(nnx.to_flat_state(t) for t in (params, grads, new, mask)), strict=True
    ):
        p, g, n = (np.asarray(v.get_value(), np.float64) for v in (p, g, n))
        # step 1: m_hat = g, v_hat = g^2 -> g / (|g| + eps); decoupled decay lr * wd * p
        adam = g / (np.abs(g) + cfg.eps)
        decay = cfg.weight_decay * p if m.get_value() else 0.0
        np.testing.assert_allclose(
            n, p - cfg.lr * (adam + decay), rtol=1e-6, atol=1e-7, err_msg=str(path)
        )


def test_clipping_matches_hand_computation():
    # b1 = b2 = 0 and a large eps make the first update g_clipped / (|g_clipped| + eps),
    # so the scale of the clipped gradient is visible.
    cfg = optim.OptimConfig(
        lr=1.0, final_lr=1.0, warmup_steps=0, b1=0.0, b2=0.0, eps=10.0, weight_decay=0.0
    )
    params = {"w": nnx.Param(jnp.zeros((2, 2)))}
    params = nnx.State(params)
    g = np.array([[3.0, 0.0], [0.0, 4.0]], np.float32)  # global norm 5 -> scaled by 1/5
    grads = nnx.State({"w": nnx.Param(jnp.asarray(g))})
    new = np.asarray(_one_step(cfg, params, grads)["w"].get_value())
    gc = g / 5.0
    np.testing.assert_allclose(new, -gc / (np.abs(gc) + 10.0), rtol=1e-6)
    unclipped = optim.OptimConfig(**{**cfg.__dict__, "clip_norm": 0.0})
    new = np.asarray(_one_step(unclipped, params, grads)["w"].get_value())
    np.testing.assert_allclose(new, -g / (np.abs(g) + 10.0), rtol=1e-6)


@pytest.mark.parametrize(
    "field,value", [("lr", 0.0), ("b2", 1.0), ("grad_accum", 0), ("mu_dtype", "float16")]
)
def test_bad_optim_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        optim.OptimConfig(**{field: value})


def test_unknown_optim_field():
    with pytest.raises(ValueError, match="lrr"):
        optim.OptimConfig.from_dict({"lrr": 1.0})
