"""dvlib.studies.privacy.attack: ROC numbers against scikit-learn and hand-built cases, attacks on a model that
memorised its training set and on one that saw nothing, bootstrap interval coverage; and the privacy
budget's limits (dvlib.privacy_budget)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from dvlib.io import DvlibError
from dvlib.studies.privacy.attack import (audit, audit_rows, loss_attack, per_example_loss, reference_attack, roc_auc, roc_curve,
                           tpr_at_fpr)


def test_roc_auc_matches_sklearn_with_ties():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n in (7, 50, 301):
        m = rng.random(n) < 0.4
        m[:2] = [True, False]
        s = rng.integers(0, 6, n) + m  # few distinct values: many ties, some between the two sets
        assert roc_auc(s, m) == pytest.approx(sk.roc_auc_score(m, s), abs=1e-12)
        fpr, tpr, _ = roc_curve(s, m)
        f2, t2, _ = sk.roc_curve(m, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, f2)
        np.testing.assert_allclose(tpr, t2)


def test_tpr_at_fpr_hand_built():
    # members 5,4,3,1 ; non-members 4.5,2,0,0 (descending: M N M M N M N N)
    s = np.array([5, 4, 3, 1, 4.5, 2, 0, 0])
    m = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert tpr_at_fpr(s, m, 0.01) == 0.25  # only "score >= 5" has FPR 0
    assert tpr_at_fpr(s, m, 0.25) == 0.75  # "score >= 3": 3 of 4 members, 1 of 4 non-members
    assert tpr_at_fpr(s, m, 0.5) == 1.0
    assert roc_auc(s, m) == 12 / 16  # member-beats-non-member pairs: 4 + 3 + 3 + 2
    # all scores tied: the curve is the diagonal in one step, AUC 0.5, no threshold with FPR < 1
    assert roc_auc(np.zeros(8), m) == 0.5 and tpr_at_fpr(np.zeros(8), m, 0.1) == 0.0


def test_per_example_loss_and_attacks():
    p = np.array([[0.7, 0.3], [0.0, 1.0], [1.0, 0.0]])
    loss = per_example_loss(p, np.array([0, 1, 1]))
    np.testing.assert_allclose(loss[:2], [-math.log(0.7), 0.0], atol=1e-12)
    assert np.isfinite(loss[2]) and loss[2] > 20  # log 0 clipped
    np.testing.assert_array_equal(loss_attack(loss), -loss)
    np.testing.assert_array_equal(reference_attack(loss, loss + 1), np.ones(3))


def _images(g: torch.Generator, n: int):
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 10, (n,), generator=g)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(108, 64), nn.ReLU(), nn.Linear(64, 10))


def _loss(net, x, y) -> np.ndarray:
    with torch.no_grad():
        return per_example_loss(net(x).softmax(-1).double().numpy(), y.numpy())


@pytest.fixture(scope="module")
def memorised():
    """An MLP trained to ~zero loss on 40 random-label images (10 classes: a held-out image gets its
    random label right by chance 10% of the time); 40 held-out images of the same kind."""
    g = torch.Generator().manual_seed(0)
    (xm, ym), (xn, yn) = _images(g, 40), _images(g, 40)
    pre, net = _net(1), _net(1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xm), ym)
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2
    is_member = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    x, y = torch.cat([xm, xn]), torch.cat([ym, yn])
    return pre, net, x, y, is_member


def test_attacks_detect_memorisation(memorised):
    pre, net, x, y, m = memorised
    loss, ref = _loss(net, x, y), _loss(pre, x, y)
    for scores in (loss_attack(loss), reference_attack(loss, ref)):
        a = audit(scores, m, n_boot=300)
        assert a.auc > 0.9 and a.auc_low > 0.8
        assert a.tpr[0.01][0] > 0.2  # with 40 non-members FPR <= 1% means no false positive at all


def test_attacks_on_models_that_saw_nothing_are_chance(memorised):
    pre, _, x, y, m = memorised
    loss = _loss(pre, x, y)
    a = audit(reference_attack(loss, loss), m, n_boot=300)  # the model as its own reference: no signal
    assert (a.auc, a.auc_low, a.auc_high) == (0.5, 0.5, 0.5)
    a = audit(loss_attack(loss), m, n_boot=300)  # never saw either set
    assert a.auc_low <= 0.5 <= a.auc_high and abs(a.auc - 0.5) < 0.2


def test_bootstrap_intervals_cover_the_true_auc():
    rng = np.random.default_rng(1)
    delta = 1.0
    true_auc = 0.5 * (1 + math.erf(delta / math.sqrt(2) / math.sqrt(2)))  # Phi(delta / sqrt 2)
    m = np.r_[np.ones(80, bool), np.zeros(120, bool)]
    covered = 0
    for i in range(50):
        s = rng.normal(0, 1, m.size) + delta * m
        a = audit(s, m, n_boot=400, seed=i)
        covered += a.auc_low <= true_auc <= a.auc_high
        assert a.n_members == 80 and a.n_nonmembers == 120
    assert covered >= 42  # nominal 95%: P(fewer than 42 of 50) < 0.1%


def test_group_bootstrap_does_not_count_copies_as_evidence():
    rng = np.random.default_rng(2)
    m = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    s = rng.normal(0, 1, 120) + 0.8 * m
    one = audit(s, m, n_boot=500)
    # every patient photographed 5 times with (nearly) the same score
    s5, m5, g5 = np.repeat(s, 5) + rng.normal(0, 1e-6, 600), np.repeat(m, 5), np.repeat(np.arange(120), 5)
    naive, grouped = audit(s5, m5, n_boot=500), audit(s5, m5, groups=g5, n_boot=500)
    width = lambda a: a.auc_high - a.auc_low  # noqa: E731
    assert width(naive) < 0.6 * width(one)  # images treated as independent: falsely precise
    assert width(grouped) == pytest.approx(width(one), rel=0.25)
    assert (grouped.member_groups, grouped.nonmember_groups, grouped.n_members) == (60, 60, 300)


def test_audit_rows_are_tidy():
    rng = np.random.default_rng(3)
    m = rng.random(200) < 0.5
    a = audit(rng.normal(size=200) + m, m, n_boot=50)
    rows = audit_rows({("hospital_0", "loss"): a, ("merged", "reference"): a})
    assert [r["model"] for r in rows] == ["hospital_0", "merged"]
    r = rows[0]
    for k in ("auc", "auc_low", "auc_high", "tpr@1%", "tpr@1%_low", "tpr@1%_high", "tpr@0.1%_high",
              "n_members", "n_nonmembers", "min_fpr"):
        assert k in r
    assert r["auc_low"] <= r["auc"] <= r["auc_high"] and r["n_members"] + r["n_nonmembers"] == 200


@pytest.mark.parametrize("call, match", [
    (lambda: roc_auc([1, 2, 3], [1, 0]), "is_member"),
    (lambda: roc_auc([1, 2, 3], [1, 1, 1]), "members and non-members"),
    (lambda: roc_auc([1, np.nan], [1, 0]), "non-finite"),
    (lambda: roc_auc([1, 2], [2, 0]), "boolean or 0/1"),
    (lambda: tpr_at_fpr([1, 2], [1, 0], 1.5), "1.5"),
    (lambda: audit([1, 2, 3], [1, 0, 1], groups=[1, 2]), "groups"),
    (lambda: audit([1, 2, 3], [1, 0, 1], n_boot=1), "n_boot"),
    (lambda: per_example_loss(np.ones((2, 3)) / 3, np.array([0, 3])), "0..2"),
    (lambda: per_example_loss(np.ones((2, 3)) / 3, np.array([0])), "shape"),
    (lambda: reference_attack([1, 2], [1]), "shape"),
])
def test_bad_input_names_the_value(call, match):
    with pytest.raises(DvlibError, match=match):
        call()


# --- the privacy budget notebook 08 may be given (dvlib.privacy_budget) ---------------------------------------

@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 0, 0.0, -1.0, True, "1"])
def test_epsilon_must_be_finite_and_positive(value):
    from dvlib.privacy_budget import check_epsilon

    with pytest.raises(DvlibError, match=rf"^--epsilons must be a finite number > 0, got {re.escape(repr(value))}$"):
        check_epsilon(value, "--epsilons")


def test_delta_is_refused_at_the_factor_over_n_and_at_one():
    from dvlib.privacy_budget import DELTA_FACTOR, check_delta, check_epsilon, resolve_delta, weak_delta

    assert check_epsilon(0.5) == 0.5 and DELTA_FACTOR == 2.0
    n = 40
    for bad in (1.0, 0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(DvlibError, match=r"delta must be a finite number in \(0, 1\), got"):
            check_delta(bad)
    with pytest.raises(DvlibError, match=r"delta 0\.05 is at least 2/n = 0\.05 for hospital 3 \(n = 40 training"):
        check_delta(2 / n, n, where=" for hospital 3")
    assert check_delta(np.nextafter(2 / n, 0), n) < 2 / n and check_delta(0.9) == 0.9  # no n: (0, 1) only
    assert resolve_delta(None, n) == 1 / n and resolve_delta(1e-5, n) == 1e-5
    with pytest.raises(DvlibError, match="at least 2/n"):
        resolve_delta(0.5, n)
    # the default 1/n is weak, whatever floating point makes of 1/n * n (1/49 * 49 < 1)
    assert all(weak_delta(1 / k, k) for k in range(1, 500)) and not weak_delta(1e-5, 49)


def test_n_boot_has_a_minimum_that_the_audit_shares():
    from dvlib.privacy_budget import MIN_BOOT, check_n_boot

    for bad in (MIN_BOOT - 1, 0, -5, 10.0, True):
        with pytest.raises(DvlibError, match=rf"n_boot must be an integer >= {MIN_BOOT}, got {re.escape(repr(bad))}"):
            check_n_boot(bad)
    with pytest.raises(DvlibError, match=f"n_boot must be an integer >= {MIN_BOOT}"):
        audit([1, 2, 3, 4], [1, 0, 1, 0], n_boot=MIN_BOOT - 1)
    assert audit([1, 2, 3, 4], [1, 0, 1, 0], n_boot=MIN_BOOT).n_boot == MIN_BOOT == check_n_boot(np.int64(MIN_BOOT))
