"""Fused PolyNorm / PolyNorm-GLU / PolyReLU with memory-saving custom VJPs.

``impl``: "xla" (jnp custom VJP), "pallas" (Pallas kernels; interpret mode on
CPU) or "auto" (see ``dispatch``). ``weight`` is (r,) ascending, or (..., r)
broadcasting against ``x.shape[:-1]`` (per-expert / per-row coefficients);
``bias`` is (), (1,) or (..., 1). Statistics are fp32; outputs keep x's dtype.
Pallas-only keywords: ``interpret``, ``backend`` ("triton" | "tpu"),
``block_rows``, ``block_cols`` (see ``pallas.make_tiling``).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec

from polyjax.kernels.core import check_eps, coeff_cols, polynorm_core, polyrelu_core
from polyjax.kernels.dispatch import AUTO_PALLAS, IMPLS, make_ops, resolve_impl
from polyjax.kernels.pallas import PallasOps, make_tiling
from polyjax.kernels.sharded import ShardedOps
from polyjax.kernels.xla import XlaOps

Array = jax.Array

__all__ = [
    "AUTO_PALLAS",
    "IMPLS",
    "PallasOps",
    "ShardedOps",
    "XlaOps",
    "make_ops",
    "make_tiling",
    "polynorm",
    "polynorm_glu",
    "polynorm_sharded",
    "polyrelu",
    "resolve_impl",
]


def polynorm(
    x: Array, weight: Array, bias: Array, eps: float = 1e-6, impl: str = "auto", **pallas_kw
) -> Array:
    """PolyNorm: bias + sum_p weight[p-1] x^p rsqrt(mean(x^(2p)) + eps), over the last axis."""
    ops = make_ops(impl, **pallas_kw)
    w, b = coeff_cols(weight, bias, x.shape[:-1])
    return polynorm_core(ops, check_eps(eps), x, None, w, b)


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
    ops = make_ops(impl, **pallas_kw)
    w, b = coeff_cols(weight, bias, gate.shape[:-1])
    return polynorm_core(ops, check_eps(eps), gate, up, w, b)


def polyrelu(x: Array, weight: Array, bias: Array, impl: str = "auto", **pallas_kw) -> Array:
    """PolyReLU: bias + sum_p weight[p-1] relu(x)^p; the backward saves only x."""
    ops = make_ops(impl, **pallas_kw)
    w, b = coeff_cols(weight, bias, x.shape[:-1])
    return polyrelu_core(ops, x, w, b)


def polynorm_sharded(
    x: Array,
    weight: Array,
    bias: Array,
    eps: float = 1e-6,
    *,
    mesh: Mesh,
    axis: str = "tensor",
    spec: PartitionSpec | None = None,
    up: Array | None = None,
    impl: str = "auto",
    **pallas_kw,
) -> Array:
    """PolyNorm (times ``up`` if given) of x whose last axis is sharded over mesh
    axis ``axis``: per-shard partial sums, psum, exact statistics.

    ``spec``: x's PartitionSpec (default: leading dims unsharded); its last entry
    must be ``axis``. Per-row weights are sharded like x's leading dims.
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"axis: {axis!r} is not a mesh axis; mesh axes: {mesh.axis_names}")
    spec = tuple(spec) if spec is not None else (None,) * (x.ndim - 1) + (axis,)
    spec = spec + (None,) * (x.ndim - len(spec))
    if len(spec) != x.ndim or spec[-1] != axis:
        raise ValueError(f"spec: {spec} must have x.ndim = {x.ndim} entries and end with {axis!r}")
    if up is not None and up.shape != x.shape:
        raise ValueError(f"up: shape {up.shape} must equal x's {x.shape}")
    ops = ShardedOps(make_ops(impl, **pallas_kw), mesh, axis, spec)
    w, b = coeff_cols(weight, bias, x.shape[:-1])
    return polynorm_core(ops, check_eps(eps), x, up, w, b)
