"""PolyNorm with the row (intermediate) axis sharded over a mesh axis.

Each shard computes its partial per-row sums (forward: sum x^(2p); backward:
<g, x^p> and sum g) with the inner ops, ``psum`` over the mesh axis inside
``jax.shard_map`` makes them the full-row sums, and the shard applies the
output (or the input gradient) to its own columns. The result equals the
unsharded PolyNorm; the statistics cover the whole width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from polyjax.kernels import closed_form as cf

Array = jax.Array
Cols = list[Array]


@dataclasses.dataclass(frozen=True)
class ShardedOps:
    """``inner`` ops run per shard of x, whose PartitionSpec is ``spec`` (its last
    entry is ``axis``); per-row results are replicated over ``axis``."""

    inner: Any
    mesh: Mesh
    axis: str
    spec: tuple

    def _specs(self, cols: Cols) -> list[PartitionSpec]:
        rows = PartitionSpec(*self.spec[:-1], None)
        return [PartitionSpec() if c.size == 1 else rows for c in cols]

    def _smap(self, fn, in_specs, out_specs):
        # check_vma=False: pallas_call outputs carry no varying-axes type; the
        # per-row results are replicated over ``axis`` by the psum.
        return jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def forward(
        self, x: Array, up: Array | None, w: Cols, b: Array, eps: float
    ) -> tuple[Array, Cols]:
        xs, rows = PartitionSpec(*self.spec), PartitionSpec(*self.spec[:-1], None)
        order = len(w)

        def local(x, up, w, b):
            sums = jax.lax.psum(self.inner.sums(x, order), self.axis)
            width = jax.lax.psum(x.shape[-1], self.axis)
            s = cf.stats_from_sums(sums, width, eps)
            return self.inner.apply(x, up, w, b, s), s

        up_spec = None if up is None else xs
        fn = self._smap(
            local, (xs, up_spec, self._specs(w), self._specs([b])[0]), (xs, [rows] * order)
        )
        return fn(x, up, w, b)

    def backward(
        self, x: Array, up: Array | None, g: Array, w: Cols, b: Array, s: Cols
    ) -> tuple[Array, Array | None, Cols, Array]:
        xs, rows = PartitionSpec(*self.spec), PartitionSpec(*self.spec[:-1], None)
        order = len(w)

        def local(x, up, g, w, b, s):
            c, gsum = jax.lax.psum(self.inner.dots(x, up, g, order), self.axis)
            width = jax.lax.psum(x.shape[-1], self.axis)
            dx, dup = self.inner.grad_apply(x, up, g, w, b, s, c, width)
            return dx, dup, c, gsum

        up_spec = None if up is None else xs
        in_specs = (xs, up_spec, xs, self._specs(w), self._specs([b])[0], [rows] * order)
        out_specs = (xs, up_spec, [rows] * order, rows)
        return self._smap(local, in_specs, out_specs)(x, up, g, w, b, s)
