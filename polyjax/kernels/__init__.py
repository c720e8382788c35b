"""Fused PolyNorm, PolyNorm-GLU and PolyReLU with memory-saving custom VJPs.

The forward saves x (and ``up``), the coefficients and, for PolyNorm, the r fp32
statistics of each row; the backward is the closed form, its weight and bias
gradients per-row partials reduced once over the rows. ``impl`` picks the passes:
"xla" (jnp, ``kernels.xla``), "pallas" (``kernels.pallas``; interpret mode on
CPU) or "auto" (``dispatch``). ``weight`` is (r,) ascending, or (..., r)
broadcasting against ``x.shape[:-1]`` (per-expert / per-row coefficients);
``bias`` is (), (1,) or (..., 1). Statistics are fp32; outputs keep x's dtype.
Pallas-only keywords (``dispatch.pallas_config``): ``backend`` ("triton" |
"tpu"), ``interpret``, ``block_rows``, ``block_cols``, ``resident``.

These are custom VJPs: reverse mode (grad, vjp) and vmap work, forward mode
(jvp, jacfwd, linearize) does not; docs/kernels.md has the table.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from polyjax import activations as acts
from polyjax.kernels import mosaic_gpu, pallas, xla
from polyjax.kernels.dispatch import AUTO_PALLAS, IMPLS, pallas_config, resolve_impl
from polyjax.kernels.pallas import make_plan

Array = jax.Array
f32 = jnp.float32

__all__ = [
    "AUTO_PALLAS",
    "IMPLS",
    "make_plan",
    "pallas_config",
    "polynorm",
    "polynorm_glu",
    "polyrelu",
    "resolve_impl",
]


def polynorm(
    x: Array, weight: Array, bias: Array, eps: float = 1e-6, impl: str = "auto", **pallas_kw
) -> Array:
    """PolyNorm: bias + sum_p weight[p-1] x^p rsqrt(mean(x^(2p)) + eps), over the last axis."""
    cfg = pallas_config(impl, **pallas_kw)
    x2, w, b = _flatten(x, weight, bias)
    return _polynorm(cfg, _check_eps(eps), x2, None, w, b).reshape(x.shape)


def polynorm_glu(
    gate: Array,
    up: Array,
    weight: Array,
    bias: Array,
    eps: float = 1e-6,
    impl: str = "auto",
    **pallas_kw,
) -> Array:
    """PolyNorm(gate) * up, fused: the backward recomputes PolyNorm(gate)."""
    if gate.shape != up.shape:
        raise ValueError(f"up: shape {up.shape} must equal gate's {gate.shape}")
    cfg = pallas_config(impl, **pallas_kw)
    x2, w, b = _flatten(gate, weight, bias)
    y = _polynorm(cfg, _check_eps(eps), x2, up.reshape(x2.shape), w, b)
    return y.reshape(gate.shape)


def polyrelu(x: Array, weight: Array, bias: Array, impl: str = "auto", **pallas_kw) -> Array:
    """PolyReLU: bias + sum_p weight[p-1] relu(x)^p; the backward saves only x."""
    cfg = pallas_config(impl, **pallas_kw)
    x2, w, b = _flatten(x, weight, bias)
    return _polyrelu(cfg, x2, w, b).reshape(x.shape)


# ----------------------------------------------------------------------------
# Coefficients as rows: (1, n) shared or (M, n) one row per row of x.


def _flatten(x: Array, weight: Array, bias: Array) -> tuple[Array, Array, Array]:
    order = acts.check_coeffs(weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    return x2, _rows(weight, lead, order, "weight"), _rows(bias, lead, 1, "bias")


def _rows(a: Array, lead: tuple[int, ...], n: int, name: str) -> Array:
    a = jnp.asarray(a).astype(f32)
    if math.prod(a.shape[:-1]) == 1:
        return a.reshape(1, n)
    try:
        shape = jnp.broadcast_shapes(a.shape[:-1], lead)
    except ValueError:
        shape = None
    if shape != lead:
        raise ValueError(
            f"{name}: leading dims {a.shape[:-1]} must broadcast against the rows "
            f"x.shape[:-1] = {lead}"
        )
    return jnp.broadcast_to(a, (*lead, n)).reshape(math.prod(lead), n)


def _check_eps(eps: Any) -> float:
    if not isinstance(eps, int | float):
        raise ValueError(f"eps must be a Python float for the kernels, got {type(eps).__name__}")
    acts.check_eps(eps)
    return float(eps)


def _reduce_rows(parts: Array, like: Array) -> Array:
    """Per-row partials (M, n) to the gradient of ``like``, (1, n) or (M, n)."""
    return jnp.sum(parts, axis=0, keepdims=True) if like.shape[0] == 1 else parts


# ----------------------------------------------------------------------------
# The custom VJPs; ``cfg`` is a ``pallas.Config``, or None for the jnp passes.


def _mosaic(cfg, x, n_staged) -> bool:
    """Whether the Mosaic GPU kernels take these rows (else Triton's)."""
    return cfg.backend == "mosaic_gpu" and mosaic_gpu.supports(x.shape[1], x.dtype, n_staged)


def _polynorm_forward(cfg, x, up, w, b, eps):
    if cfg is None:
        return xla.polynorm_forward(x, up, w, b, eps)
    if _mosaic(cfg, x, 1 if up is None else 2):
        return mosaic_gpu.polynorm_forward(x, up, w, b, eps, interpret=cfg.interpret)
    return pallas.polynorm_forward(cfg, x, up, w, b, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _polynorm(cfg: pallas.Config | None, eps: float, x, up, w, b):
    return _polynorm_forward(cfg, x, up, w, b, eps)[0]


def _polynorm_fwd(cfg, eps, x, up, w, b):
    y, stats = _polynorm_forward(cfg, x, up, w, b, eps)
    return y, (x, up, w, b, stats)


def _polynorm_bwd(cfg, eps, res, g):
    del eps
    x, up, w, b, stats = res
    if cfg is None:
        dx, dup, parts = xla.polynorm_backward(x, up, g, w, b, stats)
    elif _mosaic(cfg, x, 2 if up is None else 3):
        dx, dup, parts = mosaic_gpu.polynorm_backward(x, up, g, w, b, stats, cfg.interpret)
    else:
        dx, dup, parts = pallas.polynorm_backward(cfg, x, up, g, w, b, stats)
    order = w.shape[1]
    return dx, dup, _reduce_rows(parts[:, :order], w), _reduce_rows(parts[:, order:], b)


_polynorm.defvjp(_polynorm_fwd, _polynorm_bwd)


def _polyrelu_forward(cfg, x, w, b):
    if cfg is None:
        return xla.polyrelu_forward(x, w, b)
    return pallas.polyrelu_forward(cfg, x, w, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _polyrelu(cfg: pallas.Config | None, x, w, b):
    return _polyrelu_forward(cfg, x, w, b)


def _polyrelu_fwd(cfg, x, w, b):
    return _polyrelu_forward(cfg, x, w, b), (x, w, b)


def _polyrelu_bwd(cfg, res, g):
    x, w, b = res
    if cfg is None:
        dx, parts = xla.polyrelu_backward(x, g, w)
    else:
        dx, parts = pallas.polyrelu_backward(cfg, x, g, w)
    order = w.shape[1]
    return dx, _reduce_rows(parts[:, :order], w), _reduce_rows(parts[:, order:], b)


_polyrelu.defvjp(_polyrelu_fwd, _polyrelu_bwd)
