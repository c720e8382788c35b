"""Meshes, rules, sharded creation and the sharded step against one device (8 CPU
devices, from conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from polyjax import activations as acts
from polyjax import sharding as sh
from polyjax.layers import FFN
from polyjax.model import ModelConfig, Transformer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def cfg_for(family, **kw) -> ModelConfig:
    d = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    if family == "moe":
        d["moe"] = dict(num_experts=4, top_k=2, d_expert=16, per_expert_coeffs=True)
        d["qk_norm"] = True
    else:
        d["d_ff"] = 48
    d.update(kw)
    return ModelConfig.from_dict(d)


def test_make_mesh_fills_the_rest_and_rejects_bad_shapes():
    mesh = sh.make_mesh({"fsdp": 2, "data": -1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "expert": 1}
    assert mesh.axis_names == sh.MESH_AXES
    with pytest.raises(ValueError, match="has 4 devices but there are 8"):
        sh.make_mesh({"data": 2, "tensor": 2})
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sh.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="unknown axis model"):
        sh.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="need a multiple of 3"):
        sh.make_mesh({"tensor": 3, "data": -1})


def test_logical_to_spec_follows_the_rules():
    rules = sh.DEFAULT_RULES
    assert sh.logical_to_spec(("embed", "mlp"), rules) == PartitionSpec("fsdp", "tensor")
    assert sh.logical_to_spec(("expert", "embed", None), rules) == PartitionSpec(
        "expert", "fsdp", None
    )
    assert sh.logical_to_spec(("batch", "length"), rules) == PartitionSpec(sh.BATCH_AXES, None)
    # The MoE capacity buffers: experts over the expert axis, the batch over the rest.
    assert sh.logical_to_spec(("batch_no_expert", "expert", None, "act_embed"), rules) == (
        PartitionSpec(("data", "fsdp"), "expert", None, None)
    )
    with pytest.raises(ValueError, match="'bogus' has no rule"):
        sh.logical_to_spec(("bogus",), rules)
    with pytest.raises(ValueError, match="use mesh axis 'fsdp' twice"):
        sh.logical_to_spec(("embed", "embed"), rules)


@pytest.mark.parametrize(
    "family, mesh_shape, batch, kw, message",
    [
        ("dense", {"data": -1}, 12, {}, "global_batch=12 is not divisible by the data-parallel"),
        ("dense", {"tensor": 8}, 8, {}, "n_heads=4 is not divisible by 8"),
        ("dense", {"tensor": 4, "data": 2}, 8, {}, "n_kv_heads=2 is not divisible by 4"),
        ("dense", {"tensor": 2, "data": 4}, 8, {"d_ff": 47}, "d_ff=47 is not divisible by 2"),
        ("moe", {"expert": 8}, 8, {}, "moe.num_experts=4 is not divisible by 8"),
        ("dense", {"fsdp": 8}, 8, {"d_model": 36, "n_heads": 2, "n_kv_heads": 2}, "d_model=36"),
    ],
)
def test_validate_names_the_field(family, mesh_shape, batch, kw, message):
    with pytest.raises(ValueError, match=message):
        sh.validate(cfg_for(family, **kw), sh.make_mesh(mesh_shape), batch)


def test_create_model_is_sharded_and_equals_unsharded_init():
    cfg = cfg_for("moe", scan_layers=True)
    mesh = sh.make_mesh({"expert": 2, "fsdp": 2, "tensor": 2})
    model = sh.create_model(cfg, mesh, seed=3)
    w_in = model.layers.ffn.w_in[...]
    assert w_in.sharding == NamedSharding(mesh, PartitionSpec(None, "expert", "fsdp", "tensor"))
    assert w_in.addressable_shards[0].data.shape == (2, 2, 16, 8)
    ref = Transformer(cfg, rngs=nnx.Rngs(3))
    ref_params, params = nnx.state(ref, nnx.Param), nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)  # ulps differ on jax 0.10
    assert "layers/ffn/w_in" in sh.describe(cfg, mesh)


def loss_fn(model, tok):
    logits, aux = model(tok[:, :-1])
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1))
    return ce + aux.get("moe_aux_loss", 0.0)


MESHES = [{"data": -1}, {"fsdp": 4, "tensor": 2}, {"expert": 4, "data": 2}]


@pytest.mark.parametrize("family", ["dense"])  # the MoE: test_moe.py, every mesh
def test_sharded_loss_and_grads_equal_single_device(family):
    cfg = cfg_for(family, activation={"name": "polynorm"})
    tok = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)
    ref_loss, ref_grads = nnx.value_and_grad(loss_fn)(Transformer(cfg, rngs=nnx.Rngs(0)), tok)
    for shape in MESHES:
        mesh = sh.make_mesh(shape)
        sh.validate(cfg, mesh, 8)
        model = sh.create_model(cfg, mesh, seed=0)
        graphdef, state = nnx.split(model)
        shardings = sh.model_shardings(state, mesh)
        step = jax.jit(
            lambda s, t, g=graphdef: nnx.value_and_grad(loss_fn)(nnx.merge(g, s), t),
            in_shardings=(shardings, sh.batch_sharding(mesh)),
        )
        loss, grads = step(state, jax.device_put(tok, sh.batch_sharding(mesh)))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(shape))
        ref_flat = dict(nnx.to_flat_state(nnx.state(ref_grads)))
        for path, g in nnx.to_flat_state(nnx.state(grads)):
            np.testing.assert_allclose(
                g[...], ref_flat[path][...], rtol=1e-4, atol=2e-6, err_msg=f"{shape} {path}"
            )


def test_polynorm_stays_exact_with_the_ffn_width_sharded_over_tensor():
    mesh = sh.make_mesh({"tensor": 8})
    shard = sh.ActivationSharding(mesh, sh.DEFAULT_RULES)
    init = nnx.initializers.normal(0.3)

    def ffn(shard):
        return FFN(
            16, 64, acts.ActivationConfig("polynorm"), init=init, shard=shard, rngs=nnx.Rngs(0)
        )

    x = jax.random.normal(jax.random.key(1), (2, 4, 16))
    ref = ffn(None)(x)
    sharded = ffn(shard)
    graphdef, state = nnx.split(sharded)
    state = jax.device_put(state, sh.model_shardings(state, mesh))
    assert state["w_in"][...].sharding.spec == PartitionSpec("fsdp", "tensor")

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        h = jnp.einsum("bld,df->blf", x, m.w_in[...])
        return m(x), shard(h, ("batch", "length", "mlp"))

    y, h = run(state, x)
    assert h.sharding.spec[-1] == "tensor" and h.addressable_shards[0].data.shape[-1] == 8
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # Per-shard statistics (what a local mean would give) are measurably different.
    local = jnp.concatenate(
        [acts.polynorm(hs, *acts.init_coeffs(3)) for hs in jnp.split(h, 8, axis=-1)], -1
    )
    assert not np.allclose(local, acts.polynorm(h, *acts.init_coeffs(3)), atol=1e-3)
