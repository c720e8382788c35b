"""The custom VJPs of PolyNorm, PolyNorm-GLU and PolyReLU over an ``ops`` object
(``XlaOps``, ``PallasOps`` or ``ShardedOps``), and the coefficient handling.

The forward saves x (and ``up``), the coefficients and the r fp32 statistics of
each row; the backward uses the closed form. Weight and bias gradients are
per-row products reduced to the coefficients' shape.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from polyjax import activations as acts

Array = jax.Array
Cols = list[Array]
f32 = jnp.float32


def coeff_cols(weight: Array, bias: Array, lead: tuple[int, ...]) -> tuple[Cols, Array]:
    """weight (r,) or (..., r), bias (), (1,) or (..., 1) -> r weight columns and a
    bias column, fp32, each (1, ..., 1, 1) when shared or lead + (1,) per row."""
    order = acts._check_coeffs(weight, bias)
    nd = len(lead)

    def cols(a: Array, name: str, last: int) -> Array:
        a = a.astype(f32)
        if a.ndim <= 1:
            return a.reshape((1,) * nd + (last,))
        try:
            shape = jnp.broadcast_shapes(a.shape[:-1], lead)
        except ValueError:
            shape = None
        if shape != lead:
            raise ValueError(
                f"{name}: leading dims {a.shape[:-1]} must broadcast against the rows "
                f"x.shape[:-1] = {lead}"
            )
        return jnp.broadcast_to(a, (*lead, last))

    w = cols(weight, "weight", order)
    return [w[..., p : p + 1] for p in range(order)], cols(bias, "bias", 1)


def check_eps(eps: Any) -> float:
    if not isinstance(eps, int | float):
        raise ValueError(f"eps must be a Python float for the kernels, got {type(eps).__name__}")
    acts._check_eps(eps)
    return float(eps)


def _unbroadcast(v: Array, shape: tuple[int, ...]) -> Array:
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, v.shape, strict=True)) if n == 1 != m)
    return jnp.sum(v, axis=axes, keepdims=True) if axes else v


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def polynorm_core(ops: Any, eps: float, x: Array, up: Array | None, w: Cols, b: Array) -> Array:
    """PolyNorm(x) (times ``up`` when given) with per-row coefficient columns."""
    return ops.forward(x, up, w, b, eps)[0]


def _polynorm_fwd(ops, eps, x, up, w, b):
    y, s = ops.forward(x, up, w, b, eps)
    return y, (x, up, w, b, s)


def _polynorm_bwd(ops, eps, res, g):
    del eps
    x, up, w, b, s = res
    dx, dup, c, gsum = ops.backward(x, up, g, w, b, s)
    dw = [_unbroadcast(sp * cp, wp.shape) for sp, cp, wp in zip(s, c, w, strict=True)]
    return dx, dup, dw, _unbroadcast(gsum, b.shape)


polynorm_core.defvjp(_polynorm_fwd, _polynorm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def polyrelu_core(ops: Any, x: Array, w: Cols, b: Array) -> Array:
    """PolyReLU(x) with per-row coefficient columns."""
    return ops.relu_forward(x, w, b)


def _polyrelu_fwd(ops, x, w, b):
    return ops.relu_forward(x, w, b), (x, w, b)


def _polyrelu_bwd(ops, res, g):
    x, w, b = res
    dx, dots, gsum = ops.relu_backward(x, g, w)
    dw = [_unbroadcast(d, wp.shape) for d, wp in zip(dots, w, strict=True)]
    return dx, dw, _unbroadcast(gsum, b.shape)


polyrelu_core.defvjp(_polyrelu_fwd, _polyrelu_bwd)
