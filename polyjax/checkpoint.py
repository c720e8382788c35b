"""Checkpoints, and what a run survives: Orbax ``CheckpointManager`` under
``workdir/checkpoints`` (any ``epath``: a local directory or ``gs://...``), verified
saves and restores, damaged checkpoints, preemption signals.

One checkpoint holds three items, written together:
  state   the train state (params, optimizer state, step, other model state)
  data    the data iterators' states (JSON, one per process)
  config  the run's config (JSON)

A checkpoint counts only once verified. Orbax commits a step atomically (a temporary
directory renamed, or its commit file on a bucket); then, as part of the same save and
in the same background thread (``Checkpointer._complete``, off the training loop),
process 0 writes ``MARKER``: the step and every file's size and CRC-32. A step without
a marker (a save killed before it) does not count. Resuming (``find_resume``) checks
the newest step's files against its marker in full, then ``restore_newest`` restores
it and refuses a state holding a NaN or Inf; any mismatch falls back to the previous
step, and the damaged ones are set aside as ``<step>.corrupt`` with a warning, never
deleted. Old steps are deleted (keep-last-K) only after a newer one is marked. A save
that fails (a read-only or full disk) is a ``SaveError`` at the next step boundary.

Preemption: within ``with StopSignals()``, SIGTERM/SIGINT ask the loop to save
the step it is at and stop (``PreemptionError``); a second signal aborts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.futures import future as ocp_future

from polyjax import workdir as wd

# Fields that may change between a checkpoint and its resumption: they change how
# the model computes, not what is stored. Every other model field must match.
RUNTIME_MODEL_FIELDS = ("dtype", "remat", "activation.kernel")
# The data fields that must match: they fix the stream's windows and their order (the
# global batch may change: the stream resumes at the same window, ``TrainIterator``).
DATA_FIELDS = ("source", "split", "val_split", "val_fraction", "tokenizer", "vocab_size")
DATA_FIELDS += ("seq_len", "seed")
MARKER = "polyjax_integrity.json"
ITEMS = ("state", "data", "config")
HISTORY = "config_history.jsonl"  # in the workdir: the config of each segment of the run


def directory(workdir: str | epath.PathLike) -> epath.Path:
    return wd.path(workdir) / "checkpoints"


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


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """ "field: old -> new" for each field of ``current`` that differs from ``saved``
    (a checkpoint's config), in the order of the fields."""
    a, b = (json.loads(json.dumps(_flatten(c))) for c in (saved, current))
    keys = list(dict.fromkeys([*b, *a]))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def record_config(workdir: str | epath.PathLike, config: Mapping[str, Any], start: int) -> None:
    """``workdir/config.json`` := ``config``, and ``config`` appended to the history
    (``HISTORY``: one JSON line per segment, ``{"start_step", "config"}``) after
    dropping the segments that start at or after ``start`` (their steps are run again)."""
    workdir = wd.path(workdir)
    text = json.dumps(dict(config), indent=2)
    (workdir / "config.json").write_text(text)
    path = workdir / HISTORY
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["start_step"] < start]
    kept.append(json.dumps({"start_step": start, "config": json.loads(text)}))
    path.write_text("\n".join(kept) + "\n")


def _one_line(e: BaseException) -> str:
    """The innermost cause of ``e``, in one short line."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    text = " ".join((str(e) or type(e).__name__).split()).split(" [tensorstore_spec")[0]
    return text if len(text) <= 300 else f"{text[:120]} ... {text[-170:]}"  # the OS error last


def _files(step_dir: epath.Path, prefix: str = "") -> dict[str, epath.Path]:
    """Every file under ``step_dir`` but the marker, by its relative path."""
    out = {}
    for p in sorted(step_dir.iterdir(), key=lambda p: p.name):
        if p.is_dir():
            out.update(_files(p, f"{prefix}{p.name}/"))
        elif p.name != MARKER:
            out[prefix + p.name] = p
    return out


def _crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_marker(step_dir: epath.Path, step: int) -> None:
    """Record the committed step's files: sizes and CRC-32s (written to a temporary
    name and renamed on a local disk; one write on a bucket)."""
    files = {rel: [p.stat().length, _crc32(p)] for rel, p in _files(step_dir).items()}
    text = json.dumps({"step": step, "files": files})
    if wd.is_remote(step_dir):
        (step_dir / MARKER).write_text(text)
    else:
        tmp = step_dir / (MARKER + ".tmp")
        tmp.write_text(text)
        tmp.rename(step_dir / MARKER)


def check_step(step_dir: epath.Path, step: int, full: bool = True) -> tuple[dict | None, str]:
    """(the step's config, "") if its files match its marker (sizes; with ``full``,
    CRC-32s too), else (None, what is wrong). Reads files only."""
    try:
        marker = json.loads((step_dir / MARKER).read_text())
        expected = dict(marker["files"])
    except FileNotFoundError:
        return None, "no integrity marker: its save did not finish"
    except (OSError, ValueError, KeyError, TypeError):
        return None, "integrity marker unreadable"
    if marker.get("step") != step:
        return None, "integrity marker does not match the step"
    found = _files(step_dir)
    for rel, (size, crc) in expected.items():
        if rel not in found:
            return None, f"{rel} missing"
        actual = found[rel].stat().length
        if actual != size:
            return None, f"{rel} truncated or resized ({actual} != {size} bytes)"
        if full and _crc32(found[rel]) != crc:
            return None, f"{rel} corrupt (checksum mismatch)"
    try:
        return json.loads((step_dir / "config" / "metadata").read_text()), ""
    except (OSError, ValueError):
        return None, "config/metadata unreadable"


def scan(workdir: str | epath.PathLike, full: bool = False):
    """(good, bad) committed steps, newest first: (step, config) and (step, why),
    checked against their markers (sizes; with ``full``, checksums). Touches nothing."""
    root = directory(workdir)
    steps = ocp.path.step.checkpoint_steps(root) if root.is_dir() else []
    good, bad = [], []
    for step in sorted(steps, reverse=True):
        config, why = check_step(root / str(step), step, full)
        if config is None:
            bad.append((step, why))
        else:
            good.append((step, config))
    return good, bad


@dataclasses.dataclass
class Resume:
    """Where a run resumes: ``step`` (None: a fresh run) with its ``config``, and the
    damaged steps found on the way (``bad``: (step, why), to set aside)."""

    step: int | None
    config: dict | None
    bad: list[tuple[int, str]]


def find_resume(
    workdir: str | epath.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    full: bool = True,
    exclude: Sequence[int] = (),
) -> Resume:
    """The newest step whose files match its marker (checksummed in full, newest first,
    with ``full``), skipping ``exclude``. ValueError (one line, nothing touched) when
    checkpoints exist but none is intact, when they belong to a config incompatible
    with ``config``, or when another process count cannot resume them. Reads only."""
    good, bad = scan(workdir)
    bad = [b for b in bad if b[0] not in exclude]
    root = directory(workdir)
    for step, saved in good:
        if step in exclude:
            continue
        if full:
            saved, why = check_step(root / str(step), step, full=True)
            if saved is None:
                bad.append((step, why))
                continue
        if config is not None:
            check_compatible(saved, config, str(wd.path(workdir)))
            _check_process_count(root / str(step), step)
        return Resume(step, saved, bad)
    if bad:
        raise ValueError(
            f"{root} holds no intact checkpoint (skipped: "
            + "; ".join(f"step {s}: {why}" for s, why in sorted(bad, reverse=True))
            + "); nothing was changed: repair or move them, or use another --workdir"
        )
    return Resume(None, None, [])


def _process_states(data: Mapping[str, Any], step: int) -> list:
    states = data.get("process_states") if isinstance(data, Mapping) else None
    if not isinstance(states, list) or not states:
        raise ValueError(f"checkpoint {step} holds no data iterator state")
    return states


def data_state(workdir: str | epath.PathLike, step: int) -> dict:
    """Process 0's data iterator state in checkpoint ``step`` (the same on every
    process: the next global batch), read from its files."""
    path = directory(workdir) / str(step) / "data" / "metadata"
    return _process_states(json.loads(path.read_text()), step)[0]


def _check_process_count(step_dir: epath.Path, step: int) -> None:
    """The data iterator states are the same on every process (the next global batch),
    so another process count resumes them; refuse states that differ."""
    states = _process_states(json.loads((step_dir / "data" / "metadata").read_text()), step)
    if len(states) != jax.process_count() and any(s != states[0] for s in states):
        raise ValueError(
            f"checkpoint {step} in {step_dir.parent} was written by {len(states)} processes "
            f"whose data iterator states differ; resume it with --num_processes {len(states)}"
        )


def latest(workdir: str | epath.PathLike) -> tuple[int, dict[str, Any]] | None:
    """The newest intact checkpoint's (step, config), checksummed in full; None when
    there are no checkpoints; ValueError (nothing touched) when none is intact."""
    found = find_resume(workdir)
    return None if found.step is None else (found.step, found.config)


def resume_step(workdir: str | epath.PathLike, config: Mapping[str, Any]) -> int | None:
    """The step to resume from (None: a fresh run): the newest intact checkpoint,
    checksummed in full. Refuses (ValueError, nothing touched) a workdir whose
    checkpoints belong to an incompatible config or are all damaged. Reads only."""
    return find_resume(workdir, config).step


def set_aside(workdir: str | epath.PathLike, bad: Sequence[tuple[int, str]], resume=None):
    """Rename each damaged step's directory to ``<step>.corrupt`` (``.corrupt-N`` if
    taken) with a warning, on process 0, then wait for every process. Returns the
    new paths."""
    root, moved = directory(workdir), []
    for step, why in bad:
        target, n = root / f"{step}.corrupt", 1
        while target.exists():
            n += 1
            target = root / f"{step}.corrupt-{n}"
        if jax.process_index() == 0:
            (root / str(step)).rename(target)
            print(
                f"warning: checkpoint {step} is damaged ({why}); skipped it and moved it to "
                f"{target}; resuming from "
                + (f"step {resume}" if resume is not None else "scratch"),
                file=sys.stderr,
                flush=True,
            )
        moved.append(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("polyjax_set_aside")
    return moved


def prepare_workdir(workdir: str | epath.PathLike, config: Mapping[str, Any]) -> int | None:
    """``resume_step``, after setting aside the damaged steps met on the way."""
    found = find_resume(workdir, config)
    set_aside(workdir, found.bad, found.step)
    return found.step


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _all_finite(tree: Any) -> bool:
    """No NaN or Inf in the floating-point leaves of ``tree``."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return not leaves or bool(_finite(leaves))


def _agreed(ok: bool) -> bool:
    """``ok`` on every process (an all-gather on several)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.array([ok], np.int32)).all())


def _release_orbax_waiters() -> None:
    """After a failed save, Orbax's threads that wait for a signal of that save (e.g.
    the step directory's creation, which failed) would wait 5 minutes, holding the
    process at exit: cancel them and send their signals (Orbax internals; best effort)."""
    with contextlib.suppress(Exception):
        for thread in threading.enumerate():
            if isinstance(thread, ocp_future._SignalingThread) and thread.is_alive():
                thread._cancelled = True
                ocp_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)


class SaveError(RuntimeError):
    """A checkpoint could not be written; ``str()`` is one line naming the path and
    the cause. The checkpoints saved before it are intact."""


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files passed the checks did not restore to a finite state."""

    def __init__(self, step: int, why: str):
        super().__init__(f"checkpoint {step}: {why}")
        self.step, self.why = step, why


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
    checkpoints are kept. A save returns once the state is copied off the devices;
    Orbax writes and commits it in the background, and then the same background
    thread writes its marker (``_complete``); ``async_save=False`` waits for all that.
    ``check`` (at each step) raises the ``SaveError`` of a save that failed.
    """

    def __init__(self, workdir: str | epath.PathLike, *, every: int, keep: int, async_save: bool):
        self.every, self.keep, self.async_save = every, keep, async_save
        self.workdir, self.root = wd.path(workdir), directory(workdir)
        self.saving: tuple[int, threading.Thread] | None = None
        self.error: str | None = None
        self.manager = ocp.CheckpointManager(
            self.root,
            item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None, enable_async_checkpointing=True, create=True
            ),
        )

    def _complete(self, step: int) -> None:
        """(Background thread.) Wait for Orbax to commit ``step``; then mark it."""
        try:
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                write_marker(self.root / str(step), step)
        except Exception as e:  # reported by check() / finish() on the loop's thread
            self.error = f"could not save checkpoint {step} in {self.root}: {_one_line(e)}"
            _release_orbax_waiters()

    def check(self, boundary: bool = True) -> None:
        """Raise the ``SaveError`` of a failed save; on several processes, agreed (an
        all-gather) at ``boundary`` steps only."""
        if jax.process_count() > 1 and not boundary:
            return
        if not _agreed(self.error is None):
            self.saving = None
            raise SaveError(self.error or "a checkpoint could not be saved on another process")

    def finish(self) -> None:
        """Wait for the save in progress and its marker (``SaveError`` if it failed);
        then delete the steps beyond ``keep``."""
        if self.saving is None:
            return
        step, thread = self.saving
        thread.join()
        self.check()
        self.saving = None
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
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_to_saveable(state)),
                    data=ocp.args.JsonSave({"process_states": states}),
                    config=ocp.args.JsonSave(dict(config)),
                ),
            )
        except Exception as e:
            self.error = f"could not save checkpoint {step} in {self.root}: {_one_line(e)}"
            self.check()
        thread = threading.Thread(target=self._complete, args=(step,), name="polyjax-marker")
        thread.start()
        self.saving = (step, thread)
        if not self.async_save:
            self.finish()

    def restore(self, step: int, target: Any) -> tuple[Any, Any]:
        """The state of ``step`` with the structure and shardings of ``target`` (a state
        of the same run, e.g. freshly initialised), and this process's data iterator
        state. ``DamagedCheckpointError`` if it does not restore or holds a NaN or Inf.
        Check its files first (``find_resume``)."""
        error = ""
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract_saveable(target)),
                    data=ocp.args.JsonRestore(),
                ),
            )
            states = _process_states(out["data"], step)
            state = _from_saveable(out["state"], target)
        except Exception as e:
            error = f"does not restore ({_one_line(e)})"
        if not _agreed(not error):
            raise DamagedCheckpointError(step, error or "does not restore on another process")
        if not _all_finite(state):
            raise DamagedCheckpointError(step, "holds non-finite values")
        # The same state on every process (the next global batch): any count resumes it.
        mine = states[jax.process_index()] if len(states) == jax.process_count() else states[0]
        return state, mine

    def restore_newest(
        self, target: Any, config: Mapping[str, Any], step: int, *, move_aside: bool = True
    ) -> tuple[int, Any, Any]:
        """Restore ``step`` (found by ``find_resume``) or, if it is damaged, the newest
        intact step before it: (step, state, data iterator state). With ``move_aside``
        the damaged steps are set aside once an older one has restored (so a state that
        no step restores to moves nothing); ValueError when none restores."""
        failed: list[tuple[int, str]] = []
        while True:
            try:
                state, data_state = self.restore(step, target)
                break
            except DamagedCheckpointError as e:
                failed.append((step, e.why))
                if _primary():
                    print(f"warning: {e}; trying an older one", file=sys.stderr, flush=True)
            older = [s for s, _ in failed]
            found = find_resume(self.workdir, config, exclude=older) if _primary() else None
            step = agreed_step(found.step if found else None)
            if step is None:
                raise ValueError(
                    f"no checkpoint in {self.root} restores ("
                    + "; ".join(f"step {s}: {why}" for s, why in failed)
                    + "); nothing was moved: repair them, or use another --workdir"
                )
            failed += [b for b in (found.bad if found else []) if b[0] not in older]
        if failed and move_aside:
            set_aside(self.workdir, failed, step)
            self.manager.reload()
        return step, state, data_state

    def close(self) -> None:
        """Finish the save in progress and release the manager."""
        try:
            self.finish()
        finally:
            try:
                self.manager.close()
            except Exception:  # Orbax raises a failed save again; it is reported already
                if self.error is None:
                    raise

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.saving is not None:  # an error is on its way: wait quietly
            self.saving[1].join()
            self.saving = None
        self.close()


def _primary() -> bool:
    return jax.process_index() == 0


def agreed_step(step: int | None) -> int | None:
    """Process 0's ``step`` on every process."""
    if jax.process_count() == 1:
        return step
    got = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
    return None if got < 0 else got


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
