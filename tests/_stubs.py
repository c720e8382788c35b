"""THROWAWAY: stand-ins for polyjax.model / sharding / data obeying the COMMON.md
contracts, until the real ones land on main. Installed only when missing."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from polyjax.activations import ActivationConfig
from polyjax.layers import FFN, NoDecayParam


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 32
    n_layers: int = 1
    n_heads: int = 2
    n_kv_heads: int | None = None
    d_ff: int = 64
    max_seq_len: int = 16
    activation: ActivationConfig = ActivationConfig()  # noqa: RUF009
    moe: None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(d) - names
        if bad:
            raise ValueError(f"model: unknown {sorted(bad)}")
        d["activation"] = ActivationConfig(**d.get("activation", {}))
        return cls(**d)


class Transformer(nnx.Module):
    def __init__(self, cfg, *, rngs):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(
            init(rngs.params(), (cfg.vocab_size, cfg.d_model)), axes=("vocab", "embed")
        )
        self.scale = NoDecayParam(jnp.ones((cfg.d_model,)), axes=("embed",))
        self.ffn = FFN(cfg.d_model, cfg.d_ff, cfg.activation, init=init, rngs=rngs)
        self.head = nnx.Param(
            init(rngs.params(), (cfg.d_model, cfg.vocab_size)), axes=("embed", "vocab")
        )

    def __call__(self, tokens_BxL, *, positions_BxL=None, segment_ids_BxL=None):
        x = self.embed[...][tokens_BxL]
        prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
        x = x + prev
        x = x * self.scale[...] * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)
        x = x + self.ffn(x)
        return (x @ self.head[...]).astype(jnp.float32), {}


def param_counts(cfg):
    m = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    total = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))
    return {"total": total, "active": total, "embedding": cfg.vocab_size * cfg.d_model}


def preset(family, size, act):
    return {"activation": {"name": act}}


MESH_AXES = ("data", "fsdp", "tensor", "expert")
DEFAULT_RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("vocab", "tensor"))


def make_mesh(shape, devices=None):
    devices = jax.devices() if devices is None else devices
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(shape)} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes, rules):
    table = dict(rules)
    return P(*(table.get(a) for a in axes))


def model_shardings(state, mesh, rules):
    def one(var):
        axes = var.get_metadata().get("axes")
        return var.replace(
            NamedSharding(mesh, P() if axes is None else logical_to_spec(axes, rules))
        )

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def describe(cfg, mesh, rules):
    return f"mesh {dict(mesh.shape)}\n  P("


def create_model(cfg, mesh, rules, seed):
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def batch_sharding(mesh):
    return NamedSharding(mesh, P(("data", "fsdp", "expert")))


def validate(cfg, mesh, global_batch):
    n = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if global_batch % n:
        raise ValueError(f"global_batch {global_batch} not divisible by {n}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "pythonstd"
    tokenizer: str = "byte"
    vocab_size: int = 256
    seq_len: int = 16
    global_batch: int = 8
    seed: int = 0

    @classmethod
    def from_dict(cls, d):
        bad = set(d) - {f.name for f in dataclasses.fields(cls)}
        if bad:
            raise ValueError(f"data: unknown {sorted(bad)}")
        return cls(**d)


class _Iter:
    def __init__(self, data, cfg, pi, pc):
        self.data, self.cfg, self.pi, self.pc, self.i = data, cfg, pi, pc, 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.cfg.seed, self.i])
        self.i += 1
        starts = rng.integers(0, len(self.data) - self.cfg.seq_len - 1, self.cfg.global_batch)
        n = self.cfg.global_batch // self.pc
        starts = starts[self.pi * n : (self.pi + 1) * n]
        return _batch(self.data, starts, self.cfg.seq_len)

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def _batch(data, starts, L):
    win = np.stack([data[s : s + L + 1] for s in starts]).astype(np.int32)
    return {
        "inputs": win[:, :-1],
        "targets": win[:, 1:],
        "segment_ids": np.ones_like(win[:, 1:]),
        "positions": np.broadcast_to(np.arange(L, dtype=np.int32), win[:, 1:].shape).copy(),
        "weights": np.ones(win[:, 1:].shape, np.float32),
    }


class Pipeline:
    def __init__(self, cfg, process_index=0, process_count=1):
        import textwrap

        text = textwrap.__file__
        data = np.frombuffer(__import__("pathlib").Path(text).read_bytes(), np.uint8)
        split = int(0.9 * len(data))
        self.train, self.val = data[:split], data[split:]
        self.cfg, self.pi, self.pc = cfg, process_index, process_count
        self.tokenizer = types.SimpleNamespace(vocab_size=256)

    def train_iter(self):
        return _Iter(self.train, self.cfg, self.pi, self.pc)

    def eval_batches(self, n):
        out = []
        rows = self.cfg.global_batch // self.pc
        for i in range(n):
            starts = np.arange(rows) * 97 + i * 1000 + self.pi * 50
            out.append(_batch(self.val, starts % (len(self.val) - 40), self.cfg.seq_len))
        return out

    def unigram_loss(self):
        counts = np.bincount(self.train, minlength=256) + 1
        return float(-np.mean(np.log(counts / counts.sum())[self.val]))


def make_pipeline(cfg, *, process_index=0, process_count=1):
    return Pipeline(cfg, process_index, process_count)


def install() -> None:
    """Register the stand-ins for whichever real modules are missing."""
    for name, attrs in {
        "polyjax.model": ["ModelConfig", "Transformer", "param_counts", "preset"],
        "polyjax.sharding": [
            "MESH_AXES",
            "DEFAULT_RULES",
            "make_mesh",
            "logical_to_spec",
            "create_model",
            "batch_sharding",
            "validate",
            "model_shardings",
            "describe",
        ],
        "polyjax.data": ["DataConfig", "make_pipeline", "Pipeline"],
    }.items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            mod = types.ModuleType(name)
            for a in attrs:
                setattr(mod, a, globals()[a])
            sys.modules[name] = mod
