"""Statistics behind the report's claims: intervals, paired comparisons, variance components.

Every comparison is between models evaluated on the *same* test images, so comparisons are paired.
Replicates are (split_seed, train_seed) cells; test images belong to patients, so resampling within a
test set is by patient (cluster bootstrap), never by image. Pure numpy/scipy; errors raise DvlibError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dvlib.io import DvlibError

METRICS = ("accuracy", "balanced_accuracy")


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
def _confidence(c) -> float:
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


def _labels(y, name: str, n_classes: int) -> np.ndarray:
    v = np.asarray(y).ravel()
    if v.size == 0:
        raise DvlibError(f"{name} is empty")
    if v.dtype.kind not in "iub" and not (v.dtype.kind == "f" and np.all(v == np.round(v))):
        raise DvlibError(f"{name} must hold integer class labels, got dtype {v.dtype}")
    bad = (v < 0) | (v >= n_classes)
    if bad.any():
        raise DvlibError(f"{name} has label {v[bad][0]!r} outside [0, {n_classes})")
    return v.astype(np.int64)


def _metric(metric: str) -> str:
    if metric not in METRICS:
        raise DvlibError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return metric


def _n_boot(n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise DvlibError(f"n_boot must be a positive integer, got {n_boot!r}")
    return int(n_boot)


# ---------------------------------------------------------------- replicate-level
def mean_interval(values, confidence: float = 0.95) -> Interval:
    """Mean over replicate cells with a Student-t interval (n=1: low = high = nan)."""
    # scipy is imported where it is used, not above: notebook kernels that make no interval start faster
    from scipy import stats as _st

    c, v = _confidence(confidence), _values(values, "values")
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
    c, d = _confidence(confidence), _values(diffs, "diffs")
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


# ---------------------------------------------------------------- image-level, patient clusters
def per_patient_confusion(y_true, y_pred, groups, n_classes: int):
    """Counts ``conf[p, true, pred]`` per patient (shape [P, K, K]) and the sorted patient ids [P]."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise DvlibError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    t, p = _labels(y_true, "y_true", n_classes), _labels(y_pred, "y_pred", n_classes)
    g = np.asarray(groups).ravel()
    if not t.size == p.size == g.size:
        raise DvlibError(f"lengths differ: y_true {t.size}, y_pred {p.size}, groups {g.size}")
    ids, inv = np.unique(g, return_inverse=True)
    conf = np.zeros((ids.size, n_classes, n_classes), dtype=np.int64)
    np.add.at(conf, (inv, t, p), 1)
    return conf, ids


def metric_from_confusion(conf, metric: str = "accuracy"):
    """Metric of a confusion matrix [K, K] (rows = truth) or of each in a batch [B, K, K].

    balanced_accuracy is the mean recall over classes present in the truth (as scikit-learn).
    """
    _metric(metric)
    c = np.asarray(conf, dtype=float)
    if c.ndim < 2 or c.shape[-1] != c.shape[-2]:
        raise DvlibError(f"confusion must have shape [..., K, K], got {c.shape}")
    diag, rows = np.diagonal(c, axis1=-2, axis2=-1), c.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            out = diag.sum(-1) / rows.sum(-1)
        else:
            present = rows > 0
            out = np.where(present, diag / np.where(present, rows, 1), 0).sum(-1) / present.sum(-1)
    return out if out.ndim else float(out)


def _boot_counts(P: int, n_boot: int, seed) -> np.ndarray:
    """Multinomial(P, uniform) patient counts [n_boot, P]: a patient bootstrap, drawn as indices
    and bincounted (same distribution as ``rng.multinomial``, ~6x faster)."""
    idx = np.random.default_rng(seed).integers(0, P, size=(n_boot, P))
    idx += np.arange(n_boot)[:, None] * P
    return np.bincount(idx.ravel(), minlength=n_boot * P).reshape(n_boot, P).astype(float)


def _boot_metric(counts, conf, metric):
    P, K, _ = conf.shape
    return metric_from_confusion((counts @ conf.reshape(P, K * K)).reshape(-1, K, K), metric)


def bootstrap_metric(y_true, y_pred, groups, n_classes, metric="accuracy", n_boot=2000, seed=0,
                     confidence=0.95) -> Interval:
    """Metric on the full test set with a patient-level (cluster) percentile bootstrap interval."""
    c, metric, n_boot = _confidence(confidence), _metric(metric), _n_boot(n_boot)
    conf, ids = per_patient_confusion(y_true, y_pred, groups, n_classes)
    boot = _boot_metric(_boot_counts(ids.size, n_boot, seed), conf, metric)
    lo, hi = np.quantile(boot, [0.5 - c / 2, 0.5 + c / 2])
    est = metric_from_confusion(conf.sum(0), metric)
    return Interval(est, float(lo), float(hi), ids.size, "patient bootstrap, percentile")


def paired_bootstrap(y_true, pred_a, pred_b, groups, n_classes, metric="accuracy", n_boot=2000, seed=0,
                     confidence=0.95) -> Comparison:
    """Difference metric(A) - metric(B) on the same images; both scored on the same resampled patients.

    Interval: percentile. p-value: the percentile interval inverted,
    p = min(1, 2 * min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (n_boot + 1)), i.e. about the smallest alpha
    whose (1 - alpha) interval excludes 0, so p and interval agree; +1 keeps p > 0, and resamples
    with d* == 0 count on both sides (conservative for discrete metrics).
    """
    c, metric, n_boot = _confidence(confidence), _metric(metric), _n_boot(n_boot)
    na, nb = np.asarray(pred_a).size, np.asarray(pred_b).size
    if na != nb:
        raise DvlibError(f"lengths differ: pred_a {na}, pred_b {nb}")
    conf_a, ids = per_patient_confusion(y_true, pred_a, groups, n_classes)
    conf_b, _ = per_patient_confusion(y_true, pred_b, groups, n_classes)
    counts = _boot_counts(ids.size, n_boot, seed)
    d = _boot_metric(counts, conf_a, metric) - _boot_metric(counts, conf_b, metric)
    lo, hi = np.quantile(d, [0.5 - c / 2, 0.5 + c / 2])
    p = min(1.0, 2 * min(1 + np.sum(d <= 0), 1 + np.sum(d >= 0)) / (n_boot + 1))
    diff = metric_from_confusion(conf_a.sum(0), metric) - metric_from_confusion(conf_b.sum(0), metric)
    return Comparison(float(diff), float(lo), float(hi), float(p), ids.size, "paired patient bootstrap")


def paired_bootstrap_replicates(sets, n_classes, metric="accuracy", n_boot=2000, seed=0,
                                confidence=0.95) -> Comparison:
    """Mean over replicates of metric(A) - mean_j metric(B_j), each replicate's patients resampled
    on their own. ``sets``: one (y_true, pred_a, [pred_b, ...], groups) per replicate, the B's being
    several models to average (e.g. every hospital's own model). The interval is the test-set
    sampling noise of the mean difference for these trained models (training noise is not in it:
    see :func:`paired_t` over replicates for that)."""
    c, metric, n_boot = _confidence(confidence), _metric(metric), _n_boot(n_boot)
    if not sets:
        raise DvlibError("paired_bootstrap_replicates: no replicates given")
    boot, est, patients = np.zeros(n_boot), 0.0, 0
    for i, (y, a, bs, g) in enumerate(sets):
        bs = [bs] if np.asarray(bs).ndim == 1 else list(bs)
        conf_a, ids = per_patient_confusion(y, a, g, n_classes)
        confs_b = [per_patient_confusion(y, b, g, n_classes)[0] for b in bs]
        counts = _boot_counts(ids.size, n_boot, np.random.SeedSequence([int(seed), i]))
        boot += _boot_metric(counts, conf_a, metric) - np.mean([_boot_metric(counts, cb, metric) for cb in confs_b], 0)
        est += metric_from_confusion(conf_a.sum(0), metric) - np.mean([metric_from_confusion(cb.sum(0), metric)
                                                                       for cb in confs_b])
        patients += ids.size
    boot, est = boot / len(sets), est / len(sets)
    lo, hi = np.quantile(boot, [0.5 - c / 2, 0.5 + c / 2])
    p = min(1.0, 2 * min(1 + np.sum(boot <= 0), 1 + np.sum(boot >= 0)) / (n_boot + 1))
    return Comparison(float(est), float(lo), float(hi), float(p), patients, "paired patient bootstrap over replicates")
