"""The fused passes in jnp (``impl="xla"``): XLA compiles each into a few fusions.

Same signatures as the Pallas passes in ``polyjax.kernels.pallas``: x, up, g are
(M, H); w is (1, r) shared or (M, r) per row, b (1, 1) or (M, 1); statistics are
(M, r) fp32; the backward returns per-row partials (M, r + 1) fp32 of the weight
and bias gradients (s_p <g, x^p> for PolyNorm, <g, relu(x)^p> for PolyReLU, then
sum g), which the caller reduces over rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polyjax.kernels import closed_form as cf

Array = jax.Array
f32 = jnp.float32


def _cols(a: Array) -> list[Array]:
    a = a.astype(f32)
    return [a[:, i : i + 1] for i in range(a.shape[1])]


def _rowsums(terms: list[Array]) -> list[Array]:
    return [cf.rowsum(t) for t in terms]


def polynorm_forward(
    x: Array, up: Array | None, w: Array, b: Array, eps: float
) -> tuple[Array, Array]:
    x32, order = x.astype(f32), w.shape[1]
    s = cf.stats_from_sums(_rowsums(cf.even_power_terms(x32, order)), x.shape[1], eps)
    y = cf.polynorm_apply(x32, _cols(w), b.astype(f32), s)
    if up is not None:
        y = y * up.astype(f32)
    return y.astype(x.dtype), jnp.concatenate(s, axis=1)


def polynorm_backward(
    x: Array, up: Array | None, g: Array, w: Array, b: Array, stats: Array
) -> tuple[Array, Array | None, Array]:
    x32, g32, order = x.astype(f32), g.astype(f32), w.shape[1]
    ge = g32 if up is None else g32 * up.astype(f32)
    *c, gsum = _rowsums(cf.grad_terms(x32, ge, order))
    wc, s = _cols(w), _cols(stats)
    dx = cf.polynorm_dx(x32, ge, wc, s, c, x.shape[1]).astype(x.dtype)
    dup = None
    if up is not None:
        dup = (g32 * cf.polynorm_apply(x32, wc, b.astype(f32), s)).astype(up.dtype)
    parts = jnp.concatenate([sp * cp for sp, cp in zip(s, c, strict=True)] + [gsum], axis=1)
    return dx, dup, parts


def polyrelu_forward(x: Array, w: Array, b: Array) -> Array:
    return cf.polyrelu_apply(x.astype(f32), _cols(w), b.astype(f32)).astype(x.dtype)


def polyrelu_backward(x: Array, g: Array, w: Array) -> tuple[Array, Array]:
    x32, g32 = x.astype(f32), g.astype(f32)
    dx = cf.polyrelu_dx(x32, g32, _cols(w)).astype(x.dtype)
    terms = cf.grad_terms(jnp.maximum(x32, 0.0), g32, w.shape[1])
    return dx, jnp.concatenate(_rowsums(terms), axis=1)
