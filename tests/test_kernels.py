"""polyjax.kernels against independent references, and the GPU/TPU kernels' IR.

- Values: every implementation (the jnp custom VJP, the Pallas kernels in
  interpret mode in both layouts, resident and streamed, ragged row blocks)
  against the jnp functions of polyjax.activations differentiated by JAX, and
  all of them (the jnp reference included) against a float64 numpy closed form
  for orders 1-6, widths 1 to 8193, |x| from 1e-4 to 100, zero rows and
  per-expert coefficients.
- IR: the real (non-interpret) kernels cross-lowered from CPU for an H100 and a
  TPU; the Triton IR is read back and every load and store of a tile that can
  reach past a row's end or the last row must carry a mask (jax 0.11 adds none).
- The autodiff table of docs/kernels.md, asserted as documented.

Run under the project's jax and, in CI, under jax 0.11.2 (the GPU machines').
Imports nothing beyond jax, flax, numpy and polyjax's model code.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from polyjax import activations as acts
from polyjax import kernels
from polyjax.layers import FFN, Activation

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)

JAX_011 = tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 12)


def _close(got, want, rtol):
    want = np.asarray(want, np.float64)
    atol = rtol * max(1e-3, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


@functools.partial(jax.jit, static_argnums=0)
def _vjp_all(f, args, g):
    """f(*args) and the gradients of all args for the cotangent g, jitted."""
    y, vjp = jax.vjp(f, *args)
    return (y, *vjp(g.astype(y.dtype)))


def _check(f, ref, args, rtol):
    """f's output and the gradients of all its arguments equal ref's."""
    g = jax.random.normal(jax.random.key(9), jax.eval_shape(ref, *args).shape)
    for got, want in zip(_vjp_all(f, args, g), _vjp_all(ref, args, g), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        _close(got, want, rtol)


# ------------------------------------------------------------------ against the jnp reference

# (impl, pallas keywords). Small chunks force multi-chunk rows (resident: kept
# in registers; streamed: a loop read twice); row counts below do not divide the
# row blocks, so the last block is ragged. The default plans run in the bf16
# and float64 tests.
IMPLS = {
    "xla": ("xla", {}),
    "triton-resident-chunks": ("pallas", {"backend": "triton", "block_rows": 2, "block_cols": 128}),
    "triton-streamed": (
        "pallas",
        {"backend": "triton", "block_rows": 2, "block_cols": 64, "resident": False},
    ),
    "tpu-chunks": ("pallas", {"backend": "tpu", "block_rows": 8, "block_cols": 128}),
    "tpu-semantics": (  # the TPU interpreter: simulated DMAs of the ragged last block
        "pallas",
        {"backend": "tpu", "block_rows": 8, "interpret": pltpu.InterpretParams()},
    ),
}


def _fns(impl, kw):
    return {
        "polynorm": (lambda x, u, w, b: kernels.polynorm(x, w, b, impl=impl, **kw)),
        "polynorm_glu": (lambda x, u, w, b: kernels.polynorm_glu(x, u, w, b, impl=impl, **kw)),
        "polyrelu": (lambda x, u, w, b: kernels.polyrelu(x, w, b, impl=impl, **kw)),
    }


REFS = {
    "polynorm": lambda x, u, w, b: acts.polynorm(x, w, b),
    "polynorm_glu": lambda x, u, w, b: acts.polynorm_glu(x, u, w, b),
    "polyrelu": lambda x, u, w, b: acts.polyrelu(x, w, b),
}


@pytest.mark.parametrize("name", list(IMPLS))
def test_fp32_matches_reference(name):
    """PolyNorm, PolyNorm-GLU and PolyReLU, forward and the gradients of x, up,
    weight and bias: 3 x 5 rows of width 300, per-expert coefficients (3, 1, 3)."""
    impl, kw = IMPLS[name]
    k = jax.random.split(jax.random.key(0), 4)
    x, up = jax.random.normal(k[0], (3, 5, 300)), jax.random.normal(k[1], (3, 5, 300))
    w, b = jax.random.normal(k[2], (3, 1, 3)) / 3, jnp.array([[[0.1]], [[0.2]], [[-0.3]]])
    for op, f in _fns(impl, kw).items():
        _check(f, REFS[op], (x, up, w, b), 2e-5)


@pytest.mark.parametrize("name", ["xla", "triton"])
def test_bf16_matches_reference(name):
    """bf16, the default plan (Triton: 12 rows in a 16-row block, a 200-wide row
    padded to 256 columns); the TPU layout's default plan runs in float64 below."""
    impl = "xla" if name == "xla" else "pallas"
    kw = {} if name == "xla" else {"backend": name}
    x = jax.random.normal(jax.random.key(3), (12, 200)).astype(jnp.bfloat16)
    up = jax.random.normal(jax.random.key(4), (12, 200)).astype(jnp.bfloat16)
    w, b = jax.random.normal(jax.random.key(5), (3,)) / 3, jnp.array([0.1])
    for op, f in _fns(impl, kw).items():
        _check(f, REFS[op], (x, up, w, b), 1e-2)


# ------------------------------------------------------------------ against float64


def _polynorm64(x, w, b, g, eps=1e-6):
    """y, dx, dw, db of PolyNorm in float64 numpy; dx by the closed form
    sum_p w_p (p x^(p-1) s_p g - (p/H) x^(2p-1) s_p^3 <g, x^p>). Shapes: x, g
    (..., H); w (..., r) and b (..., 1) broadcasting against x.shape[:-1]."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    H = x.shape[-1]
    y = np.broadcast_to(b, (*x.shape[:-1], 1)) + 0 * x
    dx, dw = np.zeros_like(x), np.zeros((*x.shape[:-1], w.shape[-1]))
    for p in range(1, w.shape[-1] + 1):
        wp, xp = w[..., p - 1 : p], x**p
        s = 1 / np.sqrt(np.mean(xp * xp, axis=-1, keepdims=True) + eps)
        c = np.sum(g * xp, axis=-1, keepdims=True)
        y = y + wp * s * xp
        dx = dx + wp * (p * x ** (p - 1) * s * g - (p / H) * x ** (2 * p - 1) * s**3 * c)
        dw[..., p - 1 : p] = s * c

    def unbroadcast(v, shape):
        lead = v.ndim - len(shape)
        v = v.sum(axis=tuple(range(lead)))
        axes = tuple(i for i, n in enumerate(shape) if n == 1 and v.shape[i] != 1)
        return v.sum(axis=axes, keepdims=True)

    return y, dx, unbroadcast(dw, w.shape), unbroadcast(np.sum(g, -1, keepdims=True), b.shape)


def test_float64_closed_form_is_the_derivative():
    """Control for the reference below: its dx is the float64 derivative
    (central differences of its own forward)."""
    rng = np.random.default_rng(0)
    x, g = rng.normal(size=(2, 9)), rng.normal(size=(2, 9))
    w, b = rng.normal(size=4), np.array([0.2])
    _, dx, _, _ = _polynorm64(x, w, b, g)
    h, fd = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        fd[i] = np.sum(g * (_polynorm64(x + e, w, b, g)[0] - _polynorm64(x - e, w, b, g)[0])) / (
            2 * h
        )
    np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-8)


F64_SIZES = [(1, 1), (2, 37), (3, 300), (4, 1000), (5, 129), (6, 8193)]
F64_IMPLS = {
    "reference": acts.polynorm,
    "xla": lambda x, w, b: kernels.polynorm(x, w, b, impl="xla"),
    "triton": lambda x, w, b: kernels.polynorm(x, w, b, impl="pallas", backend="triton"),
    "tpu": lambda x, w, b: kernels.polynorm(x, w, b, impl="pallas", backend="tpu"),
}


F64_CASES = [  # every order and width for the jnp implementations; each order for
    # one Pallas layout (their code is generic in the order)
    *[(name, o, w) for name in ("reference", "xla") for o, w in F64_SIZES],
    *[("triton", o, w) for o, w in F64_SIZES[0::2]],
    *[("tpu", o, w) for o, w in F64_SIZES[1::2]],
]


def _rows_of_every_scale(rng, n_sets, width):
    """n_sets x 6 rows: scales 1e-4, 1e-2, 1, 10, 100, then magnitudes spread
    log-uniformly over [1e-4, 100] within the row; random signs; the last set's
    second row all zeros."""
    scales = np.array([1e-4, 1e-2, 1.0, 10.0, 100.0])[:, None]
    x = np.empty((n_sets, 6, width))
    for e in range(n_sets):
        x[e, :5] = scales * rng.normal(size=(5, width))
        x[e, 5] = rng.choice([-1, 1], width) * 10 ** rng.uniform(-4, 2, width)
    x[-1, 1] = 0.0
    return x.astype(np.float32)


@pytest.mark.parametrize(("name", "order", "width"), F64_CASES)
def test_float64_reference(name, order, width):
    """Output and all gradients within 2e-5 of float64 (relative to the largest
    magnitude), per-expert coefficients (2 sets, (2, 1, r)), every input scale,
    and a zero row whose output is the bias exactly. Order 6 at |x| ~ 100 is
    where the backward used to underflow (s_p^3 formed before multiplying c_p)."""
    rng = np.random.default_rng(order)
    x = _rows_of_every_scale(rng, 2, width)
    g = rng.normal(size=x.shape).astype(np.float32)
    w = (rng.normal(size=(2, 1, order)) / order).astype(np.float32)
    b = np.array([[[0.25]], [[-0.5]]], np.float32)
    want = _polynorm64(x, w, b, g)
    got = _vjp_all(F64_IMPLS[name], (jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)), g)
    for label, a, e in zip(("y", "dx", "dw", "db"), got, want, strict=True):
        _close(a, e, 5e-5 if label == "dx" else 2e-5)
    np.testing.assert_array_equal(np.asarray(got[0][1, 1]), np.full(width, -0.5, np.float32))


# ------------------------------------------------------------------ the IR

CHIPS = {"cuda": "NVIDIA H100 80GB HBM3", "tpu": "TPU v5 lite"}


def _lower(platform, f, *args):
    """Lower jit(f) for ``platform`` from this CPU-only process."""
    dev = jax.sharding.AbstractDevice(
        device_kind=CHIPS[platform], num_cores=None, platform=platform
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))


def _triton_memory_ops(lowered):
    """(kernel name, op, tile shape, has a mask) of every tt.load / tt.store in
    the Triton modules the lowered program carries (as MLIR bytecode)."""
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    found = []

    def walk(op, visit):
        for region in op.regions:
            for block in region:
                for inner in block:
                    visit(inner)
                    walk(inner, visit)

    def visit_triton(name):
        def visit(op):
            if op.name in ("tt.load", "tt.store"):
                t = op.operands[0].type
                shape = tuple(t.shape) if isinstance(t, ir.RankedTensorType) else ()
                masked = len(op.operands) > (1 if op.name == "tt.load" else 2)
                found.append((name, op.name, shape, masked))

        return visit

    def visit_hlo(op):
        if op.name == "stablehlo.custom_call" and "mhlo.backend_config" in op.attributes:
            cfg = op.attributes["mhlo.backend_config"]
            if "ir" in cfg:
                ctx = ir.Context()
                triton.dialect.register_dialect(ctx)
                with ctx:
                    module = ir.Module.parse(cfg["ir"].value_bytes)
                    walk(module.operation, visit_triton(ir.StringAttr(cfg["name"]).value))

    walk(lowered.compiler_ir("stablehlo").operation, visit_hlo)
    return found


def _fwd_bwd(f):
    def run(*args):
        y, vjp = jax.vjp(f, *args)
        return vjp(y)

    return run


def _lowered_kernels(platform, m, width, **kw):
    """Forward and backward of the three kernels (per-row weights) lowered for
    ``platform``."""
    x = jax.ShapeDtypeStruct((m, width), jnp.bfloat16)
    w, b = jax.ShapeDtypeStruct((m, 3), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    backend = "triton" if platform == "cuda" else "tpu"
    fns = _fns("pallas", dict(backend=backend, interpret=False, **kw))
    return [_lower(platform, _fwd_bwd(f), x, x, w, b) for f in fns.values()]


# The paper's widths and a wide row, row counts that no row block divides, the
# default plans and forced 2-row blocks (so the 1-row plans of wide rows also
# meet a ragged last block).
IR_CASES = [
    (16385, 1536, None),
    (16387, 5504, None),
    (16385, 8256, None),
    (16385, 32768, None),
    (9, 8256, 2),
    (9, 32768, 2),
]


@pytest.mark.parametrize(("m", "width", "block_rows"), IR_CASES)
def test_triton_ir_masks_every_tile_that_can_reach_past(m, width, block_rows):
    """Every tt.load / tt.store of a tile that can pass the last row (more than
    one row, and m not a multiple of the row block) or the row's end (the tail
    chunk, padded to a power of two) carries a mask."""
    plan = kernels.make_plan(kernels.pallas_config("pallas", block_rows=block_rows), m, width)
    ops = [
        op
        for low in _lowered_kernels("cuda", m, width, block_rows=block_rows)
        for op in _triton_memory_ops(low)
    ]
    names = {name for name, *_ in ops}
    assert len(names) == 6, names  # 3 ops x (forward, backward)
    assert all(len(shape) == 2 for *_, shape, _ in ops), ops  # (rows, cols) tiles
    need = 0
    for name, op, shape, masked in ops:
        rows, cols = shape
        past_last_row = rows > 1 and m % rows != 0
        past_row_end = cols == plan.tail_block and plan.tail_block > plan.tail
        if past_last_row or past_row_end:
            need += 1
            assert masked, f"{name}: {op} of a {shape} tile has no mask ({m} x {width})"
    ragged = m % plan.rows != 0 and plan.rows > 1
    assert (need > 0) == (ragged or plan.tail_block > plan.tail)


def test_ir_check_sees_a_missing_mask():
    """Control: a kernel that relies on the lowering's bounds handling (a
    (8, 2048) block over a (5, 1536) array). jax 0.11 lowers it without masks
    (the out-of-bounds writes of issue 13), jax 0.12 adds them."""

    def copy(x):
        return pl.pallas_call(
            lambda x_ref, y_ref: y_ref.__setitem__(..., x_ref[...]),
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid=(1,),
            in_specs=[pl.BlockSpec((8, 2048), lambda i: (0, 0))],
            out_specs=pl.BlockSpec((8, 2048), lambda i: (0, 0)),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        )(x)

    ops = _triton_memory_ops(_lower("cuda", copy, jax.ShapeDtypeStruct((5, 1536), jnp.float32)))
    assert {op for _, op, _, _ in ops} == {"tt.load", "tt.store"}
    assert all(not masked for *_, masked in ops) if JAX_011 else all(m for *_, m in ops)


@pytest.mark.parametrize(
    ("m", "width", "block_rows"), [(341, 1536, None), (13, 5504, 8), (13, 8256, 8), (9, 32768, 8)]
)
def test_tpu_lowering(m, width, block_rows):
    """The TPU kernels obey Mosaic's block rules ((8, 128) or the whole dim) at
    the same widths with ragged row blocks; the pipeline clips the last block."""
    for low in _lowered_kernels("tpu", m, width, block_rows=block_rows):
        assert low.as_text().count("tpu_custom_call") == 2  # forward, backward


def test_mosaic_gpu_matches_reference():
    """The Mosaic GPU kernels (rows staged in shared memory) in Mosaic GPU
    interpret mode: 3 bf16 rows of width 8192, PolyNorm with per-row and
    PolyNorm-GLU with shared coefficients, output and all gradients."""
    k = jax.random.split(jax.random.key(7), 3)
    x, up = jax.random.normal(k[0], (2, 3, 8192), jnp.bfloat16)
    w_rows, b_rows = jax.random.normal(k[1], (3, 2)) / 2, jnp.array([[0.1], [0.2], [0.3]])
    w, b = jax.random.normal(k[2], (3,)) / 3, jnp.array([-0.2])
    fns = _fns("pallas", {"backend": "mosaic_gpu"})
    text = str(jax.make_jaxpr(lambda *a: _vjp_all(fns["polynorm_glu"], a, x))(x, up, w, b))
    assert "polynorm_glu_fwd_mgpu" in text and "polynorm_glu_bwd_mgpu" in text
    _check(fns["polynorm"], REFS["polynorm"], (x, up, w_rows, b_rows), 1e-2)
    _check(fns["polynorm_glu"], REFS["polynorm_glu"], (x, up, w, b), 1e-2)


@pytest.mark.parametrize(("m", "width"), [(16384, 16384), (16385, 32768), (7, 65536)])
def test_mosaic_gpu_lowering(m, width):
    """Cross-lowered for an H100 (Mosaic GPU's own checks run: TMA box sizes,
    layouts, shared memory within 227 KiB): PolyNorm and PolyNorm-GLU forward and
    backward use the Mosaic GPU kernels where the staged rows fit, Triton where
    they do not (65536 columns: the forward only, and no GLU)."""
    x = jax.ShapeDtypeStruct((m, width), jnp.bfloat16)
    w, b = jax.ShapeDtypeStruct((m, 3), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    fns = _fns("pallas", {"backend": "mosaic_gpu", "interpret": False})
    for op in ("polynorm", "polynorm_glu"):
        low = _lower("cuda", _fwd_bwd(fns[op]), x, x, w, b)
        text = low.as_text()
        n_mosaic = text.count("custom_call @mosaic_gpu")
        n_triton = len({name for name, *_ in _triton_memory_ops(low)})
        staged = {"polynorm": (1, 2), "polynorm_glu": (2, 3)}[op]
        want = sum(n * width * 2 <= kernels.mosaic_gpu.SMEM_BYTES for n in staged)
        assert (n_mosaic, n_triton) == (want, 2 - want), (op, n_mosaic, n_triton)


@pytest.mark.parametrize(("platform", "block"), [("tpu", (3, 100)), ("cuda", (8, 100))])
def test_cross_lowering_rejects_bad_blocks(platform, block):
    """Control: lowering enforces the TPU (8, 128) and Triton power-of-two rules."""
    params = {
        "tpu": pltpu.CompilerParams(dimension_semantics=("parallel",)),
        "cuda": plgpu.CompilerParams(num_warps=4, num_stages=1),
    }[platform]

    def copy(x):
        return pl.pallas_call(
            lambda i_ref, o_ref: o_ref.__setitem__(..., i_ref[...]),
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid=(1,),
            in_specs=[pl.BlockSpec(block, lambda i: (0, 0))],
            out_specs=pl.BlockSpec(block, lambda i: (0, 0)),
            compiler_params=params,
        )(x)

    with pytest.raises(ValueError, match=r"(8 and 128|power of 2)"):
        _lower(platform, copy, jax.ShapeDtypeStruct((8, 256), jnp.float32))


def test_plans():
    """Resident rows up to 16384 columns, streamed beyond; the paper's widths."""
    plan = lambda backend, m, w, **kw: kernels.make_plan(kernels.pallas.Config(backend, **kw), m, w)
    p = plan("triton", 16384, 32768)
    assert not p.resident and (p.rows, p.chunk, p.n_full, p.tail) == (1, 4096, 8, 0)
    p = plan("triton", 16384, 8256)  # two chunks and an exact 64-column tail: no padding
    assert p.resident and (p.rows, p.n_full, p.tail, p.tail_block) == (1, 2, 64, 64)
    p = plan("triton", 16384, 1536)  # one padded chunk, 8 rows a program
    assert p.resident and (p.rows, p.n_full, p.tail_block, p.block_w) == (8, 0, 2048, 2048)
    p = plan("tpu", 16384, 8256)
    assert p.rows % 8 == 0 and p.n_full * p.chunk + p.tail == 8256
    assert plan("tpu", 5, 37).rows == 5  # a block may be the whole array
    with pytest.raises(ValueError, match="block_cols must be a power of two"):
        plan("triton", 8, 64, block_cols=48)
    with pytest.raises(ValueError, match="block_rows must be a multiple of 8"):
        plan("tpu", 64, 256, block_rows=4)
    with pytest.raises(ValueError, match="backend must be one of triton, tpu"):
        kernels.pallas.Config("mosaic")


# ------------------------------------------------------------------ transforms (docs/kernels.md)


def test_autodiff_table():
    """grad and vmap work for every kernel choice; forward mode only for the
    reference (the custom VJPs raise a TypeError, linearize when its linear map
    is called); second order for the reference and xla, not for Pallas."""
    x, t = jax.random.normal(jax.random.key(0), (2, 4, 8))
    w, b = jnp.array([0.5, 0.3, 0.2]), jnp.array([0.1])

    def loss_of(f):
        return jax.jit(lambda x: jnp.sum(jnp.sin(f(x, w, b))))

    def grad2(loss):
        return jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2)))(x)

    naive = loss_of(_polynorm_naive)
    want_grad, want_grad2 = jax.grad(naive)(x), grad2(naive)
    want_vmap = _polynorm_naive(x, w, b).reshape(2, 2, 8)
    ref = loss_of(acts.polynorm)
    _close(jax.jvp(ref, (x,), (t,))[1], jnp.vdot(want_grad, t), 1e-5)
    _close(jax.linearize(ref, x)[1](t), jnp.vdot(want_grad, t), 1e-5)
    for name, f in (
        ("reference", acts.polynorm),
        ("xla", lambda x, w, b: kernels.polynorm(x, w, b, impl="xla")),
        ("pallas", lambda x, w, b: kernels.polynorm(x, w, b, impl="pallas")),
    ):
        loss = loss_of(f)
        _close(jax.grad(loss)(x), want_grad, 2e-5)
        _close(jax.jit(jax.vmap(lambda x, f=f: f(x, w, b)))(x.reshape(2, 2, 8)), want_vmap, 2e-5)
        if name != "reference":
            with pytest.raises(TypeError, match="forward-mode autodiff"):
                jax.jvp(loss, (x,), (t,))
            with pytest.raises(TypeError, match="forward-mode autodiff"):
                jax.linearize(loss, x)[1](t)
        if name == "pallas":
            with pytest.raises(ValueError):
                grad2(loss)
        else:
            _close(grad2(loss), want_grad2, 1e-4)


def _polynorm_naive(x, w, b, eps=1e-6):
    """PolyNorm written out power by power (second derivatives' reference)."""
    out = b
    for p in range(1, w.shape[0] + 1):
        xp = x**p
        out = out + w[p - 1] * xp / jnp.sqrt(jnp.mean(xp * xp, axis=-1, keepdims=True) + eps)
    return out


# ------------------------------------------------------------------ the Activation module


@pytest.mark.parametrize(
    ("kernel", "marker"),
    [("xla", "custom_vjp_call"), ("pallas", "pallas_call"), ("reference", None)],
)
def test_activation_module_reads_the_kernel(kernel, marker):
    """kernel="xla" is the custom VJP, "pallas" adds the kernel, "reference" is
    plain jnp; all equal the jnp function."""
    x = jax.random.normal(jax.random.key(12), (4, 40))
    w, b = jax.random.normal(jax.random.key(13), (3,)) / 3, jnp.array([0.1])
    for name in ("polynorm", "polyrelu", "polyrelu_norm"):
        act = Activation(acts.ActivationConfig(name, kernel=kernel), rngs=nnx.Rngs(0))
        text = str(jax.make_jaxpr(lambda x, act=act: act(x, weight=w, bias=b))(x))
        assert ("custom_vjp_call" in text) == (kernel != "reference")
        assert ("pallas_call" in text) == (kernel == "pallas")
        _close(act(x, weight=w, bias=b), getattr(acts, name)(x, w, b), 2e-5)
    with pytest.raises(ValueError, match=r"weight.*order 3"):
        Activation(acts.ActivationConfig("polynorm", kernel=kernel), rngs=nnx.Rngs(0))(
            x, weight=w[:2], bias=b
        )


@pytest.mark.parametrize("name", ["polynorm", "polynorm_glu"])
def test_ffn_pallas_equals_xla(name):
    """A whole FFN forward and backward with kernel="pallas" (interpret) equals
    kernel="xla", parameter gradients included."""

    def loss_and_grads(kernel):
        cfg = acts.ActivationConfig(name, kernel=kernel)
        ffn = FFN(16, 48, cfg, init=nnx.initializers.normal(0.2), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(13), (2, 3, 16))
        loss = lambda m: jnp.mean(jnp.square(m(x)))
        return nnx.value_and_grad(loss)(ffn)

    (l_p, g_p), (l_x, g_x) = loss_and_grads("pallas"), loss_and_grads("xla")
    _close(l_p, l_x, 1e-5)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x), strict=True):
        _close(a, b, 2e-5)


# ------------------------------------------------------------------ dispatch, memory, errors


def test_dispatch(monkeypatch):
    assert kernels.resolve_impl("auto", "cpu") == "xla"
    assert kernels.resolve_impl("pallas", "cpu") == "pallas"
    monkeypatch.setattr(kernels.dispatch, "AUTO_PALLAS", frozenset({"gpu"}))
    assert kernels.resolve_impl("auto", "gpu") == "pallas"
    assert kernels.resolve_impl("auto", "cpu") == "xla"
    assert kernels.resolve_impl("auto", "tpu") == "xla"
    assert kernels.pallas_config("auto") is None  # this process runs on CPU
    cfg = kernels.pallas_config("pallas")
    assert cfg.interpret and cfg.backend == "triton"
    with pytest.raises(ValueError, match="impl must be one of xla, pallas, auto"):
        kernels.pallas_config("cuda")


def test_dispatch_follows_the_compile_target():
    """While compiling for a chip that is not here (polyjax.aot), the target's
    platform picks the layout and turns interpret mode off; "auto" is Pallas on GPU
    only (docs/aot.md has the compiled figures behind it)."""
    from polyjax import backend

    with backend.compiling_for("tpu"):
        cfg = kernels.pallas_config("pallas")
        assert (cfg.backend, cfg.interpret) == ("tpu", False)
        assert kernels.pallas_config("auto") is None
    with backend.compiling_for("cuda"):
        assert kernels.pallas_config("auto").backend == "triton"


def test_custom_vjp_saves_only_x_and_row_stats():
    x = jax.ShapeDtypeStruct((128, 256), jnp.bfloat16)
    w, b = jnp.ones(3) / 3, jnp.array([0.1])

    def saved(f):  # the arrays the backward keeps, traced only
        leaves = jax.eval_shape(lambda x: jax.tree.leaves(jax.vjp(f, x, w, b)[1]), x)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)

    ours = saved(lambda x, w, b: kernels.polynorm(x, w, b, impl="xla"))
    assert ours <= 128 * 256 * 2 + 2 * 128 * 3 * 4 + 64  # x, r fp32 stats a row, coefficients
    assert saved(acts.polynorm) > 8 * ours


def test_bad_inputs():
    x, w, b = jnp.ones((4, 8)), jnp.ones(3), jnp.array([0.1])
    with pytest.raises(ValueError, match=r"weight: leading dims \(3,\) must broadcast"):
        kernels.polynorm(x, jnp.ones((3, 3)), b)
    with pytest.raises(ValueError, match="eps must be > 0"):
        kernels.polynorm(x, w, b, eps=0.0)
    with pytest.raises(ValueError, match="eps must be a Python float"):
        kernels.polynorm(x, w, b, eps=jnp.float32(1e-6))
    with pytest.raises(ValueError, match="up: shape"):
        kernels.polynorm_glu(x, jnp.ones((4, 9)), w, b)
    with pytest.raises(ValueError, match="order r"):
        kernels.polyrelu(x, jnp.ones(()), b)
