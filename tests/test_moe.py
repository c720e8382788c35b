"""The MoE layer: router, auxiliary losses, both dispatches against a naive loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from polyjax import activations as acts
from polyjax import moe

E, K, D, F = 4, 2, 16, 12


def layer(name="polynorm", per_expert=False, dispatch="dropless", factor=1.25, renorm=False):
    m = moe.MoE(
        D,
        F,
        acts.ActivationConfig(name),
        num_experts=E,
        top_k=K,
        renormalize=renorm,
        dispatch=dispatch,
        capacity_factor=factor,
        per_expert_coeffs=per_expert,
        init=nnx.initializers.normal(0.3),
        rngs=nnx.Rngs(0),
    )
    if m.act.coeffs is not None:  # distinct coefficients, so a wrong gather shows
        w, b = m.act.coeffs.weight, m.act.coeffs.bias
        w[...] = jax.random.uniform(jax.random.key(5), w[...].shape, minval=0.2, maxval=1.0)
        b[...] = jax.random.normal(jax.random.key(6), b[...].shape)
    return m


def naive(m, x_BxLxD):
    """Per token, per chosen expert: the expert's FFN, weighted by its gate."""
    x = np.asarray(x_BxLxD).reshape(-1, D)
    probs = np.asarray(jax.nn.softmax(x @ np.asarray(m.router[...]), axis=-1))
    out = np.zeros_like(x)
    coeffs = m.act.coeffs
    for t in range(x.shape[0]):
        chosen = np.argsort(-probs[t], kind="stable")[:K]
        gates = probs[t, chosen] / (probs[t, chosen].sum() if m.renormalize else 1.0)
        for e, g in zip(chosen, gates, strict=True):
            h = x[t] @ np.asarray(m.w_in[...][e])
            if coeffs is not None:
                w, b = coeffs.weight[...], coeffs.bias[...]
                w, b = (w[e], b[e]) if m.per_expert_coeffs else (w, b)
            if m.act.cfg.name == "swiglu":
                h = acts.swiglu(h, x[t] @ np.asarray(m.w_up[...][e]))
            elif m.act.cfg.name == "polynorm":  # normalised over the full width F
                h = acts.polynorm(h[None], w, b)[0]
            elif m.act.cfg.name == "polyrelu":
                h = acts.polyrelu(h[None], w, b)[0]
            else:
                h = acts.BASES[m.act.cfg.name](h)
            out[t] += g * (np.asarray(h) @ np.asarray(m.w_out[...][e]))
    return out.reshape(x_BxLxD.shape)


def inputs(b=2, length=8):
    return jax.random.normal(jax.random.key(1), (b, length, D))


def test_router_softmax_over_all_experts_then_top_k():
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 0.0, 2.5]])
    gates, experts, probs = moe.route(logits, 2)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_array_equal(experts, [[0, 1], [1, 3]])
    np.testing.assert_allclose(gates, [[p[0, 0], p[0, 1]], [p[1, 1], p[1, 3]]], rtol=1e-6)
    assert np.all(np.asarray(gates).sum(-1) < 1)  # not renormalised
    renorm, _, _ = moe.route(logits, 2, renormalize=True)
    top = np.array([[2.0, 1.0], [3.0, 2.5]])  # Mixtral: softmax over the chosen logits
    np.testing.assert_allclose(renorm, np.exp(top) / np.exp(top).sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(probs, p, rtol=1e-6)


def test_aux_losses_against_hand_computation():
    logits = jax.random.normal(jax.random.key(2), (6, E)) * 2
    _, experts, probs = moe.route(logits, K)
    counts = np.zeros(E)
    for e in np.asarray(experts).ravel():
        counts[e] += 1
    f = counts / (6 * K)
    p_mean = np.asarray(probs).mean(0)
    assert float(moe.load_balancing_loss(probs, experts)) == pytest.approx(E * (f @ p_mean))
    np.testing.assert_allclose(moe.expert_load(experts, E), f)
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    assert float(moe.router_z_loss(logits)) == pytest.approx(np.mean(lse**2), rel=1e-5)
    uniform = jnp.full((4, E), 1 / E)
    assert float(moe.load_balancing_loss(uniform, jnp.array([[0, 1], [2, 3]] * 2))) == 1.0


@pytest.mark.parametrize(
    "name, per_expert, renorm",
    [
        ("polynorm", False, False),
        ("polynorm", True, False),
        ("polyrelu", True, True),
        ("swiglu", False, False),
        ("relu2", False, False),
    ],
)
def test_dropless_equals_naive_per_token_loop(name, per_expert, renorm):
    m = layer(name, per_expert, renorm=renorm)
    x = inputs()
    y, stats = m(x)
    np.testing.assert_allclose(y, naive(m, x), rtol=1e-4, atol=1e-5)
    assert int(stats["dropped"]) == 0
    assert float(jnp.sum(stats["load"])) == pytest.approx(1.0)


def test_dropless_drops_nothing_under_total_imbalance_and_capacity_reports_drops():
    x = inputs()
    m = layer("polynorm", per_expert=True)
    m.router[...] = jnp.zeros_like(m.router[...])  # ties: every token picks experts 0, 1
    y, stats = m(x)
    np.testing.assert_allclose(stats["load"], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(y, naive(m, x), rtol=1e-4, atol=1e-5)
    assert int(stats["dropped"]) == 0
    cap = layer("polynorm", per_expert=True, dispatch="capacity", factor=1.0)
    cap.router[...] = jnp.zeros_like(cap.router[...])
    y_cap, cap_stats = cap(x)
    c = math.ceil(1.0 * 8 * K / E)  # 4 per expert per sequence of 8
    assert int(cap_stats["dropped"]) == 2 * K * (8 - c)
    # The first c tokens of each sequence keep both experts; the rest get nothing.
    np.testing.assert_allclose(y_cap[:, :c], y[:, :c], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y_cap[:, c:], 0.0)


@pytest.mark.parametrize("name, per_expert", [("polynorm", True), ("swiglu", False)])
def test_capacity_with_room_equals_dropless_values_and_grads(name, per_expert):
    x = inputs()
    drop = layer(name, per_expert)
    cap = layer(name, per_expert, dispatch="capacity", factor=float(E))

    def loss(m):
        y, stats = m(x)
        return jnp.sum(jnp.sin(y)), stats

    (l1, s1), g1 = nnx.value_and_grad(loss, has_aux=True)(drop)
    (l2, s2), g2 = nnx.value_and_grad(loss, has_aux=True)(cap)
    assert int(s2["dropped"]) == 0
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
