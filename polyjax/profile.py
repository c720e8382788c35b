"""A ``jax.profiler`` trace of a window of training steps (``train.profile_steps``),
written where TensorBoard's profile plugin and XProf look: ``<workdir>/tensorboard/
plugins/profile/<session>/<host>.xplane.pb``, beside the run's scalars (process i > 0
of several: ``<workdir>/tensorboard/process<i>/...``, so that processes sharing a
host do not write the same file).

The loop dispatches step t before it reads step t-1's metrics; the trace starts once
the step before the window has finished on the devices and stops once the window's
last step has, so it holds the device work of exactly those steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

PLUGIN_DIR = ("plugins", "profile")


def logdir(workdir: str | os.PathLike, process_index: int = 0):
    """The TensorBoard log directory a process's trace goes under."""
    root = workdir / "tensorboard"
    return root if process_index == 0 else root / f"process{process_index}"


class Window:
    """``with Window(...) as w:`` around the loop, ``w.after(step, outputs)`` after
    each step is dispatched. ``steps=(start, stop)`` traces steps start..stop-1;
    (0, 0) nothing. A run resumed at ``resumed`` traces what is left of the window;
    a loop that stops inside the window (an error, a signal) ends the trace."""

    def __init__(self, workdir, steps: tuple[int, int], resumed: int, say: Callable):
        self.first = resumed + 1  # the run's first step
        self.start, self.stop = max(steps[0], self.first), steps[1]
        self.dir = logdir(workdir, jax.process_index())
        self.say, self.tracing = say, False

    def __enter__(self) -> Window:
        if self.start < self.stop and self.start == self.first:
            self._begin()
        return self

    def after(self, step: int, outputs: Any) -> None:
        if self.start < self.stop and step + 1 == self.start:
            jax.block_until_ready(outputs)  # step start-1 is not in the trace
            self._begin()
        if self.tracing and step == self.stop - 1:
            jax.block_until_ready(outputs)  # the window's device work is in it
            self._end()
            where = self.dir.joinpath(*PLUGIN_DIR)
            self.say(f"profile of steps {self.start}-{step}: {where} (TensorBoard, XProf)")

    def __exit__(self, *exc) -> None:
        if self.tracing:
            self._end()

    def _begin(self) -> None:
        jax.profiler.start_trace(str(self.dir))
        self.tracing = True

    def _end(self) -> None:
        jax.profiler.stop_trace()
        self.tracing = False
