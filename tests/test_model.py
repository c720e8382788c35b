"""The decoder: attention pieces against references, causality, segments, scan,
remat, dtypes, parameter counts and config validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from polyjax import attention, layers
from polyjax.model import (
    REMAT_POLICIES,
    ModelConfig,
    MoEConfig,
    Transformer,
    param_counts,
    preset,
)


def tiny(**kw) -> ModelConfig:
    d = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    if "moe" in kw:
        kw["moe"] = {"num_experts": 4, "top_k": 2, "d_expert": 16, **kw["moe"]}
    else:
        d["d_ff"] = 48
    d.update(kw)
    return ModelConfig.from_dict(d)


def tokens(b=2, length=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, 64)


def naive_attention(q, k, v, seg):
    """Causal attention with explicit head repetition, loops-free numpy."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    length = q.shape[1]
    ok = np.tril(np.ones((length, length), bool))[None, None]
    ok = ok & (np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :])
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_causal_attention_grouped_heads_and_segments_match_reference():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 12, 4, 8))
    k = jax.random.normal(kk, (2, 12, 2, 8))
    v = jax.random.normal(kv, (2, 12, 2, 8))
    seg = jnp.array([[0] * 5 + [1] * 7, [3] * 12])
    out = attention.causal_attention(q, k, v, seg)
    np.testing.assert_allclose(out, naive_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)
    plain = attention.causal_attention(q, k, v)
    np.testing.assert_allclose(plain, naive_attention(q, k, v, jnp.zeros((2, 12))), atol=1e-5)


def test_rope_is_relative_and_identity_at_zero():
    x = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    y = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
    pos = lambda p: jnp.array([[p]])
    np.testing.assert_allclose(layers.rope(x, pos(0), 10000.0), x, atol=1e-6)

    def dot(m, n):
        return float(jnp.sum(layers.rope(x, pos(m), 100.0) * layers.rope(y, pos(n), 100.0)))

    assert dot(7, 3) == pytest.approx(dot(24, 20), rel=1e-4)
    assert dot(7, 3) != pytest.approx(dot(7, 4), rel=1e-3)
    np.testing.assert_allclose(
        jnp.linalg.norm(layers.rope(x, pos(5), 100.0)), jnp.linalg.norm(x), rtol=1e-5
    )


def test_rms_norm_hand_computation_and_no_decay_gain():
    norm = layers.RMSNorm((4,), ("embed",), eps=1e-6)
    assert isinstance(norm.scale, layers.NoDecayParam)
    norm.scale[...] = jnp.array([1.0, 2.0, 3.0, 4.0])
    x = jnp.array([[1.0, -2.0, 3.0, 0.5]])
    rms = np.sqrt(np.mean(np.square(x)) + 1e-6)
    np.testing.assert_allclose(norm(x), x / rms * np.array([1, 2, 3, 4]), rtol=1e-6)


@pytest.mark.parametrize("moe", [None, {}], ids=["dense", "moe"])
def test_changing_a_future_token_changes_no_earlier_logit(moe):
    cfg = tiny(moe=moe) if moe is not None else tiny()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tok = tokens(1)
    tok2 = tok.at[0, 9].set((tok[0, 9] + 1) % 64)
    a, _ = model(tok)
    b, _ = model(tok2)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_segments_attend_only_within_their_document():
    model = Transformer(tiny(qk_norm=True), rngs=nnx.Rngs(0))
    tok = tokens(1)
    seg = jnp.array([[0] * 6 + [1] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    packed, _ = model(tok, positions_BxL=pos, segment_ids_BxL=seg)
    first, _ = model(tok[:, :6])
    second, _ = model(tok[:, 6:])
    np.testing.assert_allclose(packed[:, :6], first, atol=1e-5)
    np.testing.assert_allclose(packed[:, 6:], second, atol=1e-5)
    unmasked, _ = model(tok, positions_BxL=pos)
    assert not np.allclose(unmasked[:, 6:], second, atol=1e-3)


def loss_fn(model, tok):
    logits, aux = model(tok[:, :-1])
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1))
    return ce + aux.get("moe_aux_loss", 0.0), aux


def _grads(model, tok):
    (loss, aux), g = nnx.value_and_grad(loss_fn, has_aux=True)(model, tok)
    return loss, aux, g


@pytest.mark.parametrize("moe", [None, {"per_expert_coeffs": True}], ids=["dense", "moe"])
def test_scan_over_layers_equals_python_loop(moe):
    extra = {} if moe is None else {"moe": moe}
    loop = Transformer(tiny(**extra), rngs=nnx.Rngs(0))
    scan = Transformer(tiny(scan_layers=True, remat="full", **extra), rngs=nnx.Rngs(1))
    # Give the scanned model the loop model's parameters, stacked over layers.
    per_layer = [nnx.state(b, nnx.Param) for b in loop.layers]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    for (_, dst), (_, src) in zip(
        nnx.to_flat_state(nnx.state(scan.layers, nnx.Param)),
        nnx.to_flat_state(stacked),
        strict=True,
    ):
        dst[...] = src[...]
    for name in ("embed", "head"):
        getattr(scan, name)[...] = getattr(loop, name)[...]
    assert scan.layers.attn.w_q.get_metadata()["axes"] == ("layers", "embed", "heads", "kv")
    tok = tokens()
    l1, aux1, g1 = _grads(loop, tok)
    l2, aux2, g2 = _grads(scan, tok)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for k in aux1:
        np.testing.assert_allclose(aux1[k], aux2[k], rtol=1e-5, atol=1e-7)
    g1_layers = jax.tree.map(lambda *a: jnp.stack(a), *[g1["layers"][i] for i in range(2)])
    for a, b in zip(jax.tree.leaves(g1_layers), jax.tree.leaves(g2["layers"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g1["embed"][...], g2["embed"][...], rtol=1e-4, atol=1e-7)


def test_remat_policies_give_the_same_gradients():
    tok = tokens()
    _, _, ref = _grads(Transformer(tiny(), rngs=nnx.Rngs(0)), tok)
    for policy in [p for p in REMAT_POLICIES if p != "none"]:
        _, _, g = _grads(Transformer(tiny(remat=policy), rngs=nnx.Rngs(0)), tok)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _temp_bytes(cfg: ModelConfig, batch: int = 8) -> int:
    """XLA's temporaries (bytes) of the compiled gradient of the loss, from shapes."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, tok):
        logits, _ = nnx.merge(graphdef, params, rest)(tok)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    tok = jax.ShapeDtypeStruct((batch, cfg.max_seq_len), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, tok).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_remat_saves_memory_with_and_without_scan(scan):
    """Recomputing the layers in the backward pass needs fewer bytes of temporaries
    (XLA's memory_analysis of the compiled gradient) than keeping every activation,
    for the Python loop over layers as for the scan."""
    size = dict(d_model=64, d_ff=256, n_layers=4, max_seq_len=128, scan_layers=scan)
    none = _temp_bytes(tiny(**size))
    for policy in ("full", "save_ffn_in"):
        assert _temp_bytes(tiny(remat=policy, **size)) < 0.8 * none, policy


def test_bf16_compute_fp32_params_close_to_fp32():
    tok = tokens()
    full, _ = Transformer(tiny(), rngs=nnx.Rngs(0))(tok)
    half_model = Transformer(tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
    half, _ = half_model(tok)
    assert half.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half_model, nnx.Param)))
    np.testing.assert_allclose(half, full, atol=0.05)


def test_param_counts_match_allocation_and_the_paper():
    cfg = tiny(moe={})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    allocated = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    counts = param_counts(cfg)
    assert counts["total"] == allocated
    expert = 2 * 4 * 32 * 16 * 2  # two matrices of (E, D, F) per layer, two layers
    assert counts["active"] == allocated - expert // 2  # top-2 of 4 experts
    dense = {
        a: param_counts(ModelConfig.from_dict(preset("dense", "1b", a)))["total"]
        for a in ("swiglu", "gelu", "relu", "polyrelu", "polynorm")
    }
    assert all(1.25e9 < n < 1.40e9 for n in dense.values()), dense
    assert max(dense.values()) / min(dense.values()) < 1.005
    moe = param_counts(ModelConfig.from_dict(preset("moe", "1b", "polynorm")))
    assert 6.85e9 < moe["total"] < 6.95e9 and 1.25e9 < moe["active"] < 1.35e9, moe
    swiglu = param_counts(ModelConfig.from_dict(preset("moe", "1b", "swiglu")))
    assert abs(swiglu["total"] - moe["total"]) / moe["total"] < 0.005


def test_presets_build_and_give_paper_widths():
    assert preset("dense", "1b", "swiglu")["d_ff"] == 5504
    assert preset("dense", "1b", "polynorm")["d_ff"] == 8256
    assert preset("moe", "1b", "swiglu")["moe"]["d_expert"] == 1024
    assert preset("moe", "1b", "polyrelu")["moe"]["d_expert"] == 1536
    cfg = ModelConfig.from_dict(preset("moe", "1b", "polynorm"))
    assert cfg.moe.num_experts == 64 and cfg.moe.top_k == 8 and not cfg.moe.renormalize
    assert cfg.qk_norm and cfg.n_layers == 16
    with pytest.raises(ValueError, match="family"):
        preset("sparse", "tiny", "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        preset("dense", "tiny", "relu3")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"d_modle": 32}, "unknown model key.*'d_modle'.*valid: vocab_size"),
        ({"n_heads": 5}, "n_heads=5: must divide d_model=32"),
        ({"n_kv_heads": 3}, "n_kv_heads=3: must divide n_heads=4"),
        ({"remat": "some"}, "remat='some': must be one of none, full, save_ffn_in"),
        ({"dtype": "fp8"}, "dtype='fp8'"),
        ({"d_ff": None}, "d_ff=None: must be an integer"),
        ({"moe": {"num_experts": 4, "top_k": 5}}, "moe.top_k=5: must be <= moe.num_experts=4"),
        ({"moe": {"dispatch": "sorted"}}, "moe.dispatch='sorted'"),
        ({"moe": {"experts": 4}}, "unknown moe key.*'experts'"),
        ({"activation": {"name": "polynorm", "power": 3}}, "unknown activation key"),
    ],
)
def test_bad_config_names_the_field(change, message):
    d = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32)
    d.update(change)
    if "moe" in change:
        d.pop("d_ff")
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(d)


def test_missing_field_and_too_long_input():
    with pytest.raises(ValueError, match="max_seq_len"):
        ModelConfig.from_dict(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48))
    assert MoEConfig.from_dict({"top_k": 1}).top_k == 1
    model = Transformer(tiny(max_seq_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(tokens(1, 9))


def test_flops_per_token_by_hand():
    from polyjax.model import flops_per_token

    cfg = ModelConfig.from_dict(preset("dense", "tiny", "relu"))
    V, D, F, L = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_layers
    kv = cfg.kv_heads * (D // cfg.n_heads)
    per_layer = D * D * 2 + D * kv * 2 + 2 * D * F  # q, o, k, v, w_in, w_out
    matmul = L * per_layer + D * V  # the head counts, the input embedding does not
    assert flops_per_token(cfg, 64) == 6 * matmul + 12 * L * D * 64 + 6 * (2 * L + 1) * D
