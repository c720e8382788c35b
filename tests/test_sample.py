"""KV-cache decoding: cached logits and greedy tokens against full-sequence forward
passes (dense and MoE, unsharded and on 8 devices), and the sampling filters."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from polyjax import sample
from polyjax import sharding as shd
from polyjax.data.tokenizers import ByteTokenizer
from polyjax.model import ModelConfig, Transformer, init_cache
from polyjax.restore import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
EOS = 63  # the fake end-of-text id of the tiny models (never produced by argmax in practice)


def tiny(family: str, **kw) -> ModelConfig:
    d = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
    if family == "moe":
        d.update(qk_norm=True, moe=dict(num_experts=4, top_k=2, d_expert=16))
        d["activation"] = dict(name="polynorm")
    else:
        d.update(d_ff=48, activation=dict(name="polyrelu"))
    d.update(kw)
    return ModelConfig.from_dict(d)


def model_and_state(cfg: ModelConfig, seed: int = 0):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # Non-trivial coefficients so that every power matters.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "coeffs" in map(str, path):
            key = jax.random.key(hash(path) % 2**31)
            var[...] = var[...] + 0.3 * jax.random.normal(key, var[...].shape)
    return model


PROMPTS = [[5, 9, 2, 33, 17, 8, 40], [12, 3, 30]]


def left_pad(rows, width):
    prompt, start = sample._left_pad(rows, width, EOS)
    return jnp.asarray(prompt), jnp.asarray(start)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_1xL):
    return nnx.merge(graphdef, state)(tokens_1xL)[0][0]


def full_logits(model, row):
    """The full-sequence forward pass (one compiled shape: right-padded to the
    context; causal, so the padding changes nothing before it)."""
    width = model.cfg.max_seq_len
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(row)] = row
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens)))[: len(row)]


@pytest.mark.parametrize("family,scan", [("dense", False), ("moe", True)])
def test_cached_logits_equal_the_full_forward(family, scan):
    cfg = tiny(family, scan_layers=scan)
    model = model_and_state(cfg)
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda s, *a: nnx.merge(graphdef, s).decode(*a))
    decode = functools.partial(decode, state)
    prompt, start = left_pad(PROMPTS, 8)
    cache = init_cache(cfg, 2, 12)
    logits, cache = decode(prompt, cache, jnp.int32(0), start)
    rows = [list(p) for p in PROMPTS]
    for b, row in enumerate(rows):
        np.testing.assert_allclose(logits[b, 8 - len(row) :], full_logits(model, row), atol=2e-5)
    for step in range(3):  # one token at a time, fed from the cache
        nxt = jnp.asarray([[7 + step], [21 + step]], jnp.int32)
        logits, cache = decode(nxt, cache, jnp.int32(8 + step), start)
        for b, row in enumerate(rows):
            row.append(int(nxt[b, 0]))
            np.testing.assert_allclose(logits[b, 0], full_logits(model, row)[-1], atol=2e-5)


def greedy_reference(model, row, n):
    """Greedy tokens by full forward passes over the growing text, EOS after EOS."""
    row, out = list(row), []
    for _ in range(n):
        token = EOS if EOS in out else int(np.argmax(full_logits(model, row)[-1]))
        out.append(token)
        row.append(token)
    return out


def run_generate(model, prompts, steps, mesh=None, **kw):
    graphdef, state = nnx.split(model)
    prompt, start = left_pad(prompts, 8)
    if mesh is not None:
        prompt = jax.device_put(prompt, shd.batch_sharding(mesh))
    out = sample.generate_tokens(
        graphdef,
        state,
        prompt,
        start,
        jax.random.key(0),
        jnp.int32(steps),
        steps=steps,
        sampling=kw.get("sampling", sample.GREEDY),
        eos_id=EOS,
    )
    return np.asarray(out)


@pytest.mark.parametrize("family,scan", [("dense", False), ("moe", True)])
def test_greedy_decoding_equals_argmax_of_full_forward_passes(family, scan):
    model = model_and_state(tiny(family, scan_layers=scan), seed=1)
    out = run_generate(model, PROMPTS, steps=6)
    for b, row in enumerate(PROMPTS):
        assert out[b].tolist() == greedy_reference(model, row, 6)


MESHES = {
    "dense": {"data": 2, "fsdp": 2, "tensor": 2},
    "moe": {"data": 2, "expert": 2, "tensor": 2},
}


@pytest.mark.parametrize("family,mesh_shape", MESHES.items())
def test_sharded_greedy_decoding_on_8_devices(family, mesh_shape):
    cfg = tiny(family)
    model = model_and_state(cfg, seed=2)
    prompts = [*PROMPTS, [4, 4, 4, 4], [60, 1]]
    expected = run_generate(model, prompts, steps=5)
    mesh = shd.make_mesh(mesh_shape)
    shard = shd.ActivationSharding(mesh, shd.DEFAULT_RULES)
    sharded = Transformer(cfg, rngs=nnx.Rngs(0), shard=shard)
    state = nnx.state(model)
    nnx.update(sharded, jax.device_put(state, shd.model_shardings(state, mesh)))
    assert len(nnx.state(sharded, nnx.Param)["embed"][...].sharding.device_set) == 8
    out = run_generate(sharded, prompts, steps=5, mesh=mesh)
    np.testing.assert_array_equal(out, expected)
    for b in (0, 3):
        assert out[b].tolist() == greedy_reference(model, prompts[b], 5)


def fake_run(cfg: ModelConfig, model) -> Run:
    tok = ByteTokenizer()
    tok = type("Tok", (), {"eos_id": EOS, "encode": tok.encode, "decode": tok.decode})()
    return Run(cfg, model, tok, shd.make_mesh({"data": -1}), 0, {})


def test_generate_slides_the_window_past_max_seq_len():
    cfg = tiny("dense", max_seq_len=16)
    model = model_and_state(cfg, seed=3)
    run = fake_run(cfg, model)
    [out] = sample.generate(run, [[5, 9, 2]], 20, stop_at_eos=False)
    assert len(out) == 20
    # Windows of 16 slots: the prompt left-padded to 8, 8 new tokens; then the last
    # 8 tokens of text as the next prompt, 8 more, and so on. Token k is greedy given
    # the text from its window's start (positions restart there).
    text = [5, 9, 2, *out]
    for k in range(20):
        begin = 0 if k < 8 else 3 + 8 * (k // 8) - 8
        assert out[k] == greedy_reference(model, text[begin : 3 + k], 1)[0], k


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    draw = lambda s: np.asarray(sample.sample_logits(logits, keys, s))
    counts = np.bincount(draw(sample.Sampling(temperature=1.0, top_p=1.0)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = np.bincount(draw(sample.Sampling(temperature=1.0, top_k=2, top_p=1.0)), minlength=4)
    np.testing.assert_allclose(top2[:2] / 4000, [0.625, 0.375], atol=0.03)
    assert top2[2:].sum() == 0
    # top_p 0.75: {0.5, 0.3} reach it; 0.15 is never drawn.
    nucleus = np.bincount(draw(sample.Sampling(temperature=1.0, top_p=0.75)), minlength=4)
    assert nucleus[2:].sum() == 0 and nucleus[1] > 0
    cold = draw(sample.Sampling(temperature=1e-4, top_p=1.0))
    assert (cold == 0).all()
    assert (draw(sample.GREEDY) == 0).all()
    with pytest.raises(ValueError, match="top_p"):
        sample.Sampling(top_p=0.0)


def test_launch_sample_refuses_bad_input_in_one_line(tmp_path, launch_py):
    launch_py("--sample").error("need --workdir")
    launch_py("--sample", "--workdir", tmp_path).error("holds no checkpoint")
    launch_py("--sample", "--workdir", tmp_path, "--top_p", "0").error("top_p")
