"""Statistics over replicate cells (split seed x training seed): intervals, paired t, sign test,
Holm, variance components; and the result types the patient bootstrap returns too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dvlib.io import DvlibError


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval; ``n`` counts the independent units
    (replicates for :func:`mean_interval`, patients for :func:`bootstrap_metric`)."""

    estimate: float
    low: float
    high: float
    n: int
    method: str

    def fmt(self, scale: float = 100, digits: int = 1) -> str:
        """``"62.8 [60.1, 65.4]"``; just the estimate when the interval is undefined (nan)."""
        e, lo, hi = (f"{v * scale:.{digits}f}" for v in (self.estimate, self.low, self.high))
        return e if math.isnan(self.low) or math.isnan(self.high) else f"{e} [{lo}, {hi}]"


@dataclass(frozen=True)
class Comparison:
    """A paired difference A - B with its interval and a two-sided p-value for "no difference"."""

    diff: float
    low: float
    high: float
    pvalue: float
    n: int
    method: str

    def fmt(self, scale: float = 100, digits: int = 1) -> str:
        """``"+3.1 [0.4, 5.9], p=0.021"``."""
        lo, hi = (f"{v * scale:.{digits}f}" for v in (self.low, self.high))
        return f"{self.diff * scale:+.{digits}f} [{lo}, {hi}], p={self.pvalue:.3g}"


@dataclass(frozen=True)
class SignTest:
    """Wins/ties/losses of A over B across cells, exact two-sided binomial p-value (ties dropped)."""

    wins: int
    ties: int
    losses: int
    pvalue: float


# ---------------------------------------------------------------- input checks
def confidence_level(c) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float, np.floating)) or not 0 < c < 1:
        raise DvlibError(f"confidence must be a number in (0, 1), got {c!r}")
    return float(c)


def _values(x, name: str) -> np.ndarray:
    try:
        v = np.asarray(x, dtype=float).ravel()
    except (TypeError, ValueError) as e:
        raise DvlibError(f"{name} must be numbers, got {x!r}") from e
    if v.size == 0:
        raise DvlibError(f"{name} is empty")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise DvlibError(f"{name} contains non-finite values at positions {bad[:5].tolist()}")
    return v


# ---------------------------------------------------------------- replicate-level
def mean_interval(values, confidence: float = 0.95) -> Interval:
    """Mean over replicate cells with a Student-t interval (n=1: low = high = nan)."""
    # scipy is imported where it is used, not above: notebook kernels that make no interval start faster
    from scipy import stats as _st

    c, v = confidence_level(confidence), _values(values, "values")
    m, n = float(v.mean()), v.size
    if n == 1:
        return Interval(m, math.nan, math.nan, 1, "t")
    half = _st.t.ppf(0.5 + c / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return Interval(m, m - half, m + half, n, "t")


def paired_t(diffs, confidence: float = 0.95) -> Comparison:
    """Mean of paired per-cell differences (A - B), t interval and two-sided one-sample t p-value.

    Identical differences (zero spread) give a zero-width interval and p = 1 if they are 0, else 0
    (the t-test's limit); n=1 gives nan interval and p.
    """
    c, d = confidence_level(confidence), _values(diffs, "diffs")
    iv = mean_interval(d, c)
    if d.size == 1:
        p = math.nan
    elif np.all(d == d[0]):
        p = 1.0 if d[0] == 0 else 0.0
    else:
        from scipy import stats as _st

        p = float(_st.ttest_1samp(d, 0.0).pvalue)
    return Comparison(iv.estimate, iv.low, iv.high, p, d.size, "paired t")


def sign_test(diffs, tol: float = 0.0) -> SignTest:
    """"A beats B in k of n cells": counts d > tol, |d| <= tol, d < -tol; exact binomial(n, 1/2)."""
    d = _values(diffs, "diffs")
    wins, losses = int(np.sum(d > tol)), int(np.sum(d < -tol))
    ties = d.size - wins - losses
    from scipy import stats as _st

    p = float(_st.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return SignTest(wins, ties, losses, p)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order (family-wise error control)."""
    p = _values(pvalues, "pvalues")
    if np.any((p < 0) | (p > 1)):
        raise DvlibError(f"pvalues must lie in [0, 1], got {p[(p < 0) | (p > 1)][0]!r}")
    order = np.argsort(p, kind="stable")
    adj = np.maximum.accumulate(p[order] * (p.size - np.arange(p.size)))
    out = np.empty_like(p)
    out[order] = np.minimum(adj, 1.0)
    return out


def variance_components(df, value: str, split: str = "split_seed", train: str = "train_seed") -> dict:
    """Between-split vs within-split (training-seed) variance of ``value``, one row per cell.

    One-way random-effects ANOVA (method-of-moments) estimator, unbalanced form:
    var_train = MSW, var_split = max(0, (MSB - MSW) / n0), n0 = (N - sum n_i^2 / N) / (a - 1).
    ``n_train_per_split`` is n0 (the common count when balanced); ``mean`` is the mean over all cells.
    """
    for col in (value, split, train):
        if col not in df.columns:
            raise DvlibError(f"column {col!r} not in table (columns: {list(df.columns)})")
    dup = df.duplicated([split, train])
    if dup.any():
        row = df.loc[dup, [split, train]].iloc[0].tolist()
        raise DvlibError(f"cell ({split}, {train}) = {row} appears more than once; pass one row per cell")
    y = _values(df[value], value)
    g = df[split].to_numpy()
    _, inv, n_i = np.unique(g, return_inverse=True, return_counts=True)
    a, N = n_i.size, y.size
    if a < 2:
        raise DvlibError(f"need at least 2 values of {split!r}, got {a}")
    if N == a:
        raise DvlibError(f"need at least one {split!r} with 2 or more {train!r} values")
    means = np.bincount(inv, weights=y) / n_i
    msw = float(np.sum((y - means[inv]) ** 2) / (N - a))
    msb = float(np.sum(n_i * (means - y.mean()) ** 2) / (a - 1))
    n0 = (N - np.sum(n_i**2) / N) / (a - 1)
    var_split = max(0.0, (msb - msw) / n0)
    total = var_split + msw
    return {
        "var_split": var_split,
        "var_train": msw,
        "share_split": var_split / total if total > 0 else math.nan,
        "n_splits": int(a),
        "n_train_per_split": float(n0),
        "mean": float(y.mean()),
    }
