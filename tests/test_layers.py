"""NNX modules: coefficient init and marking, the FFN against a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from polyjax import activations as acts
from polyjax.layers import FFN, Activation, NoDecayParam, PolyCoeffs


def test_polycoeffs_paper_init_shared_and_per_expert():
    c = PolyCoeffs(3)
    np.testing.assert_allclose(c.weight[...], [1 / 3] * 3)
    np.testing.assert_array_equal(c.bias[...], [0.0])
    e = PolyCoeffs(4, num_sets=8)
    assert e.weight[...].shape == (8, 4) and e.bias[...].shape == (8, 1)
    np.testing.assert_allclose(e.weight[...], np.full((8, 4), 0.25))
    assert e.weight.get_metadata()["axes"] == ("expert", None)
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        PolyCoeffs(0)


def _ffn(name, d_ff, **kw):
    init = nnx.initializers.normal(0.02)
    return FFN(16, d_ff, acts.ActivationConfig(name, **kw), init=init, rngs=nnx.Rngs(0))


def test_coefficients_are_no_decay_and_matrices_are_params():
    ffn = _ffn("polynorm", 48)
    no_decay = nnx.state(ffn, NoDecayParam)
    assert {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(no_decay)} == {
        "act/coeffs/weight",
        "act/coeffs/bias",
    }
    params = nnx.state(ffn, nnx.Param)
    assert len(nnx.to_flat_state(params)) == 4  # two matrices + two coefficient arrays


@pytest.mark.parametrize("name", ["polynorm", "polyrelu", "relu2", "swiglu", "polynorm_glu"])
def test_ffn_matches_hand_computation(name):
    ffn = _ffn(name, 24)
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    h = x @ ffn.w_in[...]
    w, b = acts.init_coeffs(3)
    ref_act = {
        "polynorm": lambda h: acts.polynorm(h, w, b),
        "polyrelu": lambda h: acts.polyrelu(h, w, b),
        "relu2": acts.relu2,
        "swiglu": lambda h: acts.silu(h) * (x @ ffn.w_up[...]),
        "polynorm_glu": lambda h: acts.polynorm(h, w, b) * (x @ ffn.w_up[...]),
    }[name]
    np.testing.assert_allclose(ffn(x), ref_act(h) @ ffn.w_out[...], rtol=1e-5, atol=1e-6)


def test_equal_parameter_widths_give_equal_counts():
    def count(m):
        return sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))

    base = 96
    gated = _ffn("swiglu", acts.ffn_width(base, gated=True))
    plain = _ffn("polynorm", base)
    assert count(gated) == count(plain) - 4  # PolyNorm adds its 4 coefficients


def test_bf16_compute_keeps_fp32_params():
    ffn = FFN(
        16,
        32,
        acts.ActivationConfig("polynorm"),
        init=nnx.initializers.normal(0.02),
        dtype=jnp.bfloat16,
        rngs=nnx.Rngs(0),
    )
    y = ffn(jnp.ones((1, 3, 16)))
    assert y.dtype == jnp.bfloat16 and ffn.w_in[...].dtype == jnp.float32


def test_rrelu_module_random_in_training_deterministic_in_eval():
    mod = Activation(acts.ActivationConfig("rrelu"), rngs=nnx.Rngs(activation=0))
    x = -jnp.ones((1000,))
    assert not np.allclose(mod(x), mod(x))
    mod.deterministic = True
    np.testing.assert_array_equal(mod(x), mod(x))
