"""PolyNorm and PolyNorm-GLU for wide rows on Hopper GPUs: Mosaic GPU kernels
(``plgpu.kernel``) that stage each row in shared memory, so a row is read from
HBM once at any width (the Triton streamed plan reads it twice).

One CTA (one warpgroup) per row. The row, viewed as (R, 256), arrives by TMA in
``COPY_CHUNKS`` pieces, each with its own barrier, so the first sweep (the row
sums, lane by lane in (8, 256) tiles, reduced once at the end) starts on the
first piece while the rest are in flight; the second sweep computes the outputs
from shared memory, writes them over the staged input in place, and TMA copies
them out. Coefficients, statistics and the per-row gradient partials travel as
(8,)-padded vectors (a TMA copy moves at least 16 bytes).

Limits: 16-bit inputs, a width that is a multiple of 8192, and the staged arrays
(x, up, g as the pass needs) within ``SMEM_BYTES``; ``supports`` says which.
Validated only in Mosaic GPU interpret mode on CPU and by cross-lowering for an
H100 (docs/kernels.md): never run on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from polyjax.kernels import closed_form as cf

Array = jax.Array
f32 = jnp.float32

COLS = 256  # a TMA box holds at most 256 elements along a dimension
SUB = 8  # rows of the (R, COLS) view per register tile: 2048 elements, 16 a thread
COPY_CHUNKS = 4
VEC = 8  # padded length of the per-row vectors
SMEM_BYTES = 200 * 1024  # of the 227 KiB a Hopper CTA may use


def supports(width: int, dtype, n_staged: int) -> bool:
    """Whether rows of ``width`` in ``dtype`` fit these kernels with ``n_staged``
    full rows in shared memory (2 forward with GLU, 3 backward with GLU)."""
    itemsize = jnp.dtype(dtype).itemsize
    fits = n_staged * width * itemsize <= SMEM_BYTES
    return itemsize == 2 and width % (COLS * SUB * COPY_CHUNKS) == 0 and fits


def _pad(a: Array) -> Array:
    """(1 or M, n) fp32 -> (1 or M, VEC)."""
    return jnp.pad(a.astype(f32), ((0, 0), (0, VEC - a.shape[1])))


def _stage(gmem_refs, smem_refs, bars, row):
    """Start the TMA copies of the row of every (M, R, COLS) ref, in COPY_CHUNKS
    pieces; barrier k * len(refs) + j tracks piece k of ref j."""
    rows = smem_refs[0].shape[0]
    piece = rows // COPY_CHUNKS
    for k in range(COPY_CHUNKS):
        for j, (src, dst) in enumerate(zip(gmem_refs, smem_refs, strict=True)):
            at = pl.ds(k * piece, piece)
            plgpu.copy_gmem_to_smem(src.at[row, at], dst.at[at], bars.at[k * len(smem_refs) + j])


def _first_sweep(smem_refs, bars, n_staged, terms_fn, n_sums):
    """Wait for each piece of ``smem_refs`` (the first of the ``n_staged``
    staged arrays), then add terms_fn(*tiles) lane by lane over the row;
    returns the n_sums row sums (scalars)."""
    rows = smem_refs[0].shape[0]
    piece = rows // COPY_CHUNKS
    acc = tuple(jnp.zeros((SUB, COLS), f32) for _ in range(n_sums))
    for k in range(COPY_CHUNKS):
        for j in range(len(smem_refs)):
            plgpu.barrier_wait(bars.at[k * n_staged + j])

        def body(i, acc, k=k):
            at = pl.ds(k * piece + i * SUB, SUB)
            terms = terms_fn(*[r[at, :].astype(f32) for r in smem_refs])
            return tuple(a + t for a, t in zip(acc, terms, strict=True))

        acc = jax.lax.fori_loop(0, piece // SUB, body, acc)
    return [jnp.sum(a) for a in acc]


def _second_sweep(in_refs, out_refs, fn):
    """out_refs[:, tile] = fn(*in tiles) over the row (in place is fine: a tile
    is read before it is written)."""

    def body(i, carry):
        at = pl.ds(i * SUB, SUB)
        outs = fn(*[r[at, :].astype(f32) for r in in_refs])
        for ref, v in zip(out_refs, outs, strict=True):
            ref[at, :] = v.astype(ref.dtype)
        return carry

    jax.lax.fori_loop(0, in_refs[0].shape[0] // SUB, body, 0)


def _vector(gmem_ref, smem_ref, bar, row):
    """Copy the row's (VEC,) vector (or the shared one) into shared memory."""
    src = gmem_ref.at[row if gmem_ref.shape[0] > 1 else 0]
    plgpu.copy_gmem_to_smem(src, smem_ref, bar)
    plgpu.barrier_wait(bar)


def _polynorm_fwd(order, width, eps, x_gmem, up_gmem, w_gmem, b_gmem, y_gmem, stats_gmem, scratch):
    *staged, w_smem, b_smem, s_smem, bars, vec_bars = scratch
    x_smem, n = staged[0], len(staged)
    row = jax.lax.axis_index("rows")
    _stage([x_gmem] if up_gmem is None else [x_gmem, up_gmem], staged, bars, row)
    _vector(w_gmem, w_smem, vec_bars.at[0], row)
    _vector(b_gmem, b_smem, vec_bars.at[1], row)
    sums = _first_sweep([x_smem], bars, n, lambda x: cf.even_power_terms(x, order), order)
    for k in range(COPY_CHUNKS if n == 2 else 0):  # the first sweep waited for x only
        plgpu.barrier_wait(bars.at[2 * k + 1])
    s = cf.stats_from_sums(sums, width, eps)
    w, b = [w_smem[p] for p in range(order)], b_smem[0]

    def out(x, *up):
        y = cf.polynorm_apply(x, w, b, s)
        return [y * up[0] if up else y]

    _second_sweep(staged, [x_smem], out)
    for p in range(order):
        s_smem[p] = s[p]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(x_smem, y_gmem.at[row])
    plgpu.copy_smem_to_gmem(s_smem, stats_gmem.at[row])
    plgpu.wait_smem_to_gmem(0)


def _polynorm_bwd(
    order, width, x_gmem, up_gmem, g_gmem, w_gmem, b_gmem, stats_gmem, dx_gmem, dup_gmem,
    part_gmem, scratch,
):  # fmt: skip
    *staged, w_smem, b_smem, s_smem, p_smem, bars, vec_bars = scratch
    row = jax.lax.axis_index("rows")
    glu = up_gmem is not None
    gmem = [x_gmem, up_gmem, g_gmem] if glu else [x_gmem, g_gmem]
    x_smem, up_smem = staged[0], staged[1] if glu else None
    _stage(gmem, staged, bars, row)
    _vector(w_gmem, w_smem, vec_bars.at[0], row)
    _vector(b_gmem, b_smem, vec_bars.at[1], row)
    _vector(stats_gmem, s_smem, vec_bars.at[2], row)

    def dots(x, *rest):
        return cf.grad_terms(x, rest[0] * rest[1] if glu else rest[0], order)

    *c, gsum = _first_sweep(staged, bars, len(staged), dots, order + 1)
    w, b = [w_smem[p] for p in range(order)], b_smem[0]
    s = [s_smem[p] for p in range(order)]

    def grads(x, *rest):
        if not glu:
            return [cf.polynorm_dx(x, rest[0], w, s, c, width)]
        up, g = rest
        return [cf.polynorm_dx(x, g * up, w, s, c, width), g * cf.polynorm_apply(x, w, b, s)]

    _second_sweep(staged, [x_smem, up_smem] if glu else [x_smem], grads)
    for p in range(order):
        p_smem[p] = s[p] * c[p]
    p_smem[order] = gsum
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(x_smem, dx_gmem.at[row])
    if glu:
        plgpu.copy_smem_to_gmem(up_smem, dup_gmem.at[row])
    plgpu.copy_smem_to_gmem(p_smem, part_gmem.at[row])
    plgpu.wait_smem_to_gmem(0)


def polynorm_fwd_kernel(x_gmem, w_gmem, b_gmem, y_gmem, stats_gmem, *scratch, order, width, eps):
    _polynorm_fwd(order, width, eps, x_gmem, None, w_gmem, b_gmem, y_gmem, stats_gmem, scratch)


def polynorm_glu_fwd_kernel(
    x_gmem, up_gmem, w_gmem, b_gmem, y_gmem, stats_gmem, *scratch, order, width, eps
):
    _polynorm_fwd(order, width, eps, x_gmem, up_gmem, w_gmem, b_gmem, y_gmem, stats_gmem, scratch)


def polynorm_bwd_kernel(
    x_gmem, g_gmem, w_gmem, b_gmem, stats_gmem, dx_gmem, part_gmem, *scratch, order, width
):
    _polynorm_bwd(
        order, width, x_gmem, None, g_gmem, w_gmem, b_gmem, stats_gmem, dx_gmem, None,
        part_gmem, scratch,
    )  # fmt: skip


def polynorm_glu_bwd_kernel(
    x_gmem, up_gmem, g_gmem, w_gmem, b_gmem, stats_gmem, dx_gmem, dup_gmem, part_gmem, *scratch,
    order, width,
):  # fmt: skip
    _polynorm_bwd(
        order, width, x_gmem, up_gmem, g_gmem, w_gmem, b_gmem, stats_gmem, dx_gmem, dup_gmem,
        part_gmem, scratch,
    )  # fmt: skip


def _run(kernel, wide, small, outs, n_vecs, interpret, name):
    """Run ``kernel`` with one CTA per row: ``wide`` (M, H) inputs staged as
    (M, R, COLS); ``small`` (1 or M, n) fp32 inputs padded to VEC; ``outs``:
    (dtype, None) for an (M, H) output, (f32, n) for a per-row vector."""
    m, width = wide[0].shape
    view = (m, width // COLS, COLS)
    out_type = [
        jax.ShapeDtypeStruct(view, dt) if n is None else jax.ShapeDtypeStruct((m, VEC), f32)
        for dt, n in outs
    ]
    smem = [plgpu.SMEM(view[1:], a.dtype) for a in wide]
    vecs = [plgpu.SMEM((VEC,), f32)] * n_vecs
    scratch = [
        *smem,
        *vecs,
        plgpu.Barrier(num_barriers=COPY_CHUNKS * len(wide)),
        plgpu.Barrier(num_barriers=3),
    ]
    call = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(m,),
        grid_names=("rows",),
        scratch_types=scratch,
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
    )
    res = call(*[a.reshape(view) for a in wide], *[_pad(a) for a in small])
    return [
        r.reshape(m, width) if n is None else r[:, :n] for r, (_, n) in zip(res, outs, strict=True)
    ]


def polynorm_forward(
    x: Array, up: Array | None, w: Array, b: Array, eps: float, interpret: bool = False
) -> tuple[Array, Array]:
    """y (M, H) and the statistics (M, r); see ``pallas.polynorm_forward``."""
    order, width = w.shape[1], x.shape[1]
    outs = [(x.dtype, None), (f32, order)]
    kw = dict(order=order, width=width, eps=eps)
    if up is None:
        kernel = functools.partial(polynorm_fwd_kernel, **kw)
        return tuple(_run(kernel, [x], [w, b], outs, 3, interpret, "polynorm_fwd_mgpu"))
    kernel = functools.partial(polynorm_glu_fwd_kernel, **kw)
    return tuple(_run(kernel, [x, up], [w, b], outs, 3, interpret, "polynorm_glu_fwd_mgpu"))


def polynorm_backward(
    x: Array, up: Array | None, g: Array, w: Array, b: Array, stats: Array, interpret: bool = False
) -> tuple[Array, Array | None, Array]:
    """dx, dup (GLU only) and the per-row partials (M, r + 1)."""
    order, width = w.shape[1], x.shape[1]
    part = (f32, order + 1)
    kw = dict(order=order, width=width)
    if up is None:
        kernel = functools.partial(polynorm_bwd_kernel, **kw)
        outs = [(x.dtype, None), part]
        dx, parts = _run(kernel, [x, g], [w, b, stats], outs, 4, interpret, "polynorm_bwd_mgpu")
        return dx, None, parts
    kernel = functools.partial(polynorm_glu_bwd_kernel, **kw)
    outs = [(x.dtype, None), (up.dtype, None), part]
    name = "polynorm_glu_bwd_mgpu"
    dx, dup, parts = _run(kernel, [x, up, g], [w, b, stats], outs, 4, interpret, name)
    return dx, dup, parts
