"""Attention by implementation (polyjax.attention): the splash kernel (interpret
mode on the CPU) against XLA's attention in values and gradients, with packed
segments and grouped heads; which implementation "auto" picks per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyjax import attention, backend


def qkvg(heads: int, groups: int, length: int = 128, batch: int = 2, dim: int = 32):
    kq, kk, kv, kg = jax.random.split(jax.random.key(heads * 10 + groups), 4)
    q = jax.random.normal(kq, (batch, length, heads, dim))
    k = jax.random.normal(kk, (batch, length, groups, dim))
    v = jax.random.normal(kv, (batch, length, groups, dim))
    return q, k, v, jax.random.normal(kg, (batch, length, heads, dim))


# packed documents: a row of three (one of a single token), a row of one document
PACKED = jnp.array([[1] * 50 + [2] + [3] * 77, [7] * 128], jnp.int32)


@pytest.mark.parametrize(
    "heads,groups,segments", [(4, 2, PACKED), (4, 4, None)], ids=["gqa-packed", "mha-one-doc"]
)
def test_splash_equals_xla_in_values_and_gradients(heads, groups, segments):
    q, k, v, g = qkvg(heads, groups)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention.causal_attention(q, k, v, segments, impl) * g)

    want, want_grads = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got, got_grads = jax.value_and_grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, a, b in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_packed_rows_do_not_see_other_documents():
    """A token's output depends only on its own document: changing another document's
    values leaves it as it was."""
    q, k, v, _ = qkvg(4, 2)
    out = attention.causal_attention(q, k, v, PACKED, "splash")
    v2 = v.at[0, :50].set(0.0)  # the first document of row 0
    out2 = attention.causal_attention(q, k, v2, PACKED, "splash")
    np.testing.assert_array_equal(out[0, 50:], out2[0, 50:])
    assert not np.allclose(out[0, :50], out2[0, :50])


@pytest.mark.parametrize(
    "platform,dtype,length,want",
    [
        ("tpu", jnp.bfloat16, 4096, "splash"),
        ("tpu", jnp.float32, 128, "splash"),
        ("tpu", jnp.bfloat16, 64, "xla"),  # splash tiles are 128 wide
        ("gpu", jnp.bfloat16, 4096, "cudnn"),
        ("gpu", jnp.float32, 4096, "xla"),  # cuDNN's fused attention is 16-bit
        ("cpu", jnp.bfloat16, 4096, "xla"),
    ],
)
def test_auto_picks_the_platforms_flash_attention(platform, dtype, length, want):
    with backend.compiling_for(platform):
        assert attention.resolve("auto", dtype, length) == want
    assert attention.resolve("xla", dtype, length) == "xla"


def test_bad_implementation_and_length_name_the_field():
    with pytest.raises(ValueError, match="attention must be one of auto, xla, cudnn, splash"):
        attention.resolve("flash", jnp.float32, 128)
    q, k, v, _ = qkvg(2, 2, length=64)
    with pytest.raises(ValueError, match="length 64 must be a multiple of 128"):
        attention.splash(q, k, v)
