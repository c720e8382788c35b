"""Checkpoints: Orbax ``CheckpointManager`` under ``workdir/checkpoints``.

One checkpoint holds three items, written together:
  state   the train state (params, optimizer state, step, other model state)
  data    the data iterators' states (JSON, one per process)
  config  the run's config (JSON)
A run resumes from the newest checkpoint of its workdir; ``check_compatible``
refuses a workdir whose checkpoints belong to a config with other shapes.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Fields that may change between a checkpoint and its resumption: they change how
# the model computes, not what is stored. Every other model field must match.
RUNTIME_MODEL_FIELDS = ("dtype", "remat", "activation.kernel")
DATA_FIELDS = ("source", "tokenizer", "vocab_size", "seq_len")


def directory(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _relevant(config: Mapping[str, Any]) -> dict[str, Any]:
    model = {
        f"model.{k}": v
        for k, v in _flatten(config.get("model") or {}).items()
        if k not in RUNTIME_MODEL_FIELDS
    }
    data = config.get("data") or {}
    model.update({f"data.{k}": data.get(k) for k in DATA_FIELDS})
    return json.loads(json.dumps(model))  # tuples -> lists, as stored


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """ValueError (one line) naming the first model/data field that differs."""
    a, b = _relevant(saved), _relevant(current)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            raise ValueError(
                f"{where} holds checkpoints of an incompatible config ({key}: "
                f"{a.get(key)!r} there, {b.get(key)!r} here); use another --workdir"
            )


def latest(workdir: str | pathlib.Path) -> tuple[int, dict[str, Any]] | None:
    """The newest complete checkpoint's step and config, or None. Reads files only
    (no collective), so processes may call it at different moments."""
    root = directory(workdir)
    steps = ocp.path.step.checkpoint_steps(root) if root.is_dir() else []
    if not steps:
        return None
    step = max(steps)
    return step, json.loads((root / str(step) / "config" / "metadata").read_text())


def _gather_json(obj: Any) -> list[Any]:
    """Every process's ``obj`` (JSON-serialisable), in process order."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(r[: int(n)]).decode()) for r, n in zip(rows, sizes.ravel(), strict=True)
    ]


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) and jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def _to_saveable(tree: Any) -> Any:
    """Typed PRNG keys -> their raw uint32 data (what Orbax can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_saveable(tree: Any) -> Any:
    """The shapes, dtypes and shardings of ``_to_saveable(tree)``."""

    def convert(x):
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, x).update(sharding=x.sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(convert, tree)


def _from_saveable(tree: Any, like: Any) -> Any:
    def convert(x, ref):
        return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if _is_key(ref) else x

    return jax.tree.map(convert, tree, like)


class Checkpointer:
    """Saves and restores (state, data iterator state, config) in ``workdir``.

    ``every`` is the interval in steps (the loop asks ``due``); the last ``keep``
    checkpoints are kept; saves are asynchronous unless ``async_save`` is False.
    """

    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int, async_save: bool):
        self.every = every
        self.manager = ocp.CheckpointManager(
            directory(workdir),
            item_names=("state", "data", "config"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: Any, config: Mapping[str, Any]) -> None:
        """Save on every process (collective); ``data_state`` is this process's.
        A step that is already saved is left as it is."""
        if step in self.manager.all_steps():
            return
        states = _gather_json(data_state)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saveable(state)),
                data=ocp.args.JsonSave({"process_states": states}),
                config=ocp.args.JsonSave(dict(config)),
            ),
        )

    def restore(self, step: int, target: Any) -> tuple[Any, Any]:
        """The state, with the structure and shardings of ``target`` (a state of the
        same run, e.g. freshly initialised), and this process's data iterator state."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract_saveable(target)),
                data=ocp.args.JsonRestore(),
            ),
        )
        states = out["data"]["process_states"]
        if len(states) != jax.process_count():
            raise ValueError(
                f"checkpoint {step} was written by {len(states)} processes, "
                f"this run has {jax.process_count()}"
            )
        return _from_saveable(out["state"], target), states[jax.process_index()]

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
