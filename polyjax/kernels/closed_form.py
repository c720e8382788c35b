"""The PolyNorm / PolyReLU closed forms on fp32 blocks, shared by the jnp ops and
the Pallas kernel bodies.

Everything here works on an fp32 block ``x`` of shape (rows, cols) (or any
(..., cols)) and on per-row columns of shape (rows, 1) (or (1, 1), broadcast):
coefficients ``w[p-1]``, statistics ``s[p-1] = rsqrt(mean(x^(2p)) + eps)`` and
the gradient dots ``c[p-1] = <g, x^p>``, each a Python list of r columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
Cols = list[Array]


def _rowsum(v: Array) -> Array:
    return jnp.sum(v, axis=-1, keepdims=True)


def _poly(z: Array, coefs: Cols) -> Array:
    """coefs[0] + coefs[1] z + ... + coefs[-1] z^(n-1), by Horner."""
    y = coefs[-1]
    for a in reversed(coefs[:-1]):
        y = y * z + a
    return y


def even_power_sums(x: Array, order: int) -> Cols:
    """[sum x^2, sum x^4, ..., sum x^(2r)] over the last axis."""
    x2 = x * x
    q, out = x2, []
    for p in range(order):
        out.append(_rowsum(q))
        if p + 1 < order:
            q = q * x2
    return out


def stats_from_sums(sums: Cols, width: int | Array, eps: float) -> Cols:
    return [jax.lax.rsqrt(v / width + eps) for v in sums]


def polynorm_apply(x: Array, w: Cols, b: Array, s: Cols) -> Array:
    """b + sum_p w_p s_p x^p."""
    return b + x * _poly(x, [wp * sp for wp, sp in zip(w, s, strict=True)])


def grad_dots(x: Array, g: Array, order: int) -> tuple[Cols, Array]:
    """[<g, x^p> for p = 1..r] and sum g, over the last axis."""
    q, out = x, []
    for p in range(order):
        out.append(_rowsum(g * q))
        if p + 1 < order:
            q = q * x
    return out, _rowsum(g)


def polynorm_dx(x: Array, g: Array, w: Cols, s: Cols, c: Cols, width: int | Array) -> Array:
    """The closed-form input gradient (REFERENCE.md):
    sum_p w_p (p x^(p-1) s_p g - (p/H) x^(2p-1) s_p^3 <g, x^p>)."""
    a = [wp * (p + 1) * sp for p, (wp, sp) in enumerate(zip(w, s, strict=True))]
    bcoef = [
        wp * ((p + 1) / width) * sp * sp * sp * cp
        for p, (wp, sp, cp) in enumerate(zip(w, s, c, strict=True))
    ]
    return g * _poly(x, a) - x * _poly(x * x, bcoef)


def polyrelu_apply(x: Array, w: Cols, b: Array) -> Array:
    """b + sum_p w_p relu(x)^p."""
    z = jnp.maximum(x, 0.0)
    return b + z * _poly(z, w)


def polyrelu_grads(x: Array, g: Array, w: Cols) -> tuple[Array, Cols, Array]:
    """dx = g 1[x>0] sum_p p w_p relu(x)^(p-1); per-row <g, relu(x)^p>; per-row sum g."""
    z = jnp.maximum(x, 0.0)
    dpoly = _poly(z, [wp * (p + 1) for p, wp in enumerate(w)])
    dx = jnp.where(x > 0, g * dpoly, 0.0)
    dots, gsum = grad_dots(z, g, len(w))
    return dx, dots, gsum
