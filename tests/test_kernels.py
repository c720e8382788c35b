"""polyjax.kernels against the jnp reference (polyjax.activations).

Pallas kernels run in interpret mode on CPU, in both layouts ("triton": power-of-
two blocks, masked tails; "tpu": full-row blocks, static tail chunk); block
sizes are made small to force row chunking and partial row blocks. Triton and
TPU rules are checked by cross-lowering (no compile). fp32 tolerance ~1e-5
relative; bf16 1e-2 relative (one to two bf16 ulps of the output).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from polyjax import activations as acts
from polyjax import kernels
from polyjax.layers import FFN

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)

# (impl, pallas keywords): jnp custom VJP, both Pallas layouts unchunked, and
# chunked rows with partial row blocks.
IMPLS = [
    ("xla", {}),
    ("pallas", {"backend": "triton"}),
    ("pallas", {"backend": "tpu"}),
    ("pallas", {"backend": "triton", "block_rows": 2, "block_cols": 16}),
    ("pallas", {"backend": "tpu", "block_rows": 8, "block_cols": 128}),
]
IDS = ["xla", "triton", "tpu", "triton-chunked", "tpu-chunked"]


def _close(got, want, rtol):
    want = np.asarray(want, np.float32)
    atol = rtol * max(1e-3, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=atol)


def _vjp_all(f, args, g):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(g.astype(y.dtype))


def _check(f, ref, args, rtol, key=9):
    y_ref, g_ref = _vjp_all(ref, args, jax.random.normal(jax.random.key(key), ref(*args).shape))
    y, grads = _vjp_all(f, args, jax.random.normal(jax.random.key(key), y_ref.shape))
    assert y.dtype == y_ref.dtype
    _close(y, y_ref, rtol)
    for got, want in zip(grads, g_ref, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        _close(got, want, rtol)


def _coeffs(order, key=1):
    w = jax.random.normal(jax.random.key(key), (order,)) / order
    return w, jnp.array([0.1])


@pytest.mark.parametrize(("impl", "kw"), IMPLS, ids=IDS)
@pytest.mark.parametrize(("shape", "order"), [((3, 4, 300), 3), ((5, 37), 1), ((2, 37), 4)])
def test_polynorm_fp32_forward_and_grads(impl, kw, shape, order):
    x = jax.random.normal(jax.random.key(0), shape)
    w, b = _coeffs(order)
    f = lambda x, w, b: kernels.polynorm(x, w, b, impl=impl, **kw)
    _check(f, acts.polynorm, (x, w, b), 2e-5)


@pytest.mark.parametrize(("impl", "kw"), IMPLS[:3], ids=IDS[:3])
def test_polynorm_wide_odd_rows_and_order2(impl, kw):
    x = 2.0 * jax.random.normal(jax.random.key(2), (3, 1000))
    w, b = _coeffs(2)
    _check(
        lambda x, w, b: kernels.polynorm(x, w, b, impl=impl, **kw), acts.polynorm, (x, w, b), 2e-5
    )


@pytest.mark.parametrize(("impl", "kw"), IMPLS, ids=IDS)
def test_polynorm_bf16(impl, kw):
    x = jax.random.normal(jax.random.key(3), (12, 200)).astype(jnp.bfloat16)
    w, b = _coeffs(3)
    _check(
        lambda x, w, b: kernels.polynorm(x, w, b, impl=impl, **kw), acts.polynorm, (x, w, b), 1e-2
    )


@pytest.mark.parametrize(("impl", "kw"), [IMPLS[0], IMPLS[3], IMPLS[4]], ids=IDS[0:1] + IDS[3:])
def test_polynorm_per_row_coefficients(impl, kw):
    """Per-expert weights (E, 1, r) and biases (E, 1, 1) broadcast over tokens."""
    x = jax.random.normal(jax.random.key(4), (3, 5, 130))
    w = jax.random.normal(jax.random.key(5), (3, 1, 3)) / 3
    b = jnp.array([[[0.1]], [[0.2]], [[-0.3]]])
    _check(
        lambda x, w, b: kernels.polynorm(x, w, b, impl=impl, **kw), acts.polynorm, (x, w, b), 2e-5
    )


@pytest.mark.parametrize(("impl", "kw"), IMPLS, ids=IDS)
def test_polynorm_glu(impl, kw):
    gate = jax.random.normal(jax.random.key(6), (2, 3, 150))
    up = jax.random.normal(jax.random.key(7), (2, 3, 150))
    w, b = _coeffs(3)
    f = lambda g, u, w, b: kernels.polynorm_glu(g, u, w, b, impl=impl, **kw)
    _check(f, acts.polynorm_glu, (gate, up, w, b), 2e-5)


@pytest.mark.parametrize(("impl", "kw"), IMPLS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_polyrelu(impl, kw, dtype):
    x = jax.random.normal(jax.random.key(8), (4, 5, 140)).astype(dtype)
    w, b = _coeffs(3)
    rtol = 2e-5 if dtype == jnp.float32 else 1e-2
    _check(
        lambda x, w, b: kernels.polyrelu(x, w, b, impl=impl, **kw), acts.polyrelu, (x, w, b), rtol
    )


def test_tiling_splits_wide_rows():
    """Rows wider than one block are walked in chunks (no whole-row register tile)."""
    t = kernels.make_tiling("triton", 16384, 32768)
    assert t.chunk <= 4096 and t.n_loop * t.chunk == 32768 and t.rows == 1
    t = kernels.make_tiling("triton", 16384, 8256)
    assert t.n_loop * t.chunk >= 8256 and t.n_loop * t.chunk * 8 <= 8256 * 9 and t.masked
    t = kernels.make_tiling("triton", 16384, 1536)
    assert t.single and t.block_w == 2048 and t.rows > 1
    t = kernels.make_tiling("tpu", 16384, 8256)
    assert t.rows % 8 == 0 and t.block_w == 8256 and t.n_loop * t.chunk + t.tail == 8256
    assert kernels.make_tiling("tpu", 5, 37).rows == 5  # a block may equal the whole array
    with pytest.raises(ValueError, match="block_cols must be a power of two"):
        kernels.make_tiling("triton", 8, 64, block_cols=48)
    with pytest.raises(ValueError, match="block_rows must be a multiple of 8"):
        kernels.make_tiling("tpu", 64, 256, block_rows=4)


# ------------------------------------------------------------------ sharded


@pytest.mark.parametrize(("impl", "kw"), [IMPLS[0], IMPLS[1]], ids=IDS[:2])
@pytest.mark.parametrize("gated", [False, True])
def test_sharded_matches_unsharded(impl, kw, gated):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    x = jax.random.normal(jax.random.key(10), (4, 3, 64))
    up = jax.random.normal(jax.random.key(11), (4, 3, 64))
    w, b = _coeffs(3)
    if not gated:  # per-row (per-expert) coefficients, sharded like x's rows
        w, b = jax.random.normal(jax.random.key(12), (4, 1, 3)) / 3, jnp.full((4, 1, 1), 0.2)
    spec = P("data", None, "tensor")

    def f(x, up, w, b):
        up = up if gated else None
        return kernels.polynorm_sharded(x, w, b, mesh=mesh, spec=spec, up=up, impl=impl, **kw)

    def ref(x, up, w, b):
        return acts.polynorm_glu(x, up, w, b) if gated else acts.polynorm(x, w, b)

    _check(jax.jit(f), ref, (x, up, w, b), 2e-5)
    # Control: statistics over the local shard only (the official TP code) are wrong.
    local = jnp.concatenate([acts.polynorm(c, w, b) for c in jnp.split(x, 4, axis=-1)], -1)
    assert float(jnp.abs(local - acts.polynorm(x, w, b)).max()) > 1e-2


def test_sharded_bad_spec():
    mesh = Mesh(np.array(jax.devices()[:1]), ("tensor",))
    x, (w, b) = jnp.ones((2, 8)), _coeffs(3)
    with pytest.raises(ValueError, match="spec"):
        kernels.polynorm_sharded(x, w, b, mesh=mesh, spec=P("tensor", None))
    with pytest.raises(ValueError, match="axis"):
        kernels.polynorm_sharded(x, w, b, mesh=mesh, axis="model")


# ------------------------------------------------------------------ cross-lowering

CHIPS = {"cuda": ("NVIDIA H100 80GB HBM3", "triton"), "tpu": ("TPU v5 lite", "tpu")}


def _cross_lower(platform, f, *args):
    if not hasattr(jax.sharding, "use_abstract_mesh") or not hasattr(
        jax.sharding, "AbstractDevice"
    ):
        pytest.skip("this jax cannot cross-lower (no use_abstract_mesh / AbstractDevice)")
    dev = jax.sharding.AbstractDevice(
        device_kind=CHIPS[platform][0], num_cores=None, platform=platform
    )
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _fwd_bwd(f):
    def g(*args):
        y, vjp = jax.vjp(f, *args)
        return vjp(y)

    return g


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", [(64, 8256), (32, 1536), (8, 32768), (5, 37)])
def test_cross_lowering(platform, shape):
    """The real (non-interpret) kernels obey the Triton power-of-two rule and the
    TPU (8, 128) rule at the paper's widths and a wide row: forward and backward."""
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    w, b = jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    kw = dict(impl="pallas", backend=CHIPS[platform][1], interpret=False)
    fns = [
        (lambda x, w, b: kernels.polynorm(x, w, b, **kw), (x, w, b)),
        (lambda x, u, w, b: kernels.polynorm_glu(x, u, w, b, **kw), (x, x, w, b)),
        (lambda x, w, b: kernels.polyrelu(x, w, b, **kw), (x, w, b)),
    ]
    for f, args in fns:
        text = _cross_lower(platform, _fwd_bwd(f), *args)
        assert ("tpu_custom_call" if platform == "tpu" else "custom_call @__gpu") in text


@pytest.mark.parametrize(("platform", "block"), [("tpu", (3, 100)), ("cuda", (8, 100))])
def test_cross_lowering_rejects_bad_blocks(platform, block):
    """Control: the check above can fail (bad block shapes do not lower)."""
    from jax.experimental import pallas as pl

    def copy(x):
        t = kernels.make_tiling(CHIPS[platform][1], 8, 256)
        return pl.pallas_call(
            lambda i_ref, o_ref: o_ref.__setitem__(..., i_ref[...]),
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid=(1,),
            in_specs=[pl.BlockSpec(block, lambda i: (0, 0))],
            out_specs=pl.BlockSpec(block, lambda i: (0, 0)),
            compiler_params=kernels.pallas._compiler_params(t),
        )(x)

    with pytest.raises(ValueError, match=r"(8 and 128|power of 2)"):
        _cross_lower(platform, copy, jax.ShapeDtypeStruct((8, 256), jnp.float32))


# ------------------------------------------------------------------ dispatch, config, memory


def test_dispatch(monkeypatch):
    assert kernels.resolve_impl("auto", "cpu") == "xla"
    assert kernels.resolve_impl("pallas", "cpu") == "pallas"
    monkeypatch.setattr(kernels.dispatch, "AUTO_PALLAS", frozenset({"gpu"}))
    assert kernels.resolve_impl("auto", "gpu") == "pallas"
    assert kernels.resolve_impl("auto", "cpu") == "xla"
    assert kernels.resolve_impl("auto", "tpu") == "xla"
    assert isinstance(kernels.make_ops("auto"), kernels.XlaOps)  # this process runs on CPU
    ops = kernels.make_ops("pallas")
    assert isinstance(ops, kernels.PallasOps) and ops.interpret and ops.backend == "triton"
    with pytest.raises(ValueError, match="impl must be one of xla, pallas, auto"):
        kernels.make_ops("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.make_ops("pallas", backend="mosaic")


@pytest.mark.parametrize(("kernel", "prim"), [("xla", None), ("pallas", "pallas_call")])
def test_activation_config_selects_kernel(kernel, prim):
    x = jax.random.normal(jax.random.key(12), (4, 40))
    w, b = _coeffs(3)
    for name in ("polynorm", "polyrelu", "polyrelu_norm"):
        cfg = acts.ActivationConfig(name, kernel=kernel)
        text = str(jax.make_jaxpr(lambda x, cfg=cfg: acts.apply(cfg, x, weight=w, bias=b))(x))
        assert "custom_vjp_call" in text and (prim is None) == ("pallas_call" not in text)
        ref = {"polynorm": acts.polynorm, "polyrelu": acts.polyrelu}.get(name, acts.polyrelu_norm)
        _close(acts.apply(cfg, x, weight=w, bias=b), ref(x, w, b), 2e-5)


@pytest.mark.parametrize("name", ["polynorm", "polynorm_glu", "polyrelu"])
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


def test_custom_vjp_saves_only_x_and_row_stats():
    x = jnp.ones((128, 256), jnp.bfloat16)
    w, b = _coeffs(3)

    def saved(f):
        _, vjp = jax.vjp(f, x, w, b)
        return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))

    ours = saved(lambda x, w, b: kernels.polynorm(x, w, b, impl="xla"))
    assert ours <= x.nbytes + 2 * 128 * 3 * 4 + 64  # x, r fp32 stats a row, coefficients
    assert saved(acts.polynorm) > 8 * ours


def test_bad_inputs():
    x, (w, b) = jnp.ones((4, 8)), _coeffs(3)
    with pytest.raises(ValueError, match=r"weight: leading dims \(3,\) must broadcast"):
        kernels.polynorm(x, jnp.ones((3, 3)), b)
    with pytest.raises(ValueError, match="eps must be > 0"):
        kernels.polynorm(x, w, b, eps=0.0)
    with pytest.raises(ValueError, match="up: shape"):
        kernels.polynorm_glu(x, jnp.ones((4, 9)), w, b)
    with pytest.raises(ValueError, match="order r"):
        kernels.polyrelu(x, jnp.ones(()), b)
