"""Checkpoints, and what a run survives: Orbax ``CheckpointManager`` under
``workdir/checkpoints``, resuming, torn checkpoints, preemption signals.

One checkpoint holds three items, written together:
  state   the train state (params, optimizer state, step, other model state)
  data    the data iterators' states (JSON, one per process)
  config  the run's config (JSON)
A run resumes from the newest good checkpoint of its workdir (``prepare_workdir``);
``check_compatible`` refuses a workdir whose checkpoints belong to a config with
other shapes.

Integrity: Orbax writes a step into a temporary directory and renames it when
complete, so an interrupted save never counts. Once a save has finished, the
primary process adds ``MARKER`` to the step directory: the step, the config's
SHA-256, and every file's size and CRC-32. ``scan`` checks each step against its
marker (a step without one, saved just before a kill, is checked for its items
only); a torn or corrupt step is skipped and later set aside as
``<step>.corrupt``, never deleted. Old steps are deleted (keep-last-K) only after
a newer one is complete and marked.

Preemption: within ``with StopSignals()``, SIGTERM/SIGINT ask the loop to save
the step it is at and stop (``PreemptionError``); a second signal aborts at once.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import signal
import sys
import threading
import zlib
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
MARKER = "polyjax_integrity.json"
ITEMS = ("state", "data", "config")


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


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: pathlib.Path) -> dict[str, list[int]]:
    """Every file under ``step_dir`` but the marker: relative path -> [size, crc32]."""
    return {
        str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p)]
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def config_digest(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def write_marker(step_dir: pathlib.Path, step: int, config: Mapping[str, Any]) -> None:
    """Record the complete step's files (written to a temporary name, then renamed)."""
    marker = {"step": step, "config_sha256": config_digest(config), "files": _files(step_dir)}
    tmp = step_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker))
    tmp.rename(step_dir / MARKER)


def check_step(step_dir: pathlib.Path, step: int) -> tuple[dict[str, Any] | None, str]:
    """(the step's config, "") if it is intact, else (None, what is wrong). Files only."""
    try:
        config = json.loads((step_dir / "config" / "metadata").read_text())
    except (OSError, ValueError) as e:
        return None, f"config unreadable ({type(e).__name__})"
    marker_path = step_dir / MARKER
    if not marker_path.exists():
        missing = [item for item in ITEMS if not (step_dir / item).is_dir()]
        return (None, f"item(s) {missing} missing") if missing else (config, "")
    try:
        marker = json.loads(marker_path.read_text())
        expected, digest = marker["files"], marker["config_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, "integrity marker unreadable"
    if marker.get("step") != step or digest != config_digest(config):
        return None, "integrity marker does not match the step or its config"
    for rel, (size, crc) in expected.items():
        path = step_dir / rel
        if not path.is_file():
            return None, f"{rel} missing"
        if path.stat().st_size != size:
            return None, f"{rel} truncated or resized ({path.stat().st_size} != {size} bytes)"
        if _crc32(path) != crc:
            return None, f"{rel} corrupt (checksum mismatch)"
    return config, ""


def scan(workdir: str | pathlib.Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(good, bad) finalized steps, newest first: (step, config) and (step, why).
    Reads files only (no collective), touches nothing."""
    root = directory(workdir)
    steps = ocp.path.step.checkpoint_steps(root) if root.is_dir() else []
    good, bad = [], []
    for step in sorted(steps, reverse=True):
        config, why = check_step(root / str(step), step)
        if config is None:
            bad.append((step, why))
        else:
            good.append((step, config))
    return good, bad


def latest(workdir: str | pathlib.Path) -> tuple[int, dict[str, Any]] | None:
    """The newest intact checkpoint's step and config, or None when there are no
    checkpoints. Raises ValueError (nothing touched) when checkpoints exist but
    none is intact. Reads files only, so processes may call it at any moment."""
    good, bad = scan(workdir)
    if bad and not good:
        raise ValueError(
            f"{directory(workdir)} holds no intact checkpoint (skipped: "
            + "; ".join(f"step {s}: {why}" for s, why in bad)
            + "); nothing was changed: repair or move them, or use another --workdir"
        )
    return good[0] if good else None


def resume_step(workdir: str | pathlib.Path, config: Mapping[str, Any]) -> int | None:
    """The step to resume from: the newest intact checkpoint (None: a fresh run).
    Refuses (ValueError, nothing touched) a workdir whose checkpoints belong to an
    incompatible config or are all torn or corrupt. Reads files only."""
    found = latest(workdir)
    if found is None:
        return None
    step, saved = found
    check_compatible(saved, config, str(workdir))
    return step


def prepare_workdir(workdir: str | pathlib.Path, config: Mapping[str, Any]) -> int | None:
    """``resume_step``, after moving each torn or corrupt step aside (``set_aside``)
    with a warning: the one change a run makes to its workdir before it trains."""
    step = resume_step(workdir, config)
    _, bad = scan(workdir)
    if bad:
        moved = set_aside(workdir, [s for s, _ in bad])
        for (s, why), path in zip(bad, moved, strict=True):
            if jax.process_index() == 0:
                print(
                    f"warning: checkpoint {s} is torn or corrupt ({why}); skipped it and "
                    f"moved it to {path}; resuming from step {step}",
                    file=sys.stderr,
                    flush=True,
                )
    return step


def set_aside(workdir: str | pathlib.Path, steps: list[int]) -> list[pathlib.Path]:
    """Rename each step's directory to ``<step>.corrupt`` (``.corrupt-N`` if taken),
    on the primary process, then wait for every process. Returns the new paths."""
    root, moved = directory(workdir), []
    for step in steps:
        target, n = root / f"{step}.corrupt", 1
        while target.exists():
            n += 1
            target = root / f"{step}.corrupt-{n}"
        if jax.process_index() == 0:
            (root / str(step)).rename(target)
        moved.append(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("polyjax_set_aside")
    return moved


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
    A save is marked (``MARKER``) and older steps beyond ``keep`` deleted once it
    has finished: at the next save, ``finish`` or ``close``.
    """

    def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int, async_save: bool):
        self.every, self.keep = every, keep
        self.root = directory(workdir)
        self.pending: tuple[int, dict] | None = None
        self.manager = ocp.CheckpointManager(
            self.root,
            item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None, enable_async_checkpointing=async_save, create=True
            ),
        )

    def finish(self) -> None:
        """Wait for the pending save; mark it complete; delete steps beyond ``keep``."""
        self.manager.wait_until_finished()
        if self.pending is None:
            return
        step, config = self.pending
        self.pending = None
        if jax.process_index() == 0:
            write_marker(self.root / str(step), step, config)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("polyjax_marker")
        older = [s for s in self.manager.all_steps() if s < step]
        for old in sorted(older)[: max(len(older) + 1 - self.keep, 0)]:
            self.manager.delete(old)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: Any, config: Mapping[str, Any]) -> None:
        """Save on every process (collective); ``data_state`` is this process's.
        A step that is already saved is left as it is."""
        self.finish()
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
        self.pending = (step, json.loads(json.dumps(dict(config))))

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
        """Finish the pending save and release the manager."""
        self.finish()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionError(Exception):
    """SIGTERM or SIGINT stopped the run after saving a checkpoint at ``step``."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT


class StopSignals:
    """Within ``with``: SIGTERM/SIGINT set ``self.signum`` (the loop stops at the
    next step boundary); a second one raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, boundary: bool) -> int:
        """The signal to stop on, the same on every process: on one process, this
        one's at every step; on several, any process's, agreed at ``boundary``
        steps (logging and checkpoint steps) by a tiny all-gather."""
        if jax.process_count() == 1:
            return self.signum
        if not boundary:
            return 0
        seen = multihost_utils.process_allgather(np.array([self.signum], np.int32))
        return int(np.max(seen))
