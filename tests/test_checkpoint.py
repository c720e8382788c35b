"""Checkpoints: round trip (typed PRNG keys included), keep-last-K, compatibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyjax import checkpoint as ckpt

CONFIG = {
    "name": "x",
    "model": {
        "d_model": 8,
        "dtype": "float32",
        "activation": {"name": "polynorm", "kernel": "xla"},
    },
    "data": {"source": "shakespeare", "tokenizer": "bpe", "vocab_size": 1024, "seq_len": 16},
    "optim": {"lr": 1e-3},
}


def _state(seed):
    k = jax.random.key(seed)
    return {
        "step": jnp.asarray(seed, jnp.int32),
        "w": jax.random.normal(k, (3, 4)),
        "rng": jax.random.split(k, 2),
    }


def test_round_trip_keeps_last_k(tmp_path):
    saver = ckpt.Checkpointer(tmp_path, every=2, keep=2, async_save=True)
    for step in (2, 4, 6):
        saver.save(step, _state(step), {"index": step}, CONFIG)
    saver.save(6, _state(99), {"index": 99}, CONFIG)  # already saved: left as it is
    saver.close()
    loader = ckpt.Checkpointer(tmp_path, every=2, keep=2, async_save=False)
    assert loader.manager.all_steps() == [4, 6] and ckpt.latest(tmp_path) == (6, CONFIG)
    state, data = loader.restore(6, _state(0))
    expected = _state(6)
    assert data == {"index": 6}
    np.testing.assert_array_equal(state["w"], expected["w"])
    assert int(state["step"]) == 6
    assert jax.dtypes.issubdtype(state["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(state["rng"]), jax.random.key_data(expected["rng"])
    )
    assert loader.due(4) and not loader.due(3)
    loader.close()


def test_latest_of_an_empty_workdir(tmp_path):
    assert ckpt.latest(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert ckpt.latest(tmp_path) is None


def test_compatible_ignores_runtime_fields():
    other = {**CONFIG, "optim": {"lr": 5.0}, "data": {**CONFIG["data"], "global_batch": 4}}
    other["model"] = {
        **CONFIG["model"],
        "dtype": "bfloat16",
        "activation": {"name": "polynorm", "kernel": "pallas"},
    }
    ckpt.check_compatible(CONFIG, other, "w")


@pytest.mark.parametrize(
    "section,change,field",
    [
        ("model", {"d_model": 16}, "model.d_model"),
        ("model", {"activation": {"name": "swiglu", "kernel": "xla"}}, "model.activation.name"),
        ("data", {"vocab_size": 512}, "data.vocab_size"),
        ("data", {"seed": 1}, "data.seed"),  # the stream's order
        ("data", {"val_fraction": 0.1}, "data.val_fraction"),  # its windows
    ],
)
def test_incompatible_names_the_field(section, change, field):
    other = {**CONFIG, section: {**CONFIG[section], **change}}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
        ckpt.check_compatible(CONFIG, other, "runs/x")
    assert "\n" not in str(e.value) and "runs/x" in str(e.value)
