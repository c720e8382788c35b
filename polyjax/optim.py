"""The optimizer: AdamW with a weight-decay mask, global-norm clipping, and a
linear-warmup + cosine learning-rate schedule.

Weight decay skips ``NoDecayParam`` (PolyCom coefficients, slopes, norm scales)
and every parameter of rank <= 1 (biases, gains). Gradient accumulation is done by
the train step (``polyjax.train``), which reads ``grad_accum`` from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from polyjax.fields import from_mapping
from polyjax.layers import NoDecayParam


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule. ``final_lr`` is reached at the last step;
    ``clip_norm`` <= 0 disables clipping; ``grad_accum`` splits each global batch
    into that many microbatches; ``mu_dtype`` stores the first moment in another
    dtype (None = the parameters' dtype)."""

    lr: float = 3e-4
    final_lr: float = 1.5e-5
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum: int = 1
    mu_dtype: str | None = None

    def __post_init__(self):
        checks = {
            "lr": 0 < self.lr < math.inf,
            "final_lr": 0 <= self.final_lr <= self.lr,
            "warmup_steps": isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "b1": 0 <= self.b1 < 1,
            "b2": 0 <= self.b2 < 1,
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_accum": isinstance(self.grad_accum, int) and self.grad_accum >= 1,
            "mu_dtype": self.mu_dtype in (None, "float32", "bfloat16"),
        }
        valid = {
            "lr": "finite and > 0",
            "final_lr": "in [0, optim.lr]",
            "warmup_steps": "an integer >= 0",
            "b1": "in [0, 1)",
            "b2": "in [0, 1)",
            "eps": "> 0",
            "weight_decay": ">= 0",
            "grad_accum": "an integer >= 1",
            "mu_dtype": "None, 'float32' or 'bfloat16'",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"optim.{name} must be {valid[name]}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimConfig:
        return from_mapping(cls, d, "optim")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(s) = lr * (s + 1) / warmup for s < warmup (so the first step moves),
    then a cosine from lr down to final_lr, reached at s = total_steps - 1."""
    warmup = cfg.warmup_steps
    decay = max(total_steps - 1 - warmup, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (s + 1) / max(warmup, 1)
        progress = jnp.clip((s - warmup) / decay, 0.0, 1.0)
        cosine = cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1 + jnp.cos(math.pi * progress))
        return jnp.where(s < warmup, warm, cosine)

    return schedule


def decay_mask(params: nnx.State) -> nnx.State:
    """True where weight decay applies: matrices (rank >= 2) that are not NoDecayParam."""
    return jax.tree.map(
        lambda v: v.replace(not isinstance(v, NoDecayParam) and v.get_value().ndim >= 2),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> Adam moments -> decoupled masked weight decay -> -lr(s)."""
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
            mu_dtype=cfg.mu_dtype,
        ),
    )
