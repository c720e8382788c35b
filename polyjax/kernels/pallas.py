"""Pallas kernels for PolyNorm (plain and GLU-gated) and PolyReLU, GPU (Triton)
and TPU (Mosaic), and the ``PallasOps`` that calls them.

One program handles ``rows`` rows. A row is walked in column chunks: a row that
fits one chunk is loaded once and kept for both passes (statistics, then
output); a wider row is read twice, chunk by chunk (the second read mostly hits
L2 on GPU / stays in VMEM on TPU), so no width fails.

Layouts:
- ``triton``: block dims are powers of two; the row block is
  ``next_power_of_2(H)`` wide and every chunk is masked past H (Triton masks
  the loads and stores out of bounds; masked loads are replaced by 0).
- ``tpu``: the row block is the whole row (its last dim equals the array's);
  ``rows`` is a multiple of 8 (or all the rows); chunks are multiples of 128
  with a static tail chunk. Per-row columns are (M, 1) arrays.

Kernels only produce per-row results; reductions across rows (weight and bias
gradients) are done by the caller on (M, 1) columns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu_triton

from polyjax.kernels import closed_form as cf

Array = jax.Array
Cols = list[Array]
f32 = jnp.float32

BACKENDS = ("triton", "tpu")
TRITON_BLOCK_ELEMS = 4096  # elements of a (rows, chunk) tile per program
TRITON_CHUNKS = (4096, 2048, 1024, 512)
TPU_BLOCK_ELEMS = 1 << 19  # elements of a (rows, H) block
TPU_CHUNK = 2048
TPU_VMEM_LIMIT = 48 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How an (m, width) array is cut: ``rows`` rows a program, a block ``block_w``
    wide, walked in ``n_loop`` chunks of ``chunk`` columns (then a static ``tail``)."""

    backend: str
    m: int
    width: int
    rows: int
    block_w: int
    chunk: int
    n_loop: int
    tail: int

    @property
    def masked(self) -> bool:
        return self.n_loop * self.chunk > self.width

    @property
    def single(self) -> bool:
        return self.n_loop == 1 and self.tail == 0


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def make_tiling(
    backend: str, m: int, width: int, block_rows: int | None = None, block_cols: int | None = None
) -> Tiling:
    """The tiling of an (m, width) array for ``backend``; ``block_rows`` and
    ``block_cols`` override the rows a program and the chunk width."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        for name, v in (("block_rows", block_rows), ("block_cols", block_cols)):
            if v is not None and not _pow2(v):
                raise ValueError(f"{name} must be a power of two for Triton, got {v}")
        block_w = pl.next_power_of_2(width)
        if block_cols is not None:
            chunk = min(block_cols, block_w)
        elif block_w <= TRITON_CHUNKS[0]:
            chunk = block_w
        else:  # the widest chunk wasting at most 1/8 of a row to the mask
            fits = [c for c in TRITON_CHUNKS if pl.cdiv(width, c) * c * 8 <= width * 9]
            chunk = fits[0] if fits else TRITON_CHUNKS[-1]
        n_loop = pl.cdiv(width, chunk)
        rows = block_rows or (min(TRITON_BLOCK_ELEMS // chunk, 16) if n_loop == 1 else 1)
        rows = max(1, min(rows, pl.next_power_of_2(m)))
        return Tiling(backend, m, width, rows, block_w, chunk, n_loop, 0)
    if block_cols is not None and block_cols % 128:
        raise ValueError(f"block_cols must be a multiple of 128 for TPU, got {block_cols}")
    if block_rows is not None and block_rows % 8:
        raise ValueError(f"block_rows must be a multiple of 8 for TPU, got {block_rows}")
    chunk = block_cols or TPU_CHUNK
    n_loop, tail = (1, 0) if width <= chunk else divmod(width, chunk)
    chunk = min(chunk, width)
    rows = block_rows or max(8, min(1024, TPU_BLOCK_ELEMS // width // 8 * 8))
    rows = m if m <= rows else rows
    return Tiling(backend, m, width, rows, width, chunk, n_loop, tail)


# ----------------------------------------------------------------------------
# In-kernel helpers.


def _load(t: Tiling, ref, start, size: int) -> Array:
    v = ref[:, pl.ds(start, size)].astype(f32)
    if t.masked:
        col = start + jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
        v = jnp.where(col < t.width, v, 0.0)
    return v


def _store(ref, start, v: Array) -> None:
    ref[:, pl.ds(start, v.shape[1])] = v.astype(ref.dtype)


def _foreach_chunk(t: Tiling, body: Callable, carry):
    """carry = body(start, size, carry) over the chunks of a row."""
    if t.n_loop == 1:
        carry = body(0, t.chunk, carry)
    elif t.n_loop > 1:

        def step(i, c):
            return body(pl.multiple_of(i * t.chunk, t.chunk), t.chunk, c)

        carry = jax.lax.fori_loop(0, t.n_loop, step, carry)
    if t.tail:
        carry = body(t.n_loop * t.chunk, t.tail, carry)
    return carry


def _reduce_then_apply(
    t: Tiling,
    in_refs: Sequence,
    out_refs: Sequence,
    reduce_fn: Callable[..., Cols] | None,
    mid_fn: Callable[[Cols], object],
    apply_fn: Callable[..., Sequence[Array]] | None,
    n_red: int = 0,
) -> None:
    """Pass 1 sums ``reduce_fn(*chunks)`` (per-row columns) over the row; ``mid_fn``
    turns the sums into a context; pass 2 stores ``apply_fn(ctx, *chunks)``."""
    if t.single:
        vals = [_load(t, r, 0, t.chunk) for r in in_refs]
        ctx = mid_fn(reduce_fn(*vals) if reduce_fn else [])
        if apply_fn:
            for ref, v in zip(out_refs, apply_fn(ctx, *vals), strict=True):
                _store(ref, 0, v)
        return
    sums = []
    if reduce_fn:

        def red(start, size, acc):
            part = reduce_fn(*[_load(t, r, start, size) for r in in_refs])
            return [a + p for a, p in zip(acc, part, strict=True)]

        sums = _foreach_chunk(t, red, [jnp.zeros((t.rows, 1), f32)] * n_red)
    ctx = mid_fn(sums)
    if apply_fn:

        def app(start, size, carry):
            outs = apply_fn(ctx, *[_load(t, r, start, size) for r in in_refs])
            for ref, v in zip(out_refs, outs, strict=True):
                _store(ref, start, v)
            return carry

        _foreach_chunk(t, app, 0)


def _store_cols(refs: Sequence, cols: Cols) -> None:
    for ref, v in zip(refs, cols, strict=True):
        ref[...] = v.astype(ref.dtype)


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------
# Kernels. ``mode`` is "fused" (one kernel does both passes), "sums" (per-row
# sums only) or "apply" (given the sums); the sharded path psums in between.


def _polynorm_fwd_kernel(*refs, t: Tiling, order: int, mode: str, glu: bool, eps: float):
    it = iter(refs)
    wide = _take(it, 2 if glu else 1)
    w, b = ([r[...] for r in _take(it, order)], next(it)[...]) if mode != "sums" else ([], None)
    s_in = [r[...] for r in _take(it, order)] if mode == "apply" else None
    y_ref = _take(it, 1) if mode != "sums" else []
    col_out = _take(it, order) if mode != "apply" else []

    def reduce_fn(x, *_):
        return cf.even_power_sums(x, order)

    def mid_fn(sums):
        if mode == "sums":
            _store_cols(col_out, sums)
            return None
        s = s_in if mode == "apply" else cf.stats_from_sums(sums, t.width, eps)
        _store_cols(col_out, s if mode == "fused" else [])
        return s

    def apply_fn(s, x, *up):
        y = cf.polynorm_apply(x, w, b, s)
        return [y * up[0] if glu else y]

    _reduce_then_apply(
        t,
        wide,
        y_ref,
        reduce_fn if mode != "apply" else None,
        mid_fn,
        apply_fn if mode != "sums" else None,
        order,
    )


def _polynorm_bwd_kernel(*refs, t: Tiling, order: int, mode: str, glu: bool, width: int):
    it = iter(refs)
    wide = _take(it, 3 if glu else 2)  # x, [up], g
    if mode != "sums":
        w, b = [r[...] for r in _take(it, order)], next(it)[...]
        s = [r[...] for r in _take(it, order)]
    c_in = [r[...] for r in _take(it, order)] if mode == "apply" else None
    d_refs = _take(it, 2 if glu else 1) if mode != "sums" else []
    col_out = _take(it, order + 1) if mode != "apply" else []

    def g_eff(g, up):
        return g * up[0] if glu else g

    def reduce_fn(x, *rest):
        c, gsum = cf.grad_dots(x, g_eff(rest[-1], rest[:-1]), order)
        return [*c, gsum]

    def mid_fn(sums):
        _store_cols(col_out, sums)
        return c_in if mode == "apply" else sums[:order]

    def apply_fn(c, x, *rest):
        g, up = rest[-1], rest[:-1]
        dx = cf.polynorm_dx(x, g_eff(g, up), w, s, c, width)
        return [dx, g * cf.polynorm_apply(x, w, b, s)] if glu else [dx]

    _reduce_then_apply(
        t,
        wide,
        d_refs,
        reduce_fn if mode != "apply" else None,
        mid_fn,
        apply_fn if mode != "sums" else None,
        order + 1,
    )


def _polyrelu_fwd_kernel(*refs, t: Tiling, order: int):
    x_ref, *rest = refs
    w, b, y_ref = [r[...] for r in rest[:order]], rest[order][...], rest[order + 1]

    def body(start, size, carry):
        _store(y_ref, start, cf.polyrelu_apply(_load(t, x_ref, start, size), w, b))
        return carry

    _foreach_chunk(t, body, 0)


def _polyrelu_bwd_kernel(*refs, t: Tiling, order: int):
    x_ref, g_ref, *rest = refs
    w = [r[...] for r in rest[:order]]
    dx_ref, col_out = rest[order], rest[order + 1 :]

    def body(start, size, acc):
        x, g = _load(t, x_ref, start, size), _load(t, g_ref, start, size)
        dx, dots, gsum = cf.polyrelu_grads(x, g, w)
        _store(dx_ref, start, dx)
        return [a + p for a, p in zip(acc, [*dots, gsum], strict=True)]

    _store_cols(col_out, _foreach_chunk(t, body, [jnp.zeros((t.rows, 1), f32)] * (order + 1)))


# ----------------------------------------------------------------------------
# pallas_call plumbing.


def _block_spec(t: Tiling, kind: str) -> pl.BlockSpec:
    if kind == "wide":
        return pl.BlockSpec((t.rows, t.block_w), lambda i: (i, 0))
    if kind == "col":
        return pl.BlockSpec((t.rows, 1), lambda i: (i, 0))
    return pl.BlockSpec((1, 1), lambda i: (0, 0))  # "shared"


def _compiler_params(t: Tiling):
    if t.backend == "tpu":
        return pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=TPU_VMEM_LIMIT
        )
    tile = t.rows * t.chunk
    return plgpu_triton.CompilerParams(
        num_warps=4 if tile <= 2048 else 8, num_stages=2 if t.n_loop > 1 else 1
    )


def _call(
    kernel: Callable,
    t: Tiling,
    ins: Sequence[tuple[Array, str]],
    outs: Sequence[tuple[str, jnp.dtype]],
    interpret: bool,
    name: str,
) -> list[Array]:
    out_shape = [
        jax.ShapeDtypeStruct((t.m, t.width) if kind == "wide" else (t.m, 1), dtype)
        for kind, dtype in outs
    ]
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(t.m, t.rows),),
        in_specs=[_block_spec(t, kind) for _, kind in ins],
        out_specs=[_block_spec(t, kind) for kind, _ in outs],
        compiler_params=_compiler_params(t),
        interpret=interpret,
        name=name,
    )(*[a for a, _ in ins])


def _col_arg(c: Array, m: int) -> tuple[Array, str]:
    """A (..., 1) column as an (m, 1) per-row or a (1, 1) shared kernel input."""
    return (c.reshape(1, 1), "shared") if c.size == 1 else (c.reshape(m, 1), "col")


@dataclasses.dataclass(frozen=True)
class PallasOps:
    """The kernel operations (same interface as ``XlaOps``) on Pallas kernels.

    backend: "triton" (GPU) or "tpu". interpret: run the kernel in Pallas
    interpret mode (CPU). block_rows / block_cols override the tiling.
    """

    backend: str = "triton"
    interpret: bool = False
    block_rows: int | None = None
    block_cols: int | None = None

    def _run(self, kernel, x, wide, cols, outs, name, **kw):
        lead, h = x.shape[:-1], x.shape[-1]
        m = math.prod(lead)
        t = make_tiling(self.backend, m, h, self.block_rows, self.block_cols)
        ins = [(a.reshape(m, h), "wide") for a in wide] + [_col_arg(c, m) for c in cols]
        res = _call(functools.partial(kernel, t=t, **kw), t, ins, outs, self.interpret, name)
        return [r.reshape(*lead, r.shape[-1]) for r in res]

    def sums(self, x: Array, order: int) -> Cols:
        kw = dict(order=order, mode="sums", glu=False, eps=0.0)
        return self._run(_polynorm_fwd_kernel, x, [x], [], [("col", f32)] * order, "pn_sums", **kw)

    def apply(self, x: Array, up: Array | None, w: Cols, b: Array, s: Cols) -> Array:
        wide = [x] if up is None else [x, up]
        kw = dict(order=len(w), mode="apply", glu=up is not None, eps=0.0)
        (y,) = self._run(
            _polynorm_fwd_kernel, x, wide, [*w, b, *s], [("wide", x.dtype)], "pn_apply", **kw
        )
        return y

    def forward(
        self, x: Array, up: Array | None, w: Cols, b: Array, eps: float
    ) -> tuple[Array, Cols]:
        order, wide = len(w), [x] if up is None else [x, up]
        outs = [("wide", x.dtype)] + [("col", f32)] * order
        kw = dict(order=order, mode="fused", glu=up is not None, eps=eps)
        y, *s = self._run(_polynorm_fwd_kernel, x, wide, [*w, b], outs, "pn_fwd", **kw)
        return y, s

    def dots(self, x: Array, up: Array | None, g: Array, order: int) -> tuple[Cols, Array]:
        wide = [x, g] if up is None else [x, up, g]
        kw = dict(order=order, mode="sums", glu=up is not None, width=0)
        *c, gsum = self._run(
            _polynorm_bwd_kernel, x, wide, [], [("col", f32)] * (order + 1), "pn_dots", **kw
        )
        return c, gsum

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
        glu = up is not None
        wide = [x, up, g] if glu else [x, g]
        outs = [("wide", x.dtype)] + ([("wide", up.dtype)] if glu else [])
        kw = dict(order=len(w), mode="apply", glu=glu, width=width)
        res = self._run(_polynorm_bwd_kernel, x, wide, [*w, b, *s, *c], outs, "pn_dx", **kw)
        return res[0], (res[1] if glu else None)

    def backward(
        self, x: Array, up: Array | None, g: Array, w: Cols, b: Array, s: Cols
    ) -> tuple[Array, Array | None, Cols, Array]:
        order, glu = len(w), up is not None
        wide = [x, up, g] if glu else [x, g]
        outs = [("wide", x.dtype)] + ([("wide", up.dtype)] if glu else [])
        outs += [("col", f32)] * (order + 1)
        kw = dict(order=order, mode="fused", glu=glu, width=x.shape[-1])
        res = self._run(_polynorm_bwd_kernel, x, wide, [*w, b, *s], outs, "pn_bwd", **kw)
        dx, dup = res[0], (res[1] if glu else None)
        *c, gsum = res[2 if glu else 1 :]
        return dx, dup, c, gsum

    def relu_forward(self, x: Array, w: Cols, b: Array) -> Array:
        (y,) = self._run(
            _polyrelu_fwd_kernel, x, [x], [*w, b], [("wide", x.dtype)], "pr_fwd", order=len(w)
        )
        return y

    def relu_backward(self, x: Array, g: Array, w: Cols) -> tuple[Array, Cols, Array]:
        order = len(w)
        outs = [("wide", x.dtype)] + [("col", f32)] * (order + 1)
        dx, *rest = self._run(_polyrelu_bwd_kernel, x, [x, g], w, outs, "pr_bwd", order=order)
        return dx, rest[:order], rest[order]
