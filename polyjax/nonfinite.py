"""Non-finite values (``train.nonfinite``): the policy's verdict at each check, the
diagnosis of the step that went bad, and its report.

The update step never applies a non-finite update and counts them
(``polyjax.train.train_step``); the loop checks the count at logging and
checkpoint steps (``Policy.why_stop``) and, when the policy says stop, replays the
bad step's batch through ``diagnose`` and raises ``NonFiniteError`` with the text
of ``report``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class NonFiniteError(RuntimeError):
    """A NaN or Inf stopped the run; ``str()`` is the report."""

    def __init__(self, step: int, report: str):
        super().__init__(report)
        self.step = step


@dataclasses.dataclass
class Policy:
    """``train.nonfinite`` ("stop" or "skip") and ``train.max_skips`` over a run.
    ``seen``: the skipped updates already warned of; ``checked``: the step and the
    data iterator's state of the last check passed (to replay the batches since)."""

    mode: str
    max_skips: int
    checked: tuple[int, Any]
    seen: int = 0

    def why_stop(self, step: int, count: int, bad_step: int, data_state: Any) -> str | None:
        """Why the run must stop, ``count`` steps having been non-finite by ``step``
        (``bad_step`` the latest); None: go on (after a warning of new skips)."""
        if count and self.mode == "stop":
            return "train.nonfinite='stop'; the state was kept at the last good step"
        if count > self.max_skips:
            return f"{count} updates skipped in total, more than train.max_skips={self.max_skips}"
        if count > self.seen and jax.process_index() == 0:
            print(
                f"warning: skipped {count - self.seen} non-finite update(s) by step {step} "
                f"(latest at step {bad_step}; {count} in total, limit {self.max_skips})",
                file=sys.stderr,
                flush=True,
            )
        self.seen, self.checked = count, (step, data_state)
        return None


def _path(path: tuple) -> str:
    return ".".join(map(str, path))


def diagnose(loss_fn: Callable[[nnx.State], jax.Array], params: nnx.State):
    """The loss at ``params`` and, per parameter (dotted path -> value), the
    gradient's norm, whether it is finite, and the PolyCom coefficients."""
    value, grads = jax.value_and_grad(loss_fn)(params)
    flat = {_path(p): g.get_value() for p, g in nnx.to_flat_state(grads)}
    norms = {k: jnp.sqrt(jnp.sum(jnp.square(g))) for k, g in flat.items()}
    finite = {k: jnp.all(jnp.isfinite(g)) for k, g in flat.items()}
    coeffs = {
        _path(p): v.get_value() for p, v in nnx.to_flat_state(params) if "coeffs" in map(str, p)
    }
    return value, norms, finite, coeffs


def report(
    step: int, loss: float, norms: Mapping, finite: Mapping, coeffs: Mapping, why: str
) -> str:
    """A readable report of a non-finite step (values from ``diagnose``)."""
    bad = [k for k, ok in finite.items() if not ok]
    layers: dict[str, float] = {}
    for key, norm in norms.items():
        parts = key.split(".")
        group = ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
        layers[group] = math.hypot(layers.get(group, 0.0), float(norm))
    lines = [
        f"non-finite values at step {step}: {why}",
        f"  loss at the last good state on that batch: {loss}"
        + ("  (non-finite)" if not math.isfinite(loss) else ""),
        f"  non-finite gradient leaves ({len(bad)} of {len(finite)}): "
        + (", ".join(bad) if bad else "none"),
        "  gradient norm per layer: "
        + ", ".join(f"{k} {v:.4g}" for k, v in sorted(layers.items())),
        "  activation coefficients (PolyCom weight/bias per layer):",
        *(f"    {k}: {np.array2string(np.asarray(v), precision=4)}" for k, v in coeffs.items()),
    ]
    if not coeffs:
        lines[-1] += " none (no PolyCom activation)"
    return "\n".join(lines)
