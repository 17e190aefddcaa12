"""compute_metrics on small hand-made examples whose values are worked out by hand."""
from __future__ import annotations

from fractions import Fraction as F
from itertools import product

import numpy as np
import pytest

from dvlib.metrics import compute_metrics


def one_hot(pred, k=3, sure=0.8):
    return np.eye(k)[pred] * (sure - (1 - sure) / (k - 1)) + (1 - sure) / (k - 1)


def test_accuracy_balanced_accuracy_and_macro_f1_differ_on_imbalanced_classes():
    # class 0: 6 images, 5 right, 1 called 1; class 1: 2 images, 1 right, 1 called 0; class 2: 2 images, both called 0
    y = [0] * 6 + [1] * 2 + [2] * 2
    pred = [0, 0, 0, 0, 0, 1] + [1, 0] + [0, 0]
    m = compute_metrics(y, one_hot(pred), ["a", "b", "c"])
    assert m["confusion"] == [[5, 1, 0], [1, 1, 0], [2, 0, 0]]
    assert m["n"] == 10 and m["nonfinite_outputs"] == 0
    assert m["accuracy"] == pytest.approx(float(F(6, 10)), abs=1e-12)
    # recalls 5/6, 1/2, 0
    assert m["balanced_accuracy"] == pytest.approx(float((F(5, 6) + F(1, 2) + 0) / 3), abs=1e-12)
    # F1 = 2 tp / (true + predicted): 10/14, 2/4, 0/2
    assert m["macro_f1"] == pytest.approx(float((F(10, 14) + F(2, 4) + 0) / 3), abs=1e-12)
    assert len({round(m[k], 9) for k in ("accuracy", "balanced_accuracy", "macro_f1")}) == 3


def test_balanced_accuracy_ignores_a_class_absent_from_the_truth():
    # classes 0 and 1 only in the truth: recalls 3/4 and 1/1; class 2 (absent) is predicted once
    y = [0, 0, 0, 0, 1]
    pred = [0, 0, 0, 2, 1]
    m = compute_metrics(y, one_hot(pred), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.8, abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(float((F(3, 4) + 1) / 2), abs=1e-12)


def test_binary_auc_by_hand_with_a_tie():
    # positives score 0.9, 0.6, 0.3; negatives 0.7, 0.3, 0.2. Pairs won by the positive:
    # 0.9: 3; 0.6: 2 (not 0.7); 0.3: 1 (0.2) + 1/2 (the tie) -> 6.5 of 9 = 13/18
    y = np.array([1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.3, 0.7, 0.3, 0.2])
    m = compute_metrics(y, np.stack([1 - s, s], 1), ["neg", "pos"])
    assert m["auc_ovr"] == pytest.approx(13 / 18, abs=1e-12)
    # the same images listed in another order: the same AUC
    order = np.array([3, 0, 5, 2, 4, 1])
    assert compute_metrics(y[order], np.stack([1 - s, s], 1)[order], ["neg", "pos"])["auc_ovr"] == \
        pytest.approx(13 / 18, abs=1e-12)


def test_binary_auc_perfect_and_reversed():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.6, 0.8])
    assert compute_metrics(y, np.stack([1 - s, s], 1), ["neg", "pos"])["auc_ovr"] == 1.0
    assert compute_metrics(1 - y, np.stack([1 - s, s], 1), ["neg", "pos"])["auc_ovr"] == 0.0


def pairs_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """AUC by counting every (positive, negative) pair: a win 1, a tie 1/2."""
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0
               for a, b in product(score[pos], score[~pos]))
    return wins / (pos.sum() * (~pos).sum())


def test_one_vs_rest_auc_is_the_mean_over_classes_present():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 0, 1])  # class 2 never occurs: left out of the mean
    raw = rng.integers(1, 6, (y.size, 4)).astype(float)  # small integers: many ties
    raw[np.arange(y.size), y] += 2  # informative scores: every class's AUC is well above 1/2
    probs = raw / raw.sum(1, keepdims=True)
    m = compute_metrics(y, probs, ["a", "b", "c", "d"])
    ref = np.mean([pairs_auc(y == c, probs[:, c]) for c in (0, 1, 3)])
    assert m["auc_ovr"] == pytest.approx(ref, abs=1e-12)
    assert ref > 0.6  # so a flipped AUC (1 - auc) cannot pass
