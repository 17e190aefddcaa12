"""make_split holds out the share of each hospital's patients that ``test_frac`` asks for."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dvlib.data.base import DatasetIndex
from dvlib.split import make_split

CLASSES = ["a", "b", "c"]
FRACS = (0.1, 0.2, 0.3, 0.5)


def even_index(n_patients: int = 300, images_per_patient: int = 2) -> DatasetIndex:
    """Every patient has the same number of images and one label: the image share equals the patient share."""
    rows = [{"image": f"p{p}_{k}", "patient": f"P{p}", "label": CLASSES[p % 3], "path": ""}
            for p in range(n_patients) for k in range(images_per_patient)]
    return DatasetIndex("even", CLASSES, pd.DataFrame(rows))


def expected_share(test_frac: float) -> float:
    # patients go to round(1 / test_frac) near-equal folds and one fold is held out (0.3 -> 1/3)
    return 1.0 / max(2, round(1.0 / test_frac))


def test_each_hospital_holds_out_test_frac_of_its_patients():
    index = even_index()
    shares = {}
    for frac in FRACS:
        m = make_split(index, n_hospitals=3, test_frac=frac, seed=1)
        for h, part in m.groupby("hospital"):
            test = part[part["subset"] == "test"]
            train = part[part["subset"] == "train"]
            assert not set(test["patient"]) & set(train["patient"]), (frac, h)  # patient-disjoint
            by_patients = test["patient"].nunique() / part["patient"].nunique()
            assert abs(by_patients - expected_share(frac)) <= 0.02, (frac, h, by_patients)
            assert len(test) / len(part) == by_patients  # two images per patient, always together
            shares.setdefault(frac, []).append(by_patients)
    means = [np.mean(shares[f]) for f in FRACS]
    assert means == sorted(means) and means[0] < 0.13 and means[-1] > 0.47, means


def test_shared_design_holds_out_test_frac_of_all_patients():
    # the test patients are drawn from the pool, so only the pooled share is fixed (a hospital's varies)
    index = even_index()
    for frac in FRACS:
        m = make_split(index, n_hospitals=3, test_frac=frac, seed=1, test_design="shared")
        test = m["subset"] == "test"
        assert not set(m.loc[test, "patient"]) & set(m.loc[~test, "patient"])
        assert abs(m.loc[test, "patient"].nunique() / m["patient"].nunique() - expected_share(frac)) <= 0.02, frac
        assert abs(test.mean() - expected_share(frac)) <= 0.02, frac


def test_held_out_share_with_uneven_patients():
    # 1-4 images per patient, mixed labels: shares by patients and by images both follow test_frac
    rng = np.random.default_rng(3)
    rows = []
    for p in range(480):
        for k in range(int(rng.integers(1, 5))):
            rows.append({"image": f"p{p}_{k}", "patient": f"P{p}", "label": CLASSES[int(rng.integers(3))], "path": ""})
    index = DatasetIndex("uneven", CLASSES, pd.DataFrame(rows))
    for frac in FRACS:
        m = make_split(index, n_hospitals=2, test_frac=frac, seed=4)
        for h, part in m.groupby("hospital"):
            test = part["subset"] == "test"
            assert not set(part.loc[test, "patient"]) & set(part.loc[~test, "patient"])
            by_patients = part.loc[test, "patient"].nunique() / part["patient"].nunique()
            assert abs(by_patients - expected_share(frac)) <= 0.03, (frac, h, by_patients)
            assert abs(test.mean() - expected_share(frac)) <= 0.06, (frac, h, test.mean())
