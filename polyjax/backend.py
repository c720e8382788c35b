"""The platform the code is traced for: "tpu", "gpu" or "cpu".

Choices that depend on the hardware (attention "auto", kernel "auto", the Pallas
layout) ask ``platform()``. On a machine with the accelerator it is jax's default
backend; while ``polyjax.aot`` compiles for a chip that is not here (jax's backend
is then the CPU), it is the target's, set with ``compiling_for``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("polyjax_target", default=None)


def normalize(platform: str) -> str:
    """A device's or backend's platform name as one of ``PLATFORMS``."""
    return _ALIASES.get(platform, platform)


def platform() -> str:
    """The platform being traced for: the compile target's, else jax's backend."""
    return _TARGET.get() or normalize(jax.default_backend())


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Trace for ``platform`` (a compile target's) inside the block."""
    token = _TARGET.set(normalize(platform))
    try:
        yield
    finally:
        _TARGET.reset(token)
