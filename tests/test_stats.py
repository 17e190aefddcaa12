"""dvlib.stats: known cases, then simulations where the truth is known (effect found, null p-values
uniform, interval coverage near nominal, variance components recovered), then bad input."""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from dvlib.io import DvlibError
from dvlib.stats import (
    Interval,
    bootstrap_metric,
    holm,
    mean_interval,
    metric_from_confusion,
    paired_bootstrap,
    paired_t,
    per_patient_confusion,
    sign_test,
    variance_components,
)


def clustered(rng, accs, n_patients=150, extra_images=0.67, kappa=10.0, n_classes=3):
    """Test set of patients with 1 + Poisson(extra_images) images each; model j's chance of being
    right on a patient's images is Beta-distributed with mean accs[j] and concentration kappa
    (intra-patient correlation 1 / (1 + kappa)), so the population accuracy is exactly accs[j]."""
    m = 1 + rng.poisson(extra_images, n_patients)
    groups = np.repeat(np.arange(n_patients) * 7 + 3, m)  # ids need not be 0..P-1
    y = rng.integers(0, n_classes, groups.size)
    preds = []
    for acc in accs:
        q = np.repeat(rng.beta(acc * kappa, (1 - acc) * kappa, n_patients), m)
        wrong = (y + rng.integers(1, n_classes, y.size)) % n_classes
        preds.append(np.where(rng.random(y.size) < q, y, wrong))
    return y, preds, groups


def binom_band(n, p=0.05, tail=0.001):
    return st.binom.ppf(tail, n, p), st.binom.ppf(1 - tail, n, p)


# ---------------------------------------------------------------- known cases
def test_metric_from_confusion_matches_sklearn():
    rng = np.random.default_rng(1)
    confs, want_acc, want_bal = [], [], []
    for i in range(20):
        k = int(rng.integers(2, 6))
        y = rng.integers(0, k - (i % 3 == 0), 60)  # every third case: a class absent from the truth
        p = np.where(rng.random(60) < 0.5, y, rng.integers(0, k, 60))
        conf, _ = per_patient_confusion(y, p, np.zeros(60), k)
        c = np.zeros((5, 5), int)
        c[:k, :k] = conf.sum(0)  # padding with empty classes must not change either metric
        confs.append(c)
        want_acc.append(accuracy_score(y, p))
        with warnings.catch_warnings():  # sklearn warns when y_pred has a class absent from y_true
            warnings.simplefilter("ignore")
            want_bal.append(balanced_accuracy_score(y, p))
        assert metric_from_confusion(conf.sum(0), "accuracy") == pytest.approx(want_acc[-1])
    batch = np.stack(confs)
    np.testing.assert_allclose(metric_from_confusion(batch, "accuracy"), want_acc)
    np.testing.assert_allclose(metric_from_confusion(batch, "balanced_accuracy"), want_bal)


def test_per_patient_confusion_counts():
    rng = np.random.default_rng(2)
    y, (p,), g = clustered(rng, [0.7])
    conf, ids = per_patient_confusion(y, p, g, 3)
    np.testing.assert_array_equal(ids, np.unique(g))
    np.testing.assert_array_equal(conf.sum((1, 2)), [np.sum(g == i) for i in ids])
    for i in rng.choice(ids.size, 10):
        sel = g == ids[i]
        np.testing.assert_array_equal(conf[i], np.histogram2d(y[sel], p[sel], bins=[np.arange(4)] * 2)[0])


def test_sign_test_hand_computed():
    diffs = [0.02, 0.01, 0.03, 0.0, 0.05, -0.01, 0.02, 0.0, 0.04, 0.01, 0.06]  # 8 wins, 2 ties, 1 loss
    r = sign_test(diffs)
    assert (r.wins, r.ties, r.losses) == (8, 2, 1)
    assert r.pvalue == pytest.approx(2 * (math.comb(9, 8) + math.comb(9, 9)) / 2**9)
    assert sign_test([0.0, 0.0]).pvalue == 1.0
    assert sign_test([0.004, -0.2], tol=0.005).ties == 1


def test_holm_hand_worked():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    np.testing.assert_allclose(holm([0.2]), [0.2])


def test_mean_interval_matches_scipy():
    x = np.array([0.61, 0.64, 0.58, 0.66, 0.63])
    iv = mean_interval(x, 0.9)
    lo, hi = st.t.interval(0.9, x.size - 1, loc=x.mean(), scale=st.sem(x))
    assert (iv.estimate, iv.n) == (pytest.approx(x.mean()), 5)
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    one = mean_interval([0.7])
    assert one.estimate == 0.7 and math.isnan(one.low) and math.isnan(one.high)
    assert one.fmt() == "70.0"
    assert Interval(0.628, 0.601, 0.654, 3, "t").fmt() == "62.8 [60.1, 65.4]"


def test_paired_t_matches_scipy():
    d = np.array([0.02, -0.01, 0.03, 0.04, 0.0, 0.01])
    r = paired_t(d)
    assert r.pvalue == pytest.approx(st.ttest_1samp(d, 0).pvalue)
    assert (r.low, r.high) == pytest.approx(st.t.interval(0.95, 5, loc=d.mean(), scale=st.sem(d)))
    assert paired_t([0.0, 0.0, 0.0]).pvalue == 1.0


def test_bootstrap_point_estimate_seed_and_speed():
    rng = np.random.default_rng(3)
    y, (p,), g = clustered(rng, [0.7], n_classes=6)
    for metric, ref in (("accuracy", accuracy_score), ("balanced_accuracy", balanced_accuracy_score)):
        iv = bootstrap_metric(y, p, g, 6, metric=metric)
        assert iv.estimate == pytest.approx(ref(y, p)) and iv.low < iv.estimate < iv.high
        assert iv.n == np.unique(g).size
    assert bootstrap_metric(y, p, g, 6, seed=5) == bootstrap_metric(y, p, g, 6, seed=5)
    assert bootstrap_metric(y, p, g, 6, seed=5) != bootstrap_metric(y, p, g, 6, seed=6)
    t0 = time.perf_counter()
    bootstrap_metric(y, p, g, 6, n_boot=2000)
    assert time.perf_counter() - t0 < 1.0  # a few ms in practice; generous for a busy machine


# ---------------------------------------------------------------- simulations with a known truth
def test_paired_bootstrap_finds_known_effect():
    rng = np.random.default_rng(10)
    excludes0 = covers = 0
    for _ in range(50):
        y, (a, b), g = clustered(rng, [0.75, 0.60])
        r = paired_bootstrap(y, a, b, g, 3, n_boot=1000, seed=int(rng.integers(1 << 31)))
        excludes0 += r.low > 0
        covers += r.low <= 0.15 <= r.high
        assert (r.pvalue < 0.05) == (r.low > 0 or r.high < 0) or abs(r.pvalue - 0.05) < 0.01
    assert excludes0 >= 42 and covers >= 42, (excludes0, covers)


def test_null_pvalues_uniform_paired_t():
    rng = np.random.default_rng(11)
    p = np.array([paired_t(rng.normal(0, 0.02, 9)).pvalue for _ in range(200)])
    assert st.kstest(p, "uniform").pvalue > 0.01
    lo, hi = binom_band(200)
    assert lo <= np.sum(p < 0.05) <= hi


def test_null_pvalues_uniform_paired_bootstrap():
    rng = np.random.default_rng(12)
    p = []
    for _ in range(100):
        y, (a, b), g = clustered(rng, [0.7, 0.7])
        p.append(paired_bootstrap(y, a, b, g, 3, n_boot=500, seed=int(rng.integers(1 << 31))).pvalue)
    p = np.array(p)
    assert st.kstest(p, "uniform").pvalue > 0.01
    lo, hi = binom_band(100)
    assert lo <= np.sum(p < 0.05) <= hi


def test_bootstrap_coverage_near_nominal_on_clustered_data():
    # strong clustering (ICC 0.5, ~3 images per patient): resampling images would be too narrow
    rng = np.random.default_rng(13)
    covers, width, naive_width = 0, [], []
    for _ in range(100):
        y, (p,), g = clustered(rng, [0.7], n_patients=100, extra_images=2.0, kappa=1.0)
        seed = int(rng.integers(1 << 31))
        iv = bootstrap_metric(y, p, g, 3, n_boot=1000, seed=seed)
        naive = bootstrap_metric(y, p, np.arange(y.size), 3, n_boot=1000, seed=seed)
        covers += iv.low <= 0.7 <= iv.high
        width.append(iv.high - iv.low)
        naive_width.append(naive.high - naive.low)
    assert 85 <= covers <= 99, covers
    assert np.mean(naive_width) < 0.85 * np.mean(width)


def _components_table(rng, n_splits, n_train, sd_split, sd_train, mean=0.6):
    s, t = np.divmod(np.arange(n_splits * n_train), n_train)
    acc = mean + rng.normal(0, sd_split, n_splits)[s] + rng.normal(0, sd_train, s.size)
    return pd.DataFrame({"split_seed": s, "train_seed": t, "acc": acc})


def test_variance_components_hand_worked():
    df = pd.DataFrame({"split_seed": [0, 0, 1, 1], "train_seed": [0, 1, 0, 1], "v": [1.0, 3.0, 5.0, 7.0]})
    # means 2, 6; grand 4; MSW = 4/2 = 2; MSB = 2*(4+4)/1 = 16; var_split = (16-2)/2 = 7
    r = variance_components(df, "v")
    assert r["var_train"] == pytest.approx(2) and r["var_split"] == pytest.approx(7)
    assert r["share_split"] == pytest.approx(7 / 9) and r["mean"] == pytest.approx(4)
    assert (r["n_splits"], r["n_train_per_split"]) == (2, 2)


@pytest.mark.parametrize("drop", [0.0, 0.3])
@pytest.mark.parametrize("sd_split, sd_train", [(0.02, 0.01), (0.01, 0.02)])
def test_variance_components_recovers_known_variances(drop, sd_split, sd_train):
    rng = np.random.default_rng(14)
    df = _components_table(rng, 1000, 4, sd_split, sd_train)
    if drop:
        df = df.drop(df.index[(rng.random(len(df)) < drop) & (df.train_seed > 0)])  # unbalanced
    r = variance_components(df, "acc")
    # sampling sd of the estimates here (200 simulated tables): <= 12 % (var_split), <= 3 % (var_train)
    assert r["var_split"] == pytest.approx(sd_split**2, rel=0.35)
    assert r["var_train"] == pytest.approx(sd_train**2, rel=0.12)
    assert r["share_split"] == pytest.approx(sd_split**2 / (sd_split**2 + sd_train**2), abs=0.06)
    assert r["mean"] == pytest.approx(0.6, abs=0.005) and r["n_splits"] == 1000


def test_variance_components_no_split_effect_truncates_at_zero():
    rng = np.random.default_rng(15)
    est = [variance_components(_components_table(rng, 5, 3, 0.0, 0.01), "acc") for _ in range(100)]
    vs = np.array([r["var_split"] for r in est])
    assert np.all(vs >= 0) and np.mean(vs == 0) > 0.3  # MSB < MSW about half the time
    assert np.mean([r["var_train"] for r in est]) == pytest.approx(0.01**2, rel=0.15)


# ---------------------------------------------------------------- bad input
Y, P, G = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), np.array([1, 1, 2, 3])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mean_interval([]), "empty"),
        (lambda: mean_interval([0.5, float("nan")]), "non-finite"),
        (lambda: mean_interval([0.5, 0.6], confidence=1.0), "confidence"),
        (lambda: mean_interval([0.5, 0.6], confidence=0), "confidence"),
        (lambda: paired_t([0.1, 0.2], confidence=95), "confidence"),
        (lambda: sign_test([]), "empty"),
        (lambda: holm([]), "empty"),
        (lambda: holm([0.2, 1.5]), "1.5"),
        (lambda: per_patient_confusion([], [], [], 2), "empty"),
        (lambda: per_patient_confusion(Y, P[:3], G, 2), "lengths"),
        (lambda: per_patient_confusion(Y, P, G[:3], 2), "lengths"),
        (lambda: per_patient_confusion(Y, P + 2, G, 2), "outside"),
        (lambda: per_patient_confusion(Y + 0.5, P, G, 2), "integer"),
        (lambda: per_patient_confusion(Y, P, G, 1), "n_classes"),
        (lambda: metric_from_confusion(np.eye(2), "f1"), "f1"),
        (lambda: metric_from_confusion(np.ones((2, 3)), "accuracy"), "shape"),
        (lambda: bootstrap_metric(Y, P, G, 2, metric="auc"), "auc"),
        (lambda: bootstrap_metric(Y, P, G, 2, confidence=-0.1), "confidence"),
        (lambda: bootstrap_metric(Y, P, G, 2, n_boot=0), "n_boot"),
        (lambda: paired_bootstrap(Y, P, P[:3], G, 2), "lengths"),
        (lambda: paired_bootstrap(Y, P, P, G, 2, metric="recall"), "recall"),
        (lambda: paired_bootstrap(Y, P, P, G, 2, confidence=1.5), "confidence"),
        (lambda: variance_components(pd.DataFrame({"split_seed": [0, 1]}), "acc"), "acc"),
        (lambda: variance_components(pd.DataFrame({"split_seed": [0, 0], "train_seed": [0, 0], "a": [1, 2]}), "a"),
         "more than once"),
        (lambda: variance_components(pd.DataFrame({"split_seed": [0, 0], "train_seed": [0, 1], "a": [1, 2]}), "a"),
         "at least 2"),
        (lambda: variance_components(pd.DataFrame({"split_seed": [0, 1], "train_seed": [0, 0], "a": [1, 2]}), "a"),
         "2 or more"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(DvlibError, match=match):
        call()
