"""The activation core against textbook definitions, Lemma 1 and closed-form gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyjax import activations as acts

GRID = np.linspace(-6.0, 6.0, 241).astype(np.float32)
_erf = np.vectorize(math.erf)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


TEXTBOOK = {
    "relu": lambda x: np.maximum(x, 0),
    "relu2": lambda x: np.maximum(x, 0) ** 2,
    "relu6": lambda x: np.minimum(np.maximum(x, 0), 6),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "tanh": lambda x: (np.exp(x) - np.exp(-x)) / (np.exp(x) + np.exp(-x)),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "mish": lambda x: x * np.tanh(np.log1p(np.exp(x))),
    "sigmoid": _np_sigmoid,
    "silu": lambda x: x * _np_sigmoid(x),
    "elu": lambda x: np.where(x > 0, x, np.exp(x) - 1),
    "celu": lambda x: np.maximum(0, x) + np.minimum(0, np.exp(x) - 1),
    "gelu": lambda x: x * 0.5 * (1 + _erf(x / np.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
}


@pytest.mark.parametrize("name", sorted(TEXTBOOK))
def test_table4_matches_textbook(name):
    got = acts.apply(acts.ActivationConfig(name=name), jnp.asarray(GRID))
    np.testing.assert_allclose(got, TEXTBOOK[name](GRID.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_softplus_elu_celu_constants():
    x = GRID.astype(np.float64)
    np.testing.assert_allclose(
        acts.softplus(GRID, beta=2.0), np.log1p(np.exp(2 * x)) / 2, rtol=1e-5
    )
    np.testing.assert_allclose(
        acts.elu(GRID, 0.5), np.where(x > 0, x, 0.5 * (np.exp(x) - 1)), atol=1e-6
    )
    np.testing.assert_allclose(
        acts.celu(GRID, 2.0), np.maximum(0, x) + np.minimum(0, 2 * (np.exp(x / 2) - 1)), atol=1e-6
    )


def test_gated_and_learnable_slopes():
    rng = np.random.default_rng(0)
    g, u = rng.normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_allclose(acts.glu(g, u), _np_sigmoid(g) * u, rtol=1e-5)
    np.testing.assert_allclose(acts.swiglu(g, u), g * _np_sigmoid(g) * u, rtol=1e-5)
    np.testing.assert_allclose(acts.prelu(GRID, 0.3), np.where(GRID >= 0, GRID, 0.3 * GRID))


def test_rrelu_random_in_training_mean_in_eval():
    x = -jnp.ones((10000,))
    lo, hi = acts.RRELU_LOWER, acts.RRELU_UPPER
    np.testing.assert_allclose(acts.rrelu(x), -(lo + hi) / 2 * np.ones(10000), rtol=1e-6)
    slopes = -np.asarray(acts.rrelu(x, jax.random.key(0)))
    assert slopes.min() >= lo and slopes.max() <= hi
    assert abs(slopes.mean() - (lo + hi) / 2) < 0.01 and slopes.std() > 0.05
    np.testing.assert_array_equal(acts.rrelu(jnp.arange(5.0), jax.random.key(1)), np.arange(5.0))


# ---------------------------------------------------------------- Lemma 1


def test_lemma1_relu_and_relu2_are_polyrelu():
    x = jnp.asarray(GRID)
    zero = jnp.zeros((1,))
    np.testing.assert_array_equal(acts.polyrelu(x, jnp.array([1.0, 0.0, 0.0]), zero), acts.relu(x))
    np.testing.assert_allclose(acts.polyrelu(x, jnp.array([0.0, 1.0, 0.0]), zero), acts.relu2(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lemma1_polynomial_is_sum_of_two_polyrelus(seed):
    rng = np.random.default_rng(seed)
    order = 2 + seed
    a = rng.normal(size=order + 1).astype(np.float32)  # a_0 .. a_r
    x = jnp.asarray(GRID / 3)
    poly = sum(a[i] * np.asarray(x, np.float64) ** i for i in range(order + 1))
    w1, b1 = a[1:], a[:1]
    w2 = np.array([(-1) ** i * a[i] for i in range(1, order + 1)], np.float32)
    y = acts.polyrelu(x, w1, b1) + acts.polyrelu(-x, w2, np.zeros(1, np.float32))
    np.testing.assert_allclose(y, poly, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acts.poly(x, w1, b1), poly, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- PolyNorm


def naive_polynorm(x, w, b, eps=1e-6):
    """Written from the definition (docs/kernels.md) independently of polyjax: RMS per power."""
    out = b
    for p in range(1, w.shape[0] + 1):
        xp = x**p
        out = out + w[p - 1] * xp / jnp.sqrt(jnp.mean(xp * xp, axis=-1, keepdims=True) + eps)
    return out


def naive_polyrelu(x, w, b):
    r = jnp.where(x > 0, x, 0.0)
    return b + sum(w[p - 1] * r**p for p in range(1, w.shape[0] + 1))


def closed_form_polynorm_grads(x, w, g, eps=1e-6):
    """The closed form for dx, dw, db (docs/kernels.md, The math)."""
    H = x.shape[-1]
    dx = jnp.zeros_like(x)
    dw = []
    for p in range(1, w.shape[0] + 1):
        xp = x**p
        s = 1.0 / jnp.sqrt(jnp.mean(x ** (2 * p), axis=-1, keepdims=True) + eps)
        gx = jnp.sum(g * xp, axis=-1, keepdims=True)
        dx = dx + w[p - 1] * (p * x ** (p - 1) * s * g - (p / H) * x ** (2 * p - 1) * s**3 * gx)
        dw.append(jnp.sum(s * gx))
    return dx, jnp.stack(dw), jnp.sum(g)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_polynorm_matches_naive_and_closed_form_gradients(order):
    k1, k2, k3 = jax.random.split(jax.random.key(order), 3)
    x = jax.random.normal(k1, (2, 5, 37))
    w = jax.random.normal(k2, (order,))
    b = jnp.array([0.3])
    g = jax.random.normal(k3, x.shape)
    np.testing.assert_allclose(
        acts.polynorm(x, w, b), naive_polynorm(x, w, b), rtol=1e-5, atol=1e-5
    )

    _, vjp = jax.vjp(lambda x, w, b: acts.polynorm(x, w, b), x, w, b)
    dx, dw, db = vjp(g)
    cdx, cdw, cdb = closed_form_polynorm_grads(x, w, g)
    np.testing.assert_allclose(dx, cdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, cdw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, [cdb], rtol=1e-5)
    _, nvjp = jax.vjp(naive_polynorm, x, w, b)
    for got, want in zip((dx, dw, db), nvjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [1, 3, 4])
def test_polyrelu_gradients_match_naive(order):
    k1, k2, k3 = jax.random.split(jax.random.key(10 + order), 3)
    x = jax.random.normal(k1, (4, 33))
    w = jax.random.normal(k2, (order,))
    b = jnp.array([-0.2])
    g = jax.random.normal(k3, x.shape)
    np.testing.assert_allclose(
        acts.polyrelu(x, w, b), naive_polyrelu(x, w, b), rtol=1e-5, atol=1e-6
    )
    _, vjp = jax.vjp(acts.polyrelu, x, w, b)
    _, nvjp = jax.vjp(naive_polyrelu, x, w, b)
    for got, want in zip(vjp(g), nvjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # closed form: dw_p = sum g relu(x)^p, dx = g * sum p w_p relu(x)^(p-1) [x > 0]
    r = np.maximum(np.asarray(x), 0)
    dx, dw, db = vjp(g)
    np.testing.assert_allclose(dw, [np.sum(g * r**p) for p in range(1, order + 1)], rtol=1e-4)
    want_dx = g * sum(p * w[p - 1] * r ** (p - 1) for p in range(1, order + 1)) * (r > 0)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db, [np.sum(g)], rtol=1e-5)


def test_polynorm_is_invariant_to_positive_row_scale():
    x = jax.random.normal(jax.random.key(3), (6, 128))
    scale = jnp.array([0.5, 0.8, 1.0, 3.0, 40.0, 1000.0])[:, None]  # eps negligible
    w, b = jnp.array([0.5, -1.0, 2.0]), jnp.array([0.1])
    np.testing.assert_allclose(
        acts.polynorm(x * scale, w, b), acts.polynorm(x, w, b), rtol=2e-4, atol=2e-4
    )
    # ... but not to a negative one for odd powers: the check can fail
    assert not np.allclose(acts.polynorm(-x, w, b), acts.polynorm(x, w, b), atol=1e-2)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("name", ["polynorm", "polyrelu"])
def test_bf16_finite_for_large_inputs(name, order):
    x = (50.0 * jax.random.uniform(jax.random.key(order), (8, 256), minval=-1, maxval=1)).astype(
        jnp.bfloat16
    )
    w, b = acts.init_coeffs(order)
    fn = getattr(acts, name)
    y, vjp = jax.vjp(lambda x, w, b: fn(x, w, b), x, w, b)
    assert y.dtype == jnp.bfloat16
    grads = vjp(jnp.ones_like(y))
    assert all(bool(jnp.all(jnp.isfinite(t.astype(jnp.float32)))) for t in (y, *grads))
    if name == "polynorm":  # statistics in fp32: bf16 output close to the fp32 result
        ref = acts.polynorm(x.astype(jnp.float32), w, b)
        np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)


def test_per_row_coefficients_broadcast():
    """weight (..., r) broadcasts against x.shape[:-1]: per-expert coefficients."""
    x = jax.random.normal(jax.random.key(4), (3, 7, 16))
    w = jax.random.normal(jax.random.key(5), (3, 1, 2))
    b = jnp.array([[[0.1]], [[0.2]], [[0.3]]])
    got = acts.polynorm(x, w, b)
    for e in range(3):
        np.testing.assert_allclose(got[e], acts.polynorm(x[e], w[e, 0], b[e, 0]), rtol=1e-6)


def test_polycom_types_generic():
    x = jnp.asarray(GRID / 2)
    w, b = jnp.array([0.5, 0.25, -0.1]), jnp.array([0.2])
    t1 = acts.apply(
        acts.ActivationConfig("polycom", base="silu", polycom_type=1), x, weight=w, bias=b
    )
    s = np.asarray(acts.silu(x), np.float64)
    np.testing.assert_allclose(t1, 0.2 + 0.5 * s + 0.25 * s**2 - 0.1 * s**3, rtol=1e-5, atol=1e-5)
    t2 = acts.apply(
        acts.ActivationConfig("polycom", base="tanh", polycom_type=2), x, weight=w, bias=b
    )
    xd = np.asarray(x, np.float64)
    want = 0.2 + 0.5 * np.tanh(xd) + 0.25 * np.tanh(xd**2) - 0.1 * np.tanh(xd**3)
    np.testing.assert_allclose(t2, want, rtol=1e-5, atol=1e-5)
    # PolyNorm is Type II with the RMS normalisation as rho
    t3 = acts.apply(
        acts.ActivationConfig("polycom", base="rms_norm", polycom_type=2), x, weight=w, bias=b
    )
    np.testing.assert_allclose(t3, acts.polynorm(x, w, b), rtol=1e-6)


def test_named_variants():
    x = jax.random.normal(jax.random.key(6), (4, 24))
    u = jax.random.normal(jax.random.key(7), (4, 24))
    w, b = acts.init_coeffs(3)
    np.testing.assert_allclose(
        acts.polyrelu_norm(x, w, b), naive_polynorm(jnp.maximum(x, 0), w, b), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        acts.polynorm_glu(x, u, w, b), naive_polynorm(x, w, b) * u, rtol=1e-5, atol=1e-6
    )
    pr = np.where(np.asarray(x) >= 0, x, 0.25 * np.asarray(x))
    np.testing.assert_allclose(
        acts.polyprelu(x, w, b, 0.25), (pr + pr**2 + pr**3) / 3, rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------- registry and errors


def test_registry_has_config_names_and_table4():
    for name in [
        "relu",
        "relu2",
        "gelu",
        "swiglu",
        "polyrelu",
        "polynorm",
        "polyprelu",
        "polyrelu_norm",
        "polynorm_glu",
        "relu6",
        "leaky_relu",
        "rrelu",
        "prelu",
        "tanh",
        "softplus",
        "mish",
        "sigmoid",
        "silu",
        "elu",
        "celu",
        "gelu_tanh",
        "glu",
        "poly",
    ]:
        assert acts.get_spec(name).name == name
    assert acts.get_spec("swiglu").gated and acts.get_spec("polynorm_glu").gated
    assert not acts.get_spec("polynorm").gated and acts.get_spec("polynorm").coeffs


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown activation 'polynrom'.*polynorm"):
        acts.ActivationConfig(name="polynrom")
    with pytest.raises(ValueError, match=r"activation.base.*'sine'.*relu"):
        acts.ActivationConfig(name="polycom", base="sine")
    with pytest.raises(ValueError, match=r"polycom_type must be 1 or 2"):
        acts.ActivationConfig(name="polycom", polycom_type=3)
    with pytest.raises(ValueError, match=r"activation.kernel must be one of .*reference"):
        acts.ActivationConfig(kernel="cuda")
    assert acts.ActivationConfig(kernel="reference").kernel == "reference"


def test_bad_order_and_eps():
    with pytest.raises(ValueError, match=r"activation.order must be an integer >= 1"):
        acts.ActivationConfig(name="polyrelu", order=0)
    with pytest.raises(ValueError, match=r"activation.eps must be > 0"):
        acts.ActivationConfig(name="polynorm", eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        acts.polynorm(jnp.ones((2, 4)), jnp.ones(3), jnp.zeros(1), eps=-1e-6)
    with pytest.raises(ValueError, match=r"order r = weight.shape\[-1\] must be >= 1"):
        acts.polyrelu(jnp.ones((2, 4)), jnp.ones((0,)), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"bias: expected shape"):
        acts.polyrelu(jnp.ones((2, 4)), jnp.ones(3), jnp.zeros(2))


def test_weight_length_must_match_configured_order():
    from flax import nnx

    from polyjax.layers import Activation

    mod = Activation(acts.ActivationConfig("polynorm", order=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"weight.*order 3.*shape \(2,\)"):
        mod(jnp.ones((2, 8)), weight=jnp.ones(2), bias=jnp.zeros(1))


def test_ffn_width_equal_parameter_rule():
    assert acts.ffn_width(8256, gated=True) == 5504
    assert acts.ffn_width(1536, gated=True) == 1024
    assert acts.ffn_width(8256, gated=False) == 8256
    assert acts.ffn_width(1000, gated=True, multiple_of=64) == 640


def test_an_activation_added_by_the_recipe_trains(tiny, monkeypatch):
    """docs/activations.md, steps 1-2, with a toy activation (softsign, x / (1 + |x|)):
    a function in BASES and a registry entry are all that the layer, the config files,
    the config's validation and the trainer need."""
    from flax import nnx

    from configs import dense
    from polyjax import layers

    monkeypatch.setitem(acts.BASES, "softsign", lambda x: x / (1 + jnp.abs(x)))
    monkeypatch.setitem(acts.REGISTRY, "softsign", acts.ActivationSpec("softsign"))
    layer = layers.Activation(acts.ActivationConfig(name="softsign"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(jnp.asarray(GRID)), GRID / (1 + np.abs(GRID)), rtol=1e-6)
    assert dense.get_config("act=softsign,size=tiny").model.d_ff == 192  # not gated: full width
    _, steps, state, batches = tiny.build(tiny.spec(**{"model.activation.name": "softsign"}))
    losses = []
    for _ in range(3):
        state, metrics = steps.train(state, next(batches))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
