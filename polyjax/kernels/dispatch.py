"""Which implementation runs: ``impl`` = "xla" | "pallas" | "auto".

- "xla": the jnp custom VJP (``XlaOps``); exact closed-form gradients, saves
  only x and the per-row statistics. Runs everywhere.
- "pallas": the Pallas kernels; Triton layout on GPU, Mosaic layout on TPU, and
  on CPU the same kernels in interpret mode (slow; for tests).
- "auto": XLA on CPU. On GPU and TPU, Pallas only where a benchmark on that
  platform showed it faster; no GPU/TPU measurement exists yet, so
  ``AUTO_PALLAS`` is empty and auto picks XLA everywhere (see README, Kernels).
"""

from __future__ import annotations

import jax

from polyjax.kernels.pallas import BACKENDS, PallasOps
from polyjax.kernels.xla import XlaOps

IMPLS = ("xla", "pallas", "auto")
AUTO_PALLAS: frozenset[str] = frozenset()
"""Platforms ("gpu", "tpu") where ``impl="auto"`` picks Pallas, from benchmarks."""

_LAYOUT = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "tpu"}


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """ "xla" or "pallas" for ``impl`` on ``platform`` (default: jax's backend)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    return "pallas" if platform in AUTO_PALLAS else "xla"


def make_ops(
    impl: str,
    *,
    interpret: bool | None = None,
    backend: str | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> XlaOps | PallasOps:
    """The ops object for ``impl``. For Pallas: ``backend`` "triton" | "tpu"
    (default: the current platform's, "triton" on CPU); ``interpret`` defaults to
    True on CPU, where nothing can compile the kernels."""
    if resolve_impl(impl) == "xla":
        return XlaOps()
    platform = jax.default_backend()
    backend = backend or _LAYOUT.get(platform, "triton")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if interpret is None:
        interpret = platform == "cpu"
    return PallasOps(backend, bool(interpret), block_rows, block_cols)
