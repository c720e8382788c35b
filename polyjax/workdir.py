"""The workdir: its path (etils ``epath``, so ``gs://...`` and local directories work
alike, as in Orbax) and its lock.

A run holds ``<workdir>/polyjax.lock`` from before it first writes there until it
ends: JSON naming the host, the process id, the command and a heartbeat time that a
thread refreshes every ``HEARTBEAT_S`` seconds. A lock is stale when its process is
gone (same host) or its heartbeat is older than ``STALE_S`` (any host); a stale lock
is taken over with a warning, a live one refuses the run (``InputError``, one line
naming the other run). On a local disk the lock file is created atomically
(``O_EXCL``); on an object store it is written, then read back after a pause, so two
launches racing within that pause can still both start (best effort). Several
processes of one run: process 0 takes the lock, the others follow its verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from polyjax.config import InputError

LOCK = "polyjax.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
RACE_PAUSE_S = 2.0  # object stores: the wait before reading a written lock back


def path(workdir: str | os.PathLike) -> epath.Path:
    """``workdir`` as an ``epath.Path``: a URI (``gs://bucket/run``) as it is, a local
    path made absolute."""
    return epath.Path(workdir) if is_remote(workdir) else epath.Path(os.path.abspath(workdir))


def is_remote(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` is a URI (``gs://``, ``s3://``, ...) rather than a local path."""
    return "://" in os.fspath(workdir)


def _read(lock: epath.Path) -> dict | None:
    """The lock's record; None when there is none; {} when it is unreadable."""
    try:
        record = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def stale(record: dict) -> str | None:
    """Why the lock ``record`` is stale (its run is gone), or None: it is live."""
    try:
        host, pid, beat = str(record["host"]), int(record["pid"]), float(record["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return "the lock file is unreadable"
    age = time.time() - beat
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} on {host} is not running"
        except PermissionError:
            pass  # alive, another user's
    if age > STALE_S:
        return f"its heartbeat is {age:.0f} s old (> {STALE_S:.0f} s)"
    return None


def _describe(record: dict, lock: epath.Path) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return (
        f"another run (host {record.get('host')}, pid {record.get('pid')}, started {started}: "
        f"{record.get('command')}); wait for it to end or stop it (if it is dead, delete {lock})"
    )


def held(workdir: str | os.PathLike) -> bool:
    """Whether a live run (this process or another) holds ``workdir``'s lock. Reads only."""
    record = _read(path(workdir) / LOCK)
    return record is not None and not stale(record)


def check(workdir: str | os.PathLike) -> None:
    """InputError if a live run holds ``workdir``'s lock. Reads only."""
    lock = path(workdir) / LOCK
    record = _read(lock)
    if record is not None and not stale(record):
        raise InputError(f"{path(workdir)} is in use by {_describe(record, lock)}")


class Lock:
    """``with Lock(workdir):`` holds ``workdir``'s lock (process 0; the others agree)."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = path(workdir)
        self.path = self.workdir / LOCK
        self.token = uuid.uuid4().hex
        self.record: dict = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _write(self, exclusive: bool) -> None:
        self.record["heartbeat"] = time.time()
        text = json.dumps(self.record)
        if is_remote(self.workdir):
            self.path.write_text(text)
        elif exclusive:  # atomic: FileExistsError when another run got there first
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        else:
            tmp = self.workdir / f"{LOCK}.{self.token}"
            tmp.write_text(text)
            tmp.replace(self.path)

    def acquire(self) -> None:
        """Take the lock (InputError if a live run holds it)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "command": shlex.join(sys.argv),
            "token": self.token,
        }
        for _ in range(3):
            held = _read(self.path)
            if held is not None:
                why = stale(held)
                if why is None:
                    raise InputError(f"{self.workdir} is in use by {_describe(held, self.path)}")
                print(
                    f"warning: took over the stale lock {self.path} ({why})",
                    file=sys.stderr,
                    flush=True,
                )
                self.path.unlink(missing_ok=True)
            try:
                self._write(exclusive=True)
            except FileExistsError:
                continue  # another launch won the race: look again
            if is_remote(self.workdir):
                time.sleep(RACE_PAUSE_S)
                if (_read(self.path) or {}).get("token") != self.token:
                    continue
            break
        else:
            held = _read(self.path) or {}
            raise InputError(f"{self.workdir} is in use by {_describe(held, self.path)}")
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="polyjax-lock")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a full disk: the run's own writes say so
                self._write(exclusive=False)

    def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still this run's."""
        if self._beat is None:
            return
        self._stop.set()
        self._beat.join()
        self._beat = None
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lock:
        error = None
        if jax.process_index() == 0:
            try:
                self.acquire()
            except InputError as e:
                error = e
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not ok and error is None:
                error = InputError(f"process 0 could not lock {self.workdir} (see its error)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        self.release()
