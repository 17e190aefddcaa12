"""The paired bootstraps resample patients, never single images.

Each patient's images are all right or all wrong for a model, so a patient is one unit of evidence:
resampling its images one by one would shrink the interval about sqrt(images per patient) times and
would reach differences that whole patients cannot give.
"""
from __future__ import annotations

import numpy as np
import pytest

from dvlib.stats import paired_bootstrap, paired_bootstrap_replicates

N_CLASSES = 3


def clustered_pair(seed: int, n_patients: int = 40, images: int = 8):
    """(y, pred_a, pred_b, groups): model A right on all images of a random half of the patients, B on
    another random half, wrong on all images of the others; patient ids are not 0..P-1."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients) * 5 + 11, images)
    y = rng.integers(0, N_CLASSES, groups.size)
    wrong = (y + 1) % N_CLASSES
    right_a = np.repeat(rng.permutation(n_patients) < n_patients // 2, images)
    right_b = np.repeat(rng.permutation(n_patients) < n_patients // 2, images)
    return y, np.where(right_a, y, wrong), np.where(right_b, y, wrong), groups


def numpy_width(d: np.ndarray, n_boot: int = 4000, seed: int = 99) -> float:
    """Width of the 95 % percentile interval of the mean of ``d``, its entries resampled i.i.d."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (n_boot, d.size))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(hi - lo)


def per_patient_diff(y, a, b, groups):
    """Each patient's accuracy difference (equal image counts: their mean is the overall difference)."""
    d = (a == y).astype(float) - (b == y)
    return np.array([d[groups == g].mean() for g in np.unique(groups)]), d


def test_paired_bootstrap_interval_has_patient_width():
    y, a, b, g = clustered_pair(0)
    d_patient, d_image = per_patient_diff(y, a, b, g)
    assert set(np.unique(d_patient)) <= {-1.0, 0.0, 1.0}
    r = paired_bootstrap(y, a, b, g, N_CLASSES, n_boot=4000, seed=1)
    assert r.diff == pytest.approx(d_image.mean(), abs=1e-12)
    width = r.high - r.low
    patient_ref, image_ref = numpy_width(d_patient), numpy_width(d_image)
    assert abs(width - patient_ref) <= 0.2 * patient_ref, (width, patient_ref)
    assert width > 2.0 * image_ref, (width, image_ref)  # sqrt(8) = 2.8 times in expectation


def test_paired_bootstrap_reaches_only_whole_patient_differences():
    # 10 patients of 6 images: a resample of whole patients has a difference k/10, of images k/60.
    # n_boot = 401 puts the 2.5 % and 97.5 % quantiles on resamples 10 and 390, no interpolation.
    for seed in range(5):
        y, a, b, g = clustered_pair(seed, n_patients=10, images=6)
        r = paired_bootstrap(y, a, b, g, N_CLASSES, n_boot=401, seed=seed)
        for end in (r.low, r.high):
            assert abs(end * 10 - round(end * 10)) < 1e-9, (seed, r)


def test_paired_bootstrap_counts_patients():
    y, a, b, g = clustered_pair(0)
    assert paired_bootstrap(y, a, b, g, N_CLASSES, n_boot=50).n == 40


def test_replicates_interval_has_patient_width():
    reps = [clustered_pair(s) for s in (3, 4)]
    sets = [(y, a, [b], g) for y, a, b, g in reps]
    r = paired_bootstrap_replicates(sets, N_CLASSES, n_boot=4000, seed=2)
    diffs = [per_patient_diff(*rep) for rep in reps]
    assert r.diff == pytest.approx(np.mean([d_image.mean() for _, d_image in diffs]), abs=1e-12)
    # the mean over two replicates resampled apart: the sum of two independent resamples, halved
    rng = np.random.default_rng(7)

    def boot_mean(values, n_boot=4000):
        return values[rng.integers(0, values.size, (n_boot, values.size))].mean(1)

    patient = (boot_mean(diffs[0][0]) + boot_mean(diffs[1][0])) / 2
    image = (boot_mean(diffs[0][1]) + boot_mean(diffs[1][1])) / 2
    patient_ref = float(np.subtract(*np.quantile(patient, [0.975, 0.025])))
    image_ref = float(np.subtract(*np.quantile(image, [0.975, 0.025])))
    width = r.high - r.low
    assert abs(width - patient_ref) <= 0.2 * patient_ref, (width, patient_ref)
    assert width > 2.0 * image_ref, (width, image_ref)


def test_replicates_reach_only_whole_patient_differences():
    # two replicates of 10 patients x 6 images: a whole-patient resample's mean difference is k/20
    for seed in range(5):
        reps = [clustered_pair(10 * seed + i, n_patients=10, images=6) for i in range(2)]
        r = paired_bootstrap_replicates([(y, a, [b], g) for y, a, b, g in reps], N_CLASSES, n_boot=401, seed=seed)
        for end in (r.low, r.high):
            assert abs(end * 20 - round(end * 20)) < 1e-9, (seed, r)


def test_replicates_count_patients():
    reps = [clustered_pair(s) for s in (3, 4)]
    sets = [(y, a, [b], g) for y, a, b, g in reps]
    assert paired_bootstrap_replicates(sets, N_CLASSES, n_boot=50).n == 80
