"""The numbers a study's verdicts rest on, as pure functions of logged values:
the selection and report halves of the held-out windows, the best learning rate of a
grid, tokens-to-target on a loss curve, and the paired t-test over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps


def halves(batch_ce: Sequence[float], batch_tokens: Sequence[float]) -> dict[str, float]:
    """The mean loss per token of the selection half (the first half of the
    evaluation batches, rounded down) and of the report half (the rest), and of all."""
    ce, n = np.asarray(batch_ce, float), np.asarray(batch_tokens, float)
    cut = len(ce) // 2
    loss = lambda sl: float(ce[sl].sum() / max(n[sl].sum(), 1.0))
    return {
        "select": loss(slice(0, cut)),
        "report": loss(slice(cut, None)),
        "all": loss(slice(None)),
    }


def best_lr(losses: Mapping[float, Sequence[float]]) -> float:
    """The lr whose mean loss (over the selection seeds) is lowest; a diverged run
    counts as +inf, so a grid that diverged everywhere gives its smallest lr."""
    if not losses:
        raise ValueError("best_lr: no learning rate to choose from")
    mean = {
        lr: float(np.mean([v if math.isfinite(v) else math.inf for v in vs]))
        for lr, vs in losses.items()
    }
    return min(sorted(mean), key=lambda lr: mean[lr])


def at_edge(lr: float, grid: Sequence[float]) -> bool:
    """Whether ``lr`` is the smallest or largest of ``grid`` (the optimum may lie beyond)."""
    return lr in (min(grid), max(grid))


def tokens_to_target(
    tokens: Sequence[float], losses: Sequence[float], target: float
) -> float | None:
    """The tokens at which the curve (``losses`` at ``tokens``, in order) first
    reaches ``target``, linearly interpolated between the two logged points that
    straddle it; None if the curve never reaches it."""
    t, y = np.asarray(tokens, float), np.asarray(losses, float)
    for i in range(len(y)):
        if y[i] <= target:
            if i == 0:
                return float(t[0])
            frac = (y[i - 1] - target) / (y[i - 1] - y[i])
            return float(t[i - 1] + frac * (t[i] - t[i - 1]))
    return None


def paired_t(deltas: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test that the mean of ``deltas`` (one per
    seed: arm minus reference under the same seed) is zero; (nan, nan) with fewer
    than two, or no spread."""
    d = np.asarray(deltas, float)
    if len(d) < 2 or not np.all(np.isfinite(d)):
        return math.nan, math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return math.nan, math.nan
    t = d.mean() / (sd / math.sqrt(len(d)))
    return float(t), float(2 * sps.t.sf(abs(t), len(d) - 1))


def verdict(delta: float, p: float, lower_is_better: bool = True, alpha: float = 0.05) -> str:
    """ "better"/"worse" than the reference when the paired test rejects equality at
    ``alpha``, else "no difference shown"."""
    if not math.isfinite(p) or p >= alpha:
        return "no difference shown"
    return "better" if (delta < 0) == lower_is_better else "worse"
