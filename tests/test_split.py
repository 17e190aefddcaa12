"""Hospital splits: patient-disjoint, stratified, near-equal, reproducible; manifests round-trip."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvlib.data.base import DatasetIndex
from dvlib.io import DvlibError
from dvlib.split import load_manifest, make_split, save_manifest, shard_table, validate_manifest

CLASSES = ["a", "b", "c"]


def fake_index(n_patients: int, seed: int, class_probs=(0.5, 0.3, 0.2), mixed: bool = False) -> DatasetIndex:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = rng.choice(CLASSES, p=class_probs)
        for k in range(int(rng.integers(1, 4))):
            lab = rng.choice(CLASSES) if (mixed and k) else label
            rows.append({"image": f"p{p}_{k}", "patient": f"P{p}", "label": lab, "path": ""})
    return DatasetIndex("fake", CLASSES, pd.DataFrame(rows))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_patients=st.integers(80, 300), n_hospitals=st.integers(2, 5), seed=st.integers(0, 10_000),
       mixed=st.booleans())
def test_iid_split_properties(n_patients, n_hospitals, seed, mixed):
    index = fake_index(n_patients, seed, mixed=mixed)
    m = make_split(index, n_hospitals=n_hospitals, seed=seed, allow_missing_classes=True)
    # every image exactly once
    assert sorted(m["image"]) == sorted(index.records["image"])
    # patient-disjoint across hospitals and across train/test
    spans = m.groupby("patient")[["hospital", "subset"]].nunique()
    assert (spans == 1).all().all()
    assert set(m["hospital"]) == set(range(1, n_hospitals + 1))  # numbered 1..N, the paper's Part Index
    # near-equal shards (in images; patients have 1-3 images each) and label-stratified
    size = m.groupby("hospital").size()
    assert size.max() - size.min() <= max(8, 0.25 * size.mean())
    glob = m["label"].value_counts(normalize=True)
    for _, g in m.groupby("hospital"):
        frac = g["label"].value_counts(normalize=True).reindex(CLASSES, fill_value=0)
        assert (frac - glob.reindex(CLASSES)).abs().max() < 0.15
    # each hospital holds out roughly 20 % of its patients for testing
    for _, g in m.groupby("hospital"):
        test_pat = g[g.subset == "test"]["patient"].nunique() / g["patient"].nunique()
        assert 0.08 < test_pat < 0.35


def test_split_is_reproducible_and_seed_dependent():
    index = fake_index(120, 0)
    a = make_split(index, 4, seed=3)
    b = make_split(index, 4, seed=3)
    c = make_split(index, 4, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_dirichlet_split_is_skewed_but_patient_disjoint():
    index = fake_index(400, 1, class_probs=(1 / 3, 1 / 3, 1 / 3))
    m = make_split(index, 4, scheme="dirichlet", alpha=0.3, seed=0, allow_missing_classes=True)
    assert (m.groupby("patient")[["hospital", "subset"]].nunique() == 1).all().all()
    frac = pd.crosstab(m["hospital"], m["label"], normalize="index")
    assert frac.max().max() > 0.5  # strong label skew at some hospital


def test_manifest_round_trip(tmp_path):
    index = fake_index(100, 2)
    m = make_split(index, 4, seed=0)
    path = save_manifest(m, tmp_path / "run" / "manifest.csv")
    back = load_manifest(path, CLASSES)
    pd.testing.assert_frame_equal(m.reset_index(drop=True), back[m.columns])
    assert list(pd.read_csv(path).columns) == ["image", "patient", "label", "hospital", "subset"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["manifest.csv"]  # no temp file left


def test_more_hospitals_than_patients():
    with pytest.raises(DvlibError, match="more hospitals than patients"):
        make_split(fake_index(3, 0), n_hospitals=5)


def test_class_absent_from_a_hospital_is_an_error():
    rows = [{"image": f"i{i}", "patient": f"P{i}", "label": "a" if i < 40 else "b", "path": ""} for i in range(80)]
    rows.append({"image": "rare", "patient": "Prare", "label": "c", "path": ""})
    index = DatasetIndex("fake", CLASSES, pd.DataFrame(rows))
    with pytest.raises(DvlibError, match=r"has no training images of class\(es\) \['c'\]"):
        make_split(index, n_hospitals=2, seed=0)


def test_tiny_data_gives_a_clear_error_not_a_sklearn_traceback():
    rows = [{"image": f"i{i}", "patient": f"P{i}", "label": CLASSES[i % 3], "path": ""} for i in range(9)]
    index = DatasetIndex("fake", CLASSES, pd.DataFrame(rows))
    with pytest.raises(DvlibError):
        make_split(index, n_hospitals=4, seed=0)


def test_leaky_manifest_is_rejected(tmp_path):
    m = make_split(fake_index(60, 0), 2, seed=0)
    victim = m.index[m["subset"] == "test"][0]
    other = m[(m["subset"] == "train")].iloc[0]
    m.loc[victim, "patient"] = other["patient"]
    with pytest.raises(DvlibError, match="patient-disjoint"):
        validate_manifest(m, CLASSES)
    m.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DvlibError, match="bad.csv"):
        load_manifest(tmp_path / "bad.csv")


def test_bad_scheme_and_fraction():
    index = fake_index(50, 0)
    with pytest.raises(DvlibError, match="unknown split scheme 'random'; valid: iid, dirichlet"):
        make_split(index, 2, scheme="random")
    with pytest.raises(DvlibError, match="test_frac"):
        make_split(index, 2, test_frac=1.5)


def test_shard_table_counts_everything():
    m = make_split(fake_index(100, 5), 4, seed=1)
    t = shard_table(m, CLASSES)
    assert t[CLASSES].to_numpy().sum() == len(m)
    assert t["patients"].sum() == m["patient"].nunique()


@pytest.mark.parametrize("allow_missing, alpha", [(True, 0.1), (False, 1.0)])
def test_unusable_splits_are_refused_naming_the_hospital_and_the_seed(allow_missing, alpha):
    """Over many seeds at a small alpha: every split make_split returns can be used by every later step
    (each hospital has training and test images, and every class unless missing ones are allowed);
    every other split is refused, naming the hospital and the seed."""
    index = fake_index(60, 3)
    accepted = refused = 0
    for seed in range(40):
        try:
            m = make_split(index, 3, scheme="dirichlet", alpha=alpha, seed=seed, allow_missing_classes=allow_missing)
        except DvlibError as e:
            refused += 1
            assert f"split seed {seed}" in str(e) and re.search(r"hospital \d", str(e)), str(e)
            continue
        accepted += 1
        for h in (1, 2, 3):
            part = m[m["hospital"] == h]
            assert (part["subset"] == "train").any() and (part["subset"] == "test").any(), (seed, h)
            if not allow_missing:
                assert set(part[part["subset"] == "train"]["label"]) == set(index.records["label"]), (seed, h)
    assert accepted and refused  # both cases happen: the test is not vacuous


def test_shared_test_design_gives_every_scheme_the_same_test_patients():
    index = fake_index(200, 4)
    iid = make_split(index, 4, seed=2, test_design="shared")
    dir_ = make_split(index, 4, scheme="dirichlet", alpha=1.0, seed=2, test_design="shared", allow_missing_classes=True)
    test = lambda m: set(m.loc[m["subset"] == "test", "image"])  # noqa: E731
    assert test(iid) == test(dir_) and 0.1 < len(test(iid)) / len(index) < 0.3
    assert not iid.set_index("image")["hospital"].equals(dir_.set_index("image").loc[iid["image"], "hospital"])
    assert (iid.groupby("patient")[["hospital", "subset"]].nunique() == 1).all().all()
    per_hospital = make_split(index, 4, seed=2)
    assert test(per_hospital) != test(iid)
    with pytest.raises(DvlibError, match="unknown test design 'global'"):
        make_split(index, 4, test_design="global")
