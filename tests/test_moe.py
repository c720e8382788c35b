"""The MoE layer: router, auxiliary losses, both dispatches against a naive loop;
sharded (8 CPU devices from conftest.py): the layer, the train step and its memory
against one device, the launcher's resume and its one-line errors."""

import functools
import math
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from polyjax import activations as acts
from polyjax import checkpoint as ckpt
from polyjax import metrics as mx
from polyjax import moe, train
from polyjax import sharding as sh
from polyjax.layers import no_shard
from polyjax.model import ModelConfig, Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
E, K, D, F = 4, 2, 16, 12
eight = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def layer(
    name="polynorm",
    per_expert=False,
    dispatch="dropless",
    factor=1.25,
    renorm=False,
    num_experts=E,
    shard=no_shard,
    expert_parallel="auto",
):
    m = moe.MoE(
        D,
        F,
        acts.ActivationConfig(name),
        num_experts=num_experts,
        top_k=K,
        renormalize=renorm,
        dispatch=dispatch,
        capacity_factor=factor,
        per_expert_coeffs=per_expert,
        init=nnx.initializers.normal(0.3),
        shard=shard,
        expert_parallel=expert_parallel,
        rngs=nnx.Rngs(0),
    )
    if m.act.coeffs is not None:  # distinct coefficients, so a wrong gather shows
        w, b = m.act.coeffs.weight, m.act.coeffs.bias
        w[...] = jax.random.uniform(jax.random.key(5), w[...].shape, minval=0.2, maxval=1.0)
        b[...] = jax.random.normal(jax.random.key(6), b[...].shape)
    return m


def naive(m, x_BxLxD):
    """Per token, per chosen expert: the expert's FFN, weighted by its gate."""
    x = np.asarray(x_BxLxD).reshape(-1, D)
    probs = np.asarray(jax.nn.softmax(x @ np.asarray(m.router[...]), axis=-1))
    out = np.zeros_like(x)
    coeffs = m.act.coeffs
    for t in range(x.shape[0]):
        chosen = np.argsort(-probs[t], kind="stable")[: m.top_k]
        gates = probs[t, chosen] / (probs[t, chosen].sum() if m.renormalize else 1.0)
        for e, g in zip(chosen, gates, strict=True):
            h = x[t] @ np.asarray(m.w_in[...][e])
            if coeffs is not None:
                w, b = coeffs.weight[...], coeffs.bias[...]
                w, b = (w[e], b[e]) if m.per_expert_coeffs else (w, b)
            if m.act.cfg.name == "swiglu":
                h = acts.swiglu(h, x[t] @ np.asarray(m.w_up[...][e]))
            elif m.act.cfg.name == "polynorm":  # normalised over the full width F
                h = acts.polynorm(h[None], w, b)[0]
            elif m.act.cfg.name == "polyrelu":
                h = acts.polyrelu(h[None], w, b)[0]
            else:
                h = acts.BASES[m.act.cfg.name](h)
            out[t] += g * (np.asarray(h) @ np.asarray(m.w_out[...][e]))
    return out.reshape(x_BxLxD.shape)


def inputs(b=2, length=8):
    return jax.random.normal(jax.random.key(1), (b, length, D))


def test_router_softmax_over_all_experts_then_top_k():
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 0.0, 2.5]])
    gates, experts, probs = moe.route(logits, 2)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_array_equal(experts, [[0, 1], [1, 3]])
    np.testing.assert_allclose(gates, [[p[0, 0], p[0, 1]], [p[1, 1], p[1, 3]]], rtol=1e-6)
    assert np.all(np.asarray(gates).sum(-1) < 1)  # not renormalised
    renorm, _, _ = moe.route(logits, 2, renormalize=True)
    top = np.array([[2.0, 1.0], [3.0, 2.5]])  # Mixtral: softmax over the chosen logits
    np.testing.assert_allclose(renorm, np.exp(top) / np.exp(top).sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(probs, p, rtol=1e-6)


def test_aux_losses_against_hand_computation():
    logits = jax.random.normal(jax.random.key(2), (6, E)) * 2
    _, experts, probs = moe.route(logits, K)
    counts = np.zeros(E)
    for e in np.asarray(experts).ravel():
        counts[e] += 1
    f = counts / (6 * K)
    p_mean = np.asarray(probs).mean(0)
    assert float(moe.load_balancing_loss(probs, experts)) == pytest.approx(E * (f @ p_mean))
    np.testing.assert_allclose(moe.expert_load(experts, E), f)
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    assert float(moe.router_z_loss(logits)) == pytest.approx(np.mean(lse**2), rel=1e-5)
    uniform = jnp.full((4, E), 1 / E)
    assert float(moe.load_balancing_loss(uniform, jnp.array([[0, 1], [2, 3]] * 2))) == 1.0


@pytest.mark.parametrize(
    "name, per_expert, renorm",
    [
        ("polynorm", False, False),
        ("polynorm", True, False),
        ("polyrelu", True, True),
        ("swiglu", False, False),
        ("relu2", False, False),
    ],
)
def test_dropless_equals_naive_per_token_loop(name, per_expert, renorm):
    m = layer(name, per_expert, renorm=renorm)
    x = inputs()
    y, stats = m(x)
    np.testing.assert_allclose(y, naive(m, x), rtol=1e-4, atol=1e-5)
    assert int(stats["dropped"]) == 0
    assert float(jnp.sum(stats["load"])) == pytest.approx(1.0)


def test_permute_rows_is_the_gather_in_values_and_gradients():
    """The scatter-written permutation against ``x[order]`` and its ``jax.grad``."""
    kx, kp, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (37, 5))
    order = jax.random.permutation(kp, 37)
    ct = jax.random.normal(kc, (37, 5))
    np.testing.assert_array_equal(moe.permute_rows(x, order), x[order])
    np.testing.assert_array_equal(moe.inverse_permutation(order)[order], jnp.arange(37))
    loss = lambda f: lambda x: jnp.sum(f(x) * ct)
    np.testing.assert_allclose(
        jax.grad(loss(lambda x: moe.permute_rows(x, order)))(x),
        jax.grad(loss(lambda x: x[order]))(x),
    )


def test_dropless_drops_nothing_under_total_imbalance_and_capacity_reports_drops():
    x = inputs()
    m = layer("polynorm", per_expert=True)
    m.router[...] = jnp.zeros_like(m.router[...])  # ties: every token picks experts 0, 1
    y, stats = m(x)
    np.testing.assert_allclose(stats["load"], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(y, naive(m, x), rtol=1e-4, atol=1e-5)
    assert int(stats["dropped"]) == 0
    cap = layer("polynorm", per_expert=True, dispatch="capacity", factor=1.0)
    cap.router[...] = jnp.zeros_like(cap.router[...])
    y_cap, cap_stats = cap(x)
    c = math.ceil(1.0 * 8 * K / E)  # 4 per expert per sequence of 8
    assert int(cap_stats["dropped"]) == 2 * K * (8 - c)
    # The first c tokens of each sequence keep both experts; the rest get nothing.
    np.testing.assert_allclose(y_cap[:, :c], y[:, :c], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y_cap[:, c:], 0.0)


@pytest.mark.parametrize("name, per_expert", [("polynorm", True), ("swiglu", False)])
def test_capacity_with_room_equals_dropless_values_and_grads(name, per_expert):
    x = inputs()
    drop = layer(name, per_expert)
    cap = layer(name, per_expert, dispatch="capacity", factor=float(E))

    def loss(m):
        y, stats = m(x)
        return jnp.sum(jnp.sin(y)), stats

    (l1, s1), g1 = nnx.value_and_grad(loss, has_aux=True)(drop)
    (l2, s2), g2 = nnx.value_and_grad(loss, has_aux=True)(cap)
    assert int(s1["dropped"]) == int(s2["dropped"]) == 0
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Sharded: the layer's exchange, the train step against one device, memory.


@eight
@pytest.mark.parametrize(
    "mesh_shape, shape, tied",
    [
        ({"expert": 8}, (8, 4), True),
        ({"expert": 4, "data": 2}, (8, 4), True),
        ({"data": 4, "tensor": 2}, (4, 3), False),
    ],
    ids=str,
)
def test_sharded_dropless_layer_equals_per_token_loop(mesh_shape, shape, tied):
    """Tied router logits send every assignment to experts 0 and 1: the device
    holding them receives the most a device can (full all_to_all buffers). 4 x 3
    tokens do not split over 8 devices: padded and cut off again."""
    mesh = sh.make_mesh(mesh_shape)
    shard = sh.ActivationSharding(mesh, sh.DEFAULT_RULES)
    m = layer(num_experts=8, per_expert=True, shard=shard, expert_parallel="all_to_all")
    if tied:
        m.router[...] = jnp.zeros_like(m.router[...])
    x = jax.random.normal(jax.random.key(1), (*shape, D))
    graphdef, state = nnx.split(m)
    y, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    if tied:
        np.testing.assert_allclose(stats["load"], [0.5, 0.5] + [0.0] * 6)
    np.testing.assert_allclose(y, naive(m, x), rtol=1e-4, atol=1e-5)


def tiny_moe() -> ModelConfig:
    """Two layers: a dropless one and a capacity one that drops (factor 1)."""
    return ModelConfig.from_dict(
        dict(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=32,
            qk_norm=True,
            activation={"name": "polynorm"},
            moe=dict(
                num_experts=8, top_k=2, d_expert=16, per_expert_coeffs=True, capacity_factor=1.0
            ),
        )
    )


def one_device():
    return sh.make_mesh({"data": 1}, jax.devices()[:1])


def capture_grads() -> optax.GradientTransformation:
    """An 'optimizer' that keeps the parameters and returns the gradients as its state."""
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    return optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))


def token_batch(mesh, batch=8, length=16):
    tok = jax.random.randint(jax.random.key(0), (batch, length + 1), 0, 64)
    b = dict(
        inputs=tok[:, :-1],
        targets=tok[:, 1:],
        positions=jnp.broadcast_to(jnp.arange(length), (batch, length)),
        segment_ids=jnp.ones((batch, length), jnp.int32),
        weights=jnp.ones((batch, length), jnp.float32),
    )
    return jax.device_put(b, sh.batch_sharding(mesh))


def train_step_fn(graphdef, tx, mesh):
    """``polyjax.train.train_step``, jitted, for one batch of this mesh."""
    step = functools.partial(
        train.train_step,
        graphdef=graphdef,
        tx=tx,
        schedule=optax.constant_schedule(1.0),
        grad_accum=1,
        batch_sharding=sh.batch_sharding(mesh),
    )
    return jax.jit(step)


def as_created(cfg: ModelConfig, mesh, params: nnx.State) -> Transformer:
    """What ``sh.create_model(cfg, mesh)`` returns (the model with the mesh's
    ActivationSharding, each parameter in its sharding), with ``params``' values:
    test_sharding checks that create_model's own values equal the unsharded init;
    placing them saves compiling the initialiser once per mesh."""
    shard = sh.ActivationSharding(mesh, sh.DEFAULT_RULES)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), shard=shard))
    graphdef, abstract = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(params, sh.model_shardings(abstract, mesh)))


def grads_and_metrics(cfg: ModelConfig, mesh, params: nnx.State, expert_parallel: str):
    model = as_created(cfg, mesh, params)
    model.layers[1].ffn.dispatch = "capacity"
    model.layers[0].ffn.expert_parallel = expert_parallel
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = capture_grads()
    zero = jnp.zeros((), jnp.int32)
    state = train.TrainState(zero, params, tx.init(params), rest, zero, zero)
    new, metrics = train_step_fn(graphdef, tx, mesh)(state, token_batch(mesh))
    return dict(nnx.to_flat_state(new.opt_state)), jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_step():
    cfg = tiny_moe()
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
    return cfg, params, grads_and_metrics(cfg, one_device(), params, "auto")


@eight
@pytest.mark.parametrize(
    "mesh_shape, expert_parallel",
    [
        ({"data": 8}, "auto"),
        ({"fsdp": 8}, "auto"),
        ({"expert": 8}, "all_to_all"),
        ({"data": 2, "expert": 4}, "gather"),
        ({"fsdp": 2, "tensor": 2, "expert": 2}, "all_to_all"),
    ],
    ids=str,
)
def test_train_step_on_a_mesh_equals_one_device(mesh_shape, expert_parallel, single_device_step):
    """The real train step of a model with a dropless and a capacity layer: loss,
    gradients, expert loads, aux losses and drops against one device."""
    cfg, params, (ref_grads, ref_metrics) = single_device_step
    assert ref_metrics["dropped_tokens"] > 0  # the capacity layer does drop
    mesh = sh.make_mesh(mesh_shape)
    grads, metrics = grads_and_metrics(cfg, mesh, params, expert_parallel)
    for key in ("loss", "grad_norm", "moe_aux_loss", "moe_lb_loss", "moe_z_loss"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(metrics["expert_load"], ref_metrics["expert_load"], rtol=1e-6)
    assert metrics["dropped_tokens"] == ref_metrics["dropped_tokens"]
    assert grads.keys() == ref_grads.keys()
    for path, g in grads.items():
        np.testing.assert_allclose(
            g[...], ref_grads[path][...], rtol=1e-5, atol=1e-7, err_msg=str(path)
        )


def abstract_state(cfg: ModelConfig, mesh, tx):
    """The train state's shapes and shardings, and the graphdef, without allocating."""
    shard = sh.ActivationSharding(mesh, sh.DEFAULT_RULES)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), shard=shard))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def placed(state):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            state,
            sh.model_shardings(state, mesh),
        )

    params, rest = placed(params), placed(rest)
    opt_state = jax.eval_shape(tx.init, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return graphdef, train.TrainState(scalar, params, opt_state, rest, scalar, scalar)


def temp_bytes(cfg: ModelConfig, mesh) -> int:
    tx = optax.sgd(0.1)
    graphdef, state = abstract_state(cfg, mesh, tx)
    batch = jax.eval_shape(lambda: token_batch(mesh, 8, 64))
    batch = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh.batch_sharding(mesh)), batch
    )
    compiled = train_step_fn(graphdef, tx, mesh).lower(state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@eight
def test_per_device_temp_memory_of_dropless_shrinks_with_the_mesh():
    """Compiled temporary bytes of the train step at the same global batch (8 x 64
    tokens, an MoE-dominated model): each of 8 devices needs at most 0.3 of what
    one device needs. (The capacity dispatch: benchmarks/moe.py.)"""
    cfg = ModelConfig.from_dict(
        dict(
            vocab_size=64,
            d_model=32,
            n_layers=1,
            n_heads=2,
            max_seq_len=64,
            activation={"name": "polynorm"},
            moe=dict(num_experts=8, top_k=2, d_expert=64),
        )
    )
    single = temp_bytes(cfg, one_device())
    for mesh_shape in ({"data": 8}, {"expert": 8}):
        ratio = temp_bytes(cfg, sh.make_mesh(mesh_shape)) / single
        assert ratio <= 0.3, (mesh_shape, ratio)


# ----------------------------------------------------------------------------
# The launcher: a capacity MoE on an expert-parallel mesh resumes exactly; bad
# MoE input is one line before anything is built.

MOE_CAPACITY = {
    "mesh.expert": 4,
    "model.moe.dispatch": "capacity",
    "train.steps": 3,
    "train.checkpoint_every": 2,
}


def logged_losses(workdir):
    return [(r["step"], r["loss"]) for r in mx.read_jsonl(pathlib.Path(workdir) / mx.JSONL)]


@eight
def test_capacity_moe_on_an_expert_mesh_trains_and_resumes_exactly(tmp_path, tiny, launch_py):
    """Train 3 steps (checkpoints at 2 and 3), lose the last checkpoint as a run
    killed before saving it would, run again: it resumes at 2 and logs the same loss."""
    argv = [*tiny.argv("moe", **MOE_CAPACITY), f"--workdir={tmp_path}"]
    assert launch_py(*argv).code == 0
    full = logged_losses(tmp_path)
    assert [s for s, _ in full] == [1, 2, 3]
    shutil.rmtree(ckpt.directory(tmp_path) / "3")
    assert launch_py(*argv).code == 0
    assert sorted(os.listdir(ckpt.directory(tmp_path))) == ["2", "3"]
    assert logged_losses(tmp_path) == full  # bitwise; step 3 from the resumed run


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["--config.model.moe.num_experts=6", "--config.mesh.expert=4"], ["moe.num_experts=6"]),
        (["--config.model.moe.capacity_factor=0"], ["moe.capacity_factor", "> 0"]),
        (["--config.model.moe.top_k=9"], ["moe.top_k=9", "num_experts=8"]),
    ],
)
def test_bad_moe_input_is_one_line_before_anything_is_built(
    overrides, fragments, tmp_path, tiny, launch_py, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or a run started")

    monkeypatch.setattr(sh, "create_model", refuse)
    monkeypatch.setattr(train, "make_steps", refuse)
    monkeypatch.setattr(train, "train", refuse)
    launch_py(tiny.argv("moe")[0], *overrides, f"--workdir={tmp_path}").error(*fragments)
