"""The jnp implementation of the kernel operations (XLA fuses them).

Used by the ``impl="xla"`` custom VJPs: exact closed forms, and the backward
needs only x and the per-row statistics, so autodiff stores no powers of x.
Arrays are (..., H); per-row columns are lists of (..., 1) fp32 arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from polyjax.kernels import closed_form as cf

Array = jax.Array
Cols = list[Array]
f32 = jnp.float32


def _f32(a: Array | None) -> Array | None:
    return None if a is None else a.astype(f32)


@dataclasses.dataclass(frozen=True)
class XlaOps:
    """PolyNorm / PolyReLU passes as plain jnp."""

    def sums(self, x: Array, order: int) -> Cols:
        return cf.even_power_sums(x.astype(f32), order)

    def apply(self, x: Array, up: Array | None, w: Cols, b: Array, s: Cols) -> Array:
        y = cf.polynorm_apply(x.astype(f32), w, b, s)
        return (y if up is None else y * _f32(up)).astype(x.dtype)

    def forward(
        self, x: Array, up: Array | None, w: Cols, b: Array, eps: float
    ) -> tuple[Array, Cols]:
        s = cf.stats_from_sums(self.sums(x, len(w)), x.shape[-1], eps)
        return self.apply(x, up, w, b, s), s

    def dots(self, x: Array, up: Array | None, g: Array, order: int) -> tuple[Cols, Array]:
        ge = g.astype(f32) if up is None else g.astype(f32) * _f32(up)
        return cf.grad_dots(x.astype(f32), ge, order)

    def grad_apply(
        self,
        x: Array,
        up: Array | None,
        g: Array,
        w: Cols,
        b: Array,
        s: Cols,
        c: Cols,
        width: int,
    ) -> tuple[Array, Array | None]:
        x32, g32 = x.astype(f32), g.astype(f32)
        ge = g32 if up is None else g32 * _f32(up)
        dx = cf.polynorm_dx(x32, ge, w, s, c, width).astype(x.dtype)
        if up is None:
            return dx, None
        return dx, (g32 * cf.polynorm_apply(x32, w, b, s)).astype(up.dtype)

    def backward(
        self, x: Array, up: Array | None, g: Array, w: Cols, b: Array, s: Cols
    ) -> tuple[Array, Array | None, Cols, Array]:
        c, gsum = self.dots(x, up, g, len(w))
        dx, dup = self.grad_apply(x, up, g, w, b, s, c, x.shape[-1])
        return dx, dup, c, gsum

    def relu_forward(self, x: Array, w: Cols, b: Array) -> Array:
        return cf.polyrelu_apply(x.astype(f32), w, b).astype(x.dtype)

    def relu_backward(self, x: Array, g: Array, w: Cols) -> tuple[Array, Cols, Array]:
        dx, dots, gsum = cf.polyrelu_grads(x.astype(f32), g.astype(f32), w)
        return dx.astype(x.dtype), dots, gsum
