"""The numbers a study's verdicts rest on, as pure functions of logged values:
the selection and report halves of the held-out windows, the best learning rate of a
grid, tokens-to-target on a loss curve, the paired t-test over seeds and the
t-interval of the mean paired difference, and the scaling ladder's straight-line
fits (in log compute) with the t-interval of their slope."""

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


def mean_ci(deltas: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The ``level`` t-interval of the mean of ``deltas`` (one per seed): mean ±
    t_{n-1} x sd / sqrt(n); (nan, nan) with fewer than two, or a non-finite one."""
    d = np.asarray(deltas, float)
    if len(d) < 2 or not np.all(np.isfinite(d)):
        return math.nan, math.nan
    half = sps.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


MIN_EVALS = 3  # evaluations per curve below which no verdict is given
TOO_FEW_EVALS = "too few evaluations to compare"
TOO_FEW_SEEDS = "too few seeds to compare"


def verdict(
    delta: float,
    p: float,
    lower_is_better: bool = True,
    alpha: float = 0.05,
    *,
    evals: int | None = None,
    seeds: int | None = None,
) -> str:
    """ "better"/"worse" than the reference when the paired test rejects equality at
    ``alpha``, else "no difference shown". No verdict where one would be noise: with
    fewer than MIN_EVALS evaluations on a curve (``evals``: the fewest of the runs
    compared; a run of a few steps has no curve to speak of) or fewer than two seeds."""
    if evals is not None and evals < MIN_EVALS:
        return TOO_FEW_EVALS
    if seeds is not None and seeds < 2:
        return TOO_FEW_SEEDS
    if not math.isfinite(p) or p >= alpha:
        return "no difference shown"
    return "better" if (delta < 0) == lower_is_better else "worse"


def line_fit(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Least squares y = intercept + slope x over the points (x, y) (several per x
    allowed: one per seed), with the ``level`` t-interval of the slope from the
    residuals (n - 2 degrees of freedom; nan with fewer than three points or fewer
    than two distinct x). Where some x repeat and there are three or more distinct x,
    also the lack-of-fit F-test (``lof_p``): do the means at each x depart from the
    line by more than the spread within an x (the seeds) explains? A small p says the
    line summarises the points but does not describe them."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    nan = {"slope": math.nan, "intercept": math.nan, "slope_low": math.nan,
           "slope_high": math.nan, "n": len(x), "x_distinct": len(set(x.tolist()))}  # fmt: skip
    if len(x) < 2 or len(set(x.tolist())) < 2:
        return nan
    sxx = float(((x - x.mean()) ** 2).sum())
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * x.mean())
    out = {**nan, "slope": slope, "intercept": intercept, "x_mean": float(x.mean()), "sxx": sxx}
    if len(x) > 2:
        resid = y - (intercept + slope * x)
        sd = math.sqrt(float((resid**2).sum()) / (len(x) - 2))
        half = float(sps.t.ppf((1 + level) / 2, len(x) - 2)) * sd / math.sqrt(sxx)
        out |= {"slope_low": slope - half, "slope_high": slope + half, "resid_sd": sd}
        out["lof_p"] = lack_of_fit_p(x, resid)
    return out


def lack_of_fit_p(x: np.ndarray, resid: np.ndarray) -> float:
    """p of the lack-of-fit F-test of a straight line from its residuals: the
    residual sum of squares split into pure error (about each x's own mean, n - k
    degrees of freedom for k distinct x) and lack of fit (the rest, k - 2);
    F = (SS_lof / (k - 2)) / (SS_pe / (n - k)). nan without k >= 3 and n > k."""
    groups = [resid[x == v] for v in np.unique(x)]
    k, n = len(groups), len(x)
    if k < 3 or n <= k:
        return math.nan
    pure = float(sum(((g - g.mean()) ** 2).sum() for g in groups))
    lack = float((resid**2).sum()) - pure
    if pure <= 0:
        return math.nan
    f = (max(lack, 0.0) / (k - 2)) / (pure / (n - k))
    return float(sps.f.sf(f, k - 2, n - k))


def line_at(fit: Mapping[str, float], x0: float, level: float = 0.95) -> tuple[float, float, float]:
    """The fitted line of ``line_fit`` at ``x0``, with the ``level`` t-interval of the
    line there (of the mean, not of a new point): (value, low, high); the interval
    is nan where the fit has none."""
    value = fit["intercept"] + fit["slope"] * x0
    if not math.isfinite(fit.get("resid_sd", math.nan)):
        return value, math.nan, math.nan
    se = fit["resid_sd"] * math.sqrt(1 / fit["n"] + (x0 - fit["x_mean"]) ** 2 / fit["sxx"])
    half = float(sps.t.ppf((1 + level) / 2, fit["n"] - 2)) * se
    return value, value - half, value + half
