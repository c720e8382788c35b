"""Pallas kernels for PolyNorm, PolyNorm-GLU and PolyReLU: GPU (Triton) and TPU
(Mosaic), forward and backward, and the ``pallas_call``s that run them.

One program owns ``rows`` rows of the (M, H) input and walks them in column
chunks (``Plan``). Each kernel is two sweeps over the chunks at most: the first
adds the per-element terms of the row sums lane by lane (one (rows, chunk)
accumulator per sum) and reduces them once at the end; the second computes and
stores the outputs. A row of at most ``RESIDENT_MAX`` columns is "resident": its
chunks are loaded once, in unrolled code, and kept in registers for the second
sweep. A wider row is streamed: a loop over the chunks, read twice (the first
read leaves it in L2 on GPU).

GPU loads and stores go through ``plgpu.load`` / ``plgpu.store`` with explicit
masks wherever a tile can reach past the row's end (the tail chunk, padded to a
power of two) or past the last row (a row count the row block does not divide):
jax 0.11's Triton lowering adds no bounds masks of its own, jax 0.12 adds them
only for blocks that do not divide the array. On TPU the block is the whole row
(in VMEM), and the pipeline clips the last row block's copies.

Per-row results are (M, n) fp32 arrays: the r statistics (forward) and the r + 1
partials of the weight and bias gradients (backward); the caller reduces them.
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
from jax.experimental.pallas import triton as plgpu

from polyjax.kernels import closed_form as cf

Array = jax.Array
f32 = jnp.float32

BACKENDS = ("triton", "tpu", "mosaic_gpu")
RESIDENT_MAX = 16384  # Triton: rows up to this width are loaded once, kept in registers
TRITON_CHUNK = 4096  # columns of a full chunk
TRITON_TILE = 16384  # elements of a resident program's tile (rows x padded width)
TRITON_MAX_ROWS = 16
TPU_CHUNK = 2048
TPU_BLOCK_ELEMS = 1 << 19  # elements of a (rows, H) block
TPU_VMEM_LIMIT = 48 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Config:
    """How the Pallas kernels run: ``backend`` "triton" (GPU), "tpu", or
    "mosaic_gpu" (Hopper: ``kernels.mosaic_gpu`` for PolyNorm rows it supports,
    the Triton kernels for everything else);
    ``interpret`` runs them in Pallas interpret mode (CPU); ``block_rows``,
    ``block_cols`` and ``resident`` override the ``Plan``'s choices."""

    backend: str = "triton"
    interpret: bool = False
    block_rows: int | None = None
    block_cols: int | None = None
    resident: bool | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How an (m, width) array is cut: ``rows`` rows a program; a row is ``n_full``
    chunks of ``chunk`` columns, then a ``tail`` of the remaining columns held in
    a block ``tail_block`` wide (the next power of two on Triton); ``resident``:
    keep the loaded chunks for the second sweep instead of reading them again."""

    backend: str
    m: int
    width: int
    rows: int
    chunk: int
    n_full: int
    tail: int
    tail_block: int
    resident: bool

    @property
    def block_w(self) -> int:
        """The width of a program's block: every chunk fits inside it."""
        return self.n_full * self.chunk + self.tail_block

    @property
    def ragged_rows(self) -> bool:
        """The last program's rows reach past row m."""
        return self.m % self.rows != 0

    @property
    def num_warps(self) -> int:
        live = self.rows * (self.block_w if self.resident else self.chunk)
        return max(4, min(16, live // 512))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def make_plan(cfg: Config, m: int, width: int) -> Plan:
    """The ``Plan`` of an (m, width) array under ``cfg`` (docs/kernels.md)."""
    rows_kw, cols_kw = cfg.block_rows, cfg.block_cols
    if cfg.backend in ("triton", "mosaic_gpu"):
        for name, v in (("block_rows", rows_kw), ("block_cols", cols_kw)):
            if v is not None and not _pow2(v):
                raise ValueError(f"{name} must be a power of two for Triton, got {v}")
        chunk = min(cols_kw or TRITON_CHUNK, pl.next_power_of_2(width))
        n_full, tail = divmod(width, chunk)
        tail_block = pl.next_power_of_2(tail) if tail else 0
        resident = width <= RESIDENT_MAX if cfg.resident is None else cfg.resident
        if rows_kw:
            rows = rows_kw
        elif resident:
            block_w = n_full * chunk + tail_block
            rows = min(TRITON_MAX_ROWS, max(1, 1 << (TRITON_TILE // block_w).bit_length() - 1))
        else:
            rows = 1
        rows = min(rows, pl.next_power_of_2(m))
        return Plan("triton", m, width, rows, chunk, n_full, tail, tail_block, resident)
    if cols_kw is not None and cols_kw % 128:
        raise ValueError(f"block_cols must be a multiple of 128 for TPU, got {cols_kw}")
    if rows_kw is not None and rows_kw % 8:
        raise ValueError(f"block_rows must be a multiple of 8 for TPU, got {rows_kw}")
    chunk = min(cols_kw or TPU_CHUNK, width)
    n_full, tail = divmod(width, chunk)
    single = n_full + (tail > 0) == 1
    resident = single if cfg.resident is None else cfg.resident
    rows = rows_kw or max(8, min(1024, TPU_BLOCK_ELEMS // width // 8 * 8))
    rows = m if m <= rows else rows
    return Plan("tpu", m, width, rows, chunk, n_full, tail, tail, resident)


# ----------------------------------------------------------------------------
# What a program does with its rows: masked chunk loads and stores (Triton),
# plain ones (TPU), and the sweeps over a row's chunks.


@dataclasses.dataclass(frozen=True)
class _Rows:
    plan: Plan
    row_mask: Array | None  # (rows, 1): which of the program's rows exist; None: all

    @classmethod
    def of(cls, plan: Plan) -> _Rows:
        """The current program's rows (call at the kernel's top level)."""
        if not plan.ragged_rows:
            return cls(plan, None)
        left = plan.m - pl.program_id(0) * plan.rows
        return cls(plan, jax.lax.broadcasted_iota(jnp.int32, (plan.rows, 1), 0) < left)

    def _mask(self, size: int, block: int) -> Array | None:
        """(rows, block): the row mask and, for a padded tail, the column mask."""
        p, rows = self.plan, self.row_mask
        cols = None
        if block > size:
            cols = jax.lax.broadcasted_iota(jnp.int32, (1, block), 1) < size
        if rows is None or cols is None:
            mask = rows if cols is None else cols
            return None if mask is None else jnp.broadcast_to(mask, (p.rows, block))
        return rows & cols

    def load(self, ref, start, size: int, block: int, evict: str | None = None) -> Array:
        """Columns [start, start + size) of the rows, fp32, (rows, block); the
        padding (and missing rows) read as 0 on Triton."""
        if self.plan.backend == "tpu":
            return ref[:, pl.ds(start, size)].astype(f32)
        mask = self._mask(size, block)
        view = ref.at[:, pl.ds(start, block)]
        if mask is None:
            return plgpu.load(view, eviction_policy=evict).astype(f32)
        return plgpu.load(view, mask=mask, other=0.0, eviction_policy=evict).astype(f32)

    def store(self, ref, start, size: int, v: Array) -> None:
        v = v.astype(ref.dtype)
        if self.plan.backend == "tpu":
            ref[:, pl.ds(start, size)] = v
            return
        plgpu.store(ref.at[:, pl.ds(start, v.shape[1])], v, mask=self._mask(size, v.shape[1]))

    def cols(self, ref) -> list[Array]:
        """The columns of a per-row (rows, n) or shared (1, n) ref, fp32, each
        (rows, 1) or (1, 1)."""
        n = ref.shape[1]
        if self.plan.backend == "tpu":
            a = ref[...].astype(f32)
            return [a[:, i : i + 1] for i in range(n)]
        mask = self.row_mask if ref.shape[0] > 1 else None
        out = []
        for i in range(n):
            view = ref.at[:, pl.ds(i, 1)]
            v = plgpu.load(view) if mask is None else plgpu.load(view, mask=mask, other=0.0)
            out.append(v.astype(f32))
        return out

    def store_cols(self, ref, cols: Sequence[Array]) -> None:
        """Store r (rows, 1) columns into a per-row (rows, r) ref."""
        if self.plan.backend == "tpu":
            for i, c in enumerate(cols):
                ref[:, i : i + 1] = c.astype(ref.dtype)
            return
        mask = self.row_mask
        for i, c in enumerate(cols):
            plgpu.store(ref.at[:, pl.ds(i, 1)], c.astype(ref.dtype), mask=mask)

    def chunks(self) -> list[tuple[int, int, int]]:
        """(start, size, block) of every chunk, the tail last."""
        p = self.plan
        out = [(k * p.chunk, p.chunk, p.chunk) for k in range(p.n_full)]
        if p.tail:
            out.append((p.n_full * p.chunk, p.tail, p.tail_block))
        return out


Step = Callable[..., tuple[list[Array], list[Array]]]
"""step(*chunks) -> (outputs to store, per-element terms to sum over the row)."""


def _sweep(
    rows: _Rows,
    in_refs: Sequence,
    step: Step,
    n_sums: int,
    out_refs: Sequence = (),
    cache: list[list[Array]] | None = None,
    evict: str | None = None,
) -> tuple[list[Array], list[list[Array]] | None]:
    """One pass over a row's chunks: load ``in_refs`` (or take the first ones
    from ``cache``), run ``step``, store its outputs, add its terms lane by lane.
    Returns the n_sums row sums, (rows, 1) each, and, when the plan is resident,
    the loaded chunks (to be the next sweep's cache)."""
    plan = rows.plan

    def load_all(start, size, block, cached):
        vals = list(cached)
        for ref in in_refs[len(vals) :]:
            vals.append(rows.load(ref, start, size, block, evict))
        return vals

    def run(start, size, block, cached):
        vals = load_all(start, size, block, cached)
        outs, terms = step(*vals)
        for ref, v in zip(out_refs, outs, strict=True):
            rows.store(ref, start, size, v)
        return vals, terms

    chunks = rows.chunks()
    full, tail = chunks[: plan.n_full], chunks[plan.n_full :]
    acc: list[Array] | None = None  # per-lane partial sums over the full chunks
    sums = [jnp.zeros((plan.rows, 1), f32)] * n_sums
    loaded = []
    if plan.resident or len(full) <= 1:
        for k, (start, size, block) in enumerate(full):
            vals, terms = run(start, size, block, cache[k] if cache else [])
            loaded.append(vals)
            acc = terms if acc is None else [a + t for a, t in zip(acc, terms, strict=True)]
    else:

        def body(k, acc):
            start = pl.multiple_of(k * plan.chunk, plan.chunk)
            _, terms = run(start, plan.chunk, plan.chunk, [])
            return [a + t for a, t in zip(acc, terms, strict=True)]

        zeros = [jnp.zeros((plan.rows, plan.chunk), f32)] * n_sums
        acc = jax.lax.fori_loop(0, plan.n_full, body, zeros)
    if acc:
        sums = [cf.rowsum(a) for a in acc]
    for start, size, block in tail:
        vals, terms = run(start, size, block, cache[-1] if cache else [])
        loaded.append(vals)
        sums = [s + cf.rowsum(t) for s, t in zip(sums, terms, strict=True)]
    return sums, (loaded if plan.resident else None)


# ----------------------------------------------------------------------------
# The kernels. One per pass and op; ``up_ref`` is None without the GLU gate.


def _polynorm_fwd(plan, eps, x_ref, up_ref, w_ref, b_ref, y_ref, stats_ref):
    rows, order = _Rows.of(plan), w_ref.shape[1]
    sums, cache = _sweep(
        rows, [x_ref], lambda x: ([], cf.even_power_terms(x, order)), order, evict="evict_last"
    )
    s = cf.stats_from_sums(sums, plan.width, eps)
    rows.store_cols(stats_ref, s)
    w, (b,) = rows.cols(w_ref), rows.cols(b_ref)

    def out(x, up=None):
        y = cf.polynorm_apply(x, w, b, s)
        return [y if up is None else y * up], []

    in_refs = [x_ref] if up_ref is None else [x_ref, up_ref]
    _sweep(rows, in_refs, out, 0, [y_ref], cache, evict="evict_first")


def polynorm_fwd_kernel(x_ref, w_ref, b_ref, y_ref, stats_ref, *, plan: Plan, eps: float):
    _polynorm_fwd(plan, eps, x_ref, None, w_ref, b_ref, y_ref, stats_ref)


def polynorm_glu_fwd_kernel(
    x_ref, up_ref, w_ref, b_ref, y_ref, stats_ref, *, plan: Plan, eps: float
):
    _polynorm_fwd(plan, eps, x_ref, up_ref, w_ref, b_ref, y_ref, stats_ref)


def _polynorm_bwd(plan, x_ref, up_ref, g_ref, w_ref, b_ref, stats_ref, dx_ref, dup_ref, part_ref):
    rows, order = _Rows.of(plan), w_ref.shape[1]
    glu = up_ref is not None
    in_refs = [x_ref, up_ref, g_ref] if glu else [x_ref, g_ref]

    def dots(x, *rest):
        ge = rest[0] * rest[1] if glu else rest[0]
        return [], cf.grad_terms(x, ge, order)

    sums, cache = _sweep(rows, in_refs, dots, order + 1, evict="evict_last")
    c, gsum = sums[:order], sums[order]
    w, (b,), s = rows.cols(w_ref), rows.cols(b_ref), rows.cols(stats_ref)
    rows.store_cols(part_ref, [sp * cp for sp, cp in zip(s, c, strict=True)] + [gsum])

    def grads(x, *rest):
        if not glu:
            return [cf.polynorm_dx(x, rest[0], w, s, c, plan.width)], []
        up, g = rest
        dx = cf.polynorm_dx(x, g * up, w, s, c, plan.width)
        return [dx, g * cf.polynorm_apply(x, w, b, s)], []

    out_refs = [dx_ref, dup_ref] if glu else [dx_ref]
    _sweep(rows, in_refs, grads, 0, out_refs, cache, evict="evict_first")


def polynorm_bwd_kernel(x_ref, g_ref, w_ref, b_ref, stats_ref, dx_ref, part_ref, *, plan: Plan):
    _polynorm_bwd(plan, x_ref, None, g_ref, w_ref, b_ref, stats_ref, dx_ref, None, part_ref)


def polynorm_glu_bwd_kernel(
    x_ref, up_ref, g_ref, w_ref, b_ref, stats_ref, dx_ref, dup_ref, part_ref, *, plan: Plan
):
    _polynorm_bwd(plan, x_ref, up_ref, g_ref, w_ref, b_ref, stats_ref, dx_ref, dup_ref, part_ref)


def polyrelu_fwd_kernel(x_ref, w_ref, b_ref, y_ref, *, plan: Plan):
    rows = _Rows.of(plan)
    w, (b,) = rows.cols(w_ref), rows.cols(b_ref)
    _sweep(rows, [x_ref], lambda x: ([cf.polyrelu_apply(x, w, b)], []), 0, [y_ref])


def polyrelu_bwd_kernel(x_ref, g_ref, w_ref, dx_ref, part_ref, *, plan: Plan):
    rows, order = _Rows.of(plan), w_ref.shape[1]
    w = rows.cols(w_ref)

    def step(x, g):
        return [cf.polyrelu_dx(x, g, w)], cf.grad_terms(jnp.maximum(x, 0.0), g, order)

    sums, _ = _sweep(rows, [x_ref, g_ref], step, order + 1, [dx_ref])
    rows.store_cols(part_ref, sums)


# ----------------------------------------------------------------------------
# pallas_call plumbing.


def _compiler_params(plan: Plan):
    if plan.backend == "tpu":
        return pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=TPU_VMEM_LIMIT
        )
    return plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1 if plan.resident else 2)


def _spec(plan: Plan, a: Array, wide: bool) -> pl.BlockSpec:
    """A wide (M, H) array in (rows, block_w) blocks; an (M, n) per-row array in
    (rows, n) blocks; a shared (1, n) array whole."""
    if wide:
        return pl.BlockSpec((plan.rows, plan.block_w), lambda i: (i, 0))
    if a.shape[0] == 1:
        return pl.BlockSpec((1, a.shape[1]), lambda i: (0, 0))
    return pl.BlockSpec((plan.rows, a.shape[1]), lambda i: (i, 0))


def _cost(plan: Plan, wide, small, out_shape, sweeps: int, flops_per_element: int):
    """What the kernel reads, writes and computes, for XLA's cost model (a custom call
    is opaque to it): the wide inputs once per sweep, except where a row stays on chip
    (a TPU block holds the whole row; a resident Triton row)."""
    reads = 1 if plan.backend == "tpu" or plan.resident else sweeps
    nbytes = lambda arrays: sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)
    elements = plan.m * plan.width
    return pl.CostEstimate(
        flops=flops_per_element * elements,
        transcendentals=plan.m * 2,
        bytes_accessed=reads * nbytes(wide) + nbytes(small) + nbytes(out_shape),
    )


def _call(
    kernel,
    cfg: Config,
    name: str,
    wide: Sequence[Array],
    small: Sequence[Array],
    outs,
    *,
    sweeps: int = 1,
    flops: int = 8,
):
    """Run ``kernel`` over the rows: inputs ``wide`` (M, H) then ``small`` (M or 1,
    n); ``outs``: (dtype, n) pairs, n None for an (M, H) output. ``sweeps`` over a
    row and ``flops`` per element: the cost estimate given to XLA."""
    m, width = wide[0].shape
    plan = make_plan(cfg, m, width)
    out_shape = [jax.ShapeDtypeStruct((m, n or width), dt) for dt, n in outs]
    in_specs = [_spec(plan, a, True) for a in wide] + [_spec(plan, a, False) for a in small]
    out_specs = [_spec(plan, o, n is None) for o, (_, n) in zip(out_shape, outs, strict=True)]
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        out_shape=out_shape,
        grid=(pl.cdiv(m, plan.rows),),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_compiler_params(plan),
        interpret=cfg.interpret,
        name=name,
        cost_estimate=_cost(plan, wide, small, out_shape, sweeps, flops),
    )(*wide, *small)


def polynorm_forward(
    cfg: Config, x: Array, up: Array | None, w: Array, b: Array, eps: float
) -> tuple[Array, Array]:
    """y (M, H) in x's dtype and the statistics (M, r) fp32."""
    order = w.shape[1]
    outs = [(x.dtype, None), (f32, order)]
    if up is None:
        kernel = functools.partial(polynorm_fwd_kernel, eps=eps)
        y, s = _call(kernel, cfg, "polynorm_fwd", [x], [w, b], outs, sweeps=2, flops=6 * order)
    else:
        kernel = functools.partial(polynorm_glu_fwd_kernel, eps=eps)
        wide = [x, up]
        y, s = _call(kernel, cfg, "polynorm_glu_fwd", wide, [w, b], outs, sweeps=2, flops=6 * order)
    return y, s


def polynorm_backward(
    cfg: Config, x: Array, up: Array | None, g: Array, w: Array, b: Array, stats: Array
) -> tuple[Array, Array | None, Array]:
    """dx, dup (GLU only) and the per-row partials (M, r + 1)."""
    part = (f32, w.shape[1] + 1)
    if up is None:
        outs = [(x.dtype, None), part]
        dx, parts = _call(
            polynorm_bwd_kernel,
            cfg,
            "polynorm_bwd",
            [x, g],
            [w, b, stats],
            outs,
            sweeps=2,
            flops=12 * w.shape[1],
        )
        return dx, None, parts
    outs = [(x.dtype, None), (up.dtype, None), part]
    wide, small = [x, up, g], [w, b, stats]
    dx, dup, parts = _call(
        polynorm_glu_bwd_kernel,
        cfg,
        "polynorm_glu_bwd",
        wide,
        small,
        outs,
        sweeps=2,
        flops=14 * w.shape[1],
    )
    return dx, dup, parts


def polyrelu_forward(cfg: Config, x: Array, w: Array, b: Array) -> Array:
    (y,) = _call(polyrelu_fwd_kernel, cfg, "polyrelu_fwd", [x], [w, b], [(x.dtype, None)])
    return y


def polyrelu_backward(cfg: Config, x: Array, g: Array, w: Array) -> tuple[Array, Array]:
    outs = [(x.dtype, None), (f32, w.shape[1] + 1)]
    dx, parts = _call(polyrelu_bwd_kernel, cfg, "polyrelu_bwd", [x, g], [w], outs)
    return dx, parts
