"""Which implementation runs: ``impl`` = "xla" | "pallas" | "auto".

- "xla": the fused passes in jnp (``polyjax.kernels.xla``); runs everywhere.
- "pallas": the Pallas kernels; the Triton layout on GPU, the TPU layout on TPU,
  and on CPU the same kernels in interpret mode (slow; for tests).
- "auto": XLA, except on the platforms in ``AUTO_PALLAS``, where the compiled
  train step of the paper's 1B model moves fewer bytes with the Pallas kernels
  (docs/aot.md): on 8 H100s (XLA:GPU) 0.740 TB per device per step against
  0.896 TB; not on TPU, where the kernel's row-major input costs XLA:TPU two
  layout copies of the FFN activation per layer (0.876 TB against 0.783 TB on
  v5p-16). Compiled figures, not timings on the hardware (docs/kernels.md).
"""

from __future__ import annotations

from polyjax.backend import normalize
from polyjax.backend import platform as current_platform
from polyjax.kernels import pallas

IMPLS = ("xla", "pallas", "auto")
AUTO_PALLAS: frozenset[str] = frozenset({"gpu"})
"""Platforms ("gpu", "tpu") where ``impl="auto"`` picks Pallas, from the compiled step."""

_LAYOUT = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "tpu"}


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """ "xla" or "pallas" for ``impl`` on ``platform`` (default: ``polyjax.backend.platform()``,
    the compile target's or jax's backend)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = normalize(platform) if platform else current_platform()
    return "pallas" if platform in AUTO_PALLAS else "xla"


def pallas_config(
    impl: str,
    *,
    backend: str | None = None,
    interpret: bool | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
    resident: bool | None = None,
) -> pallas.Config | None:
    """The Pallas configuration ``impl`` resolves to, or None for XLA. Defaults:
    the current platform's layout ("triton" on CPU) and, on CPU, where nothing
    can compile the kernels, interpret mode."""
    if resolve_impl(impl) == "xla":
        return None
    platform = current_platform()
    return pallas.Config(
        backend=backend or _LAYOUT.get(platform, "triton"),
        interpret=platform == "cpu" if interpret is None else bool(interpret),
        block_rows=block_rows,
        block_cols=block_cols,
        resident=resident,
    )
