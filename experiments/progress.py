"""A study's progress across its runs: how many of its runs are done, the step of
the one training now, and the ETA of the whole study.

The ETA is the training FLOPs still to do (``flops_per_token`` x tokens of every
planned run not finished, the current one's remaining steps included) times the
seconds per FLOP measured in this session: per model shape where that shape has
run, else over every run so far (a ladder's larger rungs run more FLOPs per second
than its smallest, so the first estimate of them is on the long side). Runs whose
learning rate is not known yet (the best-lr runs before their grid is finished)
count at the cost of their shape. With several processes sharing the study, the
ETA is divided by their number (this one and each holding a planned run's lock).
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from polyjax.model import ModelConfig, flops_per_token

_FLOPS: dict[str, float] = {}


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``; ``?`` for nan."""
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def run_flops(cfg) -> float:
    """Training FLOPs of a run of ``cfg`` (an ml_collections config): flops_per_token
    (6 x matmul parameters but the input embedding, plus attention) x its tokens."""
    key = json.dumps(cfg.model.to_dict(), sort_keys=True, default=str) + f"{cfg.data.seq_len}"
    if key not in _FLOPS:
        _FLOPS[key] = flops_per_token(ModelConfig.from_dict(cfg.model.to_dict()), cfg.data.seq_len)
    return _FLOPS[key] * cfg.data.global_batch * cfg.data.seq_len * cfg.train.steps


def shape(cfg) -> tuple:
    """What a run's speed depends on: the model's shape and the batch."""
    m = cfg.model
    return (m.d_model, m.n_layers, m.d_ff, m.vocab_size, cfg.data.global_batch, cfg.data.seq_len)


STEP_LINE = re.compile(r"^step (\d+)/(\d+)", re.MULTILINE)


class RunLog(io.TextIOBase):
    """The stream a run's trainer writes to: each write goes to ``log`` (its
    train.log), and each progress line (``step N/M ...``) also to ``on_step(N, M)``."""

    def __init__(self, log: TextIO, on_step: Callable[[int, int], None]):
        self.log, self.on_step = log, on_step

    def write(self, text: str) -> int:
        self.log.write(text)
        for m in STEP_LINE.finditer(text):
            self.on_step(int(m[1]), int(m[2]))
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False


class StudyProgress:
    """``plan(finished, pending)`` before each run (the planned runs, as configs,
    the finished ones and the rest), then ``start``, ``step`` (from the run's
    log) and ``end``. A line ``[study] ...`` goes to ``stream``: rewritten in place
    on a terminal, otherwise at most one every ``every_s`` seconds."""

    def __init__(
        self,
        name: str,
        stream: TextIO | None = None,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name, self.every_s, self.clock = name, every_s, clock
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.rates: dict[tuple, list[float]] = {}  # shape -> [seconds, FLOPs] measured
        self.done = self.total = 0
        self.pending: list[Any] = []
        self.processes = 1  # training this study at once (the ETA is shared among them)
        self.current: Any = None
        self.label = ""
        self.last_print = -math.inf
        self.width = 0

    def plan(self, finished: Sequence[Any], pending: Sequence[Any], processes: int = 1) -> None:
        self.done, self.total = len(finished), len(finished) + len(pending)
        self.pending = list(pending)
        self.processes = max(1, processes)

    def start(self, cfg, label: str) -> None:
        self.current, self.label = cfg, label
        self.t0, self.step_now, self.step0 = self.clock(), None, None

    def step(self, step: int, total: int) -> None:
        if self.step0 is None:
            self.step0 = step  # the first report: the steps before it (a resume) are not timed
            self.t_first = self.clock()
        self.step_now = step
        now = self.clock()
        if self.tty or now - self.last_print >= self.every_s:
            self.last_print = now
            self._print(self.line())

    def end(self) -> None:
        """The current run finished (or stopped): its seconds per FLOP are measured."""
        if self.current is not None and self.step_now is not None and self.step_now > 0:
            steps, since = self.step_now - self.step0, self.t_first
            if steps <= 0:  # one report only (a short run): its whole time, compile included
                steps, since = self.step_now, self.t0
            acc = self.rates.setdefault(shape(self.current), [0.0, 0.0])
            acc[0] += self.clock() - since
            acc[1] += run_flops(self.current) * steps / self.current.train.steps
        self.current = None
        if self.tty and self.width:
            self.stream.write("\n")
            self.width = 0

    def seconds_per_flop(self, cfg) -> float:
        """Measured on ``cfg``'s shape, else over every shape; nan before any."""
        s, f = self.rates.get(shape(cfg), (0.0, 0.0))
        if f > 0:
            return s / f
        if self.current is not None and shape(self.current) == shape(cfg):
            live = self._live()
            if live:
                return live[0] / live[1]
        s = sum(v[0] for v in self.rates.values())
        f = sum(v[1] for v in self.rates.values())
        live = self._live()
        if live:
            s, f = s + live[0], f + live[1]
        return s / f if f > 0 else math.nan

    def _live(self) -> tuple[float, float] | None:
        """(seconds, FLOPs) of the current run since its first report."""
        if self.current is None or self.step0 is None or self.step_now <= self.step0:
            return None
        frac = (self.step_now - self.step0) / self.current.train.steps
        return self.clock() - self.t_first, run_flops(self.current) * frac

    def eta(self) -> float:
        """Seconds left for the whole study: the current run's remaining steps and
        every pending run after it."""
        left = 0.0
        for cfg in self.pending:
            frac = 1.0
            if cfg is self.current and self.step_now is not None:
                frac = 1.0 - self.step_now / cfg.train.steps
            left += run_flops(cfg) * frac * self.seconds_per_flop(cfg)
        return left / self.processes

    def line(self) -> str:
        step = "" if self.step_now is None else f" step {self.step_now}/{self.current.train.steps}"
        return (
            f"[{self.name}] {self.done}/{self.total} runs done; now {self.label}{step}; "
            f"study ETA {duration(self.eta())}"
            + (f" ({self.processes} processes)" if self.processes > 1 else "")
        )

    def message(self, text: str) -> None:
        """A line of its own (a run's result), not rewritten."""
        self._print(text, keep=True)

    def _print(self, text: str, keep: bool = False) -> None:
        if self.tty and not keep:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            if self.tty and self.width:
                self.stream.write("\n")
                self.width = 0
            self.stream.write(text + "\n")
        self.stream.flush()
