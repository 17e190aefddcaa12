"""Classification metrics with scikit-learn's definitions, computed with numpy on the confusion matrix."""
from __future__ import annotations

import numpy as np

from dvlib.io import DvlibError

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc_ovr")


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of one class against the rest (the Mann-Whitney statistic, ties counted half): equal
    to ``sklearn.metrics.roc_auc_score(pos, score)`` up to float rounding."""
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inv.reshape(-1)]  # 1-based, ties averaged
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def compute_metrics(y_true, probs: np.ndarray, classes: list[str]) -> dict:
    """accuracy, balanced accuracy, macro-F1, one-vs-rest AUC (macro over classes present), confusion.

    Plain numpy on the confusion matrix, with scikit-learn's definitions (``accuracy_score``,
    ``balanced_accuracy_score``, ``f1_score(average="macro", labels=range(C), zero_division=0)``,
    ``roc_auc_score`` per class present): the same numbers, without scikit-learn's per-call input
    validation, which cost tens of milliseconds per call and hundreds of calls per protocol.
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs)
    k = len(classes)
    if len(y_true) == 0:
        raise DvlibError("cannot evaluate on an empty test set")
    if probs.shape != (len(y_true), k):
        raise DvlibError(f"probabilities of shape {probs.shape} for {len(y_true)} labels and {k} classes")
    if y_true.min() < 0 or y_true.max() >= k:
        raise DvlibError(f"labels must be class indices 0..{k - 1}, got {sorted(set(y_true.tolist()))[:10]}")
    # a collapsed model (e.g. negative BN variance) outputs NaN: count it, score it as uniform
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        probs = probs.copy()
        probs[bad] = 1.0 / k
    y_pred = probs.argmax(1)
    conf = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)  # rows: true, columns: predicted
    tp = np.diag(conf)
    true_sum, pred_sum = conf.sum(1), conf.sum(0)
    present = true_sum > 0
    recall = tp[present] / true_sum[present]
    denom = true_sum.astype(np.float64) + pred_sum.astype(np.float64)
    f1 = np.where(denom > 0, 2.0 * tp / np.where(denom > 0, denom, 1.0), 0.0)
    aucs = [_binary_auc(y_true == c, probs[:, c]) for c in range(k) if 0 < true_sum[c] < len(y_true)]
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
        "auc_ovr": float(np.mean(aucs)) if aucs else float("nan"),
        "nonfinite_outputs": int(bad.sum()),
        "confusion": conf.tolist(),
    }
