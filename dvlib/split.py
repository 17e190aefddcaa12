"""Simulated hospitals: patient-disjoint shards with their own train/test splits.

``make_split`` assigns every patient to one of N hospitals, numbered 1..N as the paper's "Part
Index" (label-stratified and near-equal for ``iid``; label-skewed with a Dirichlet(alpha) prior for
``dirichlet``), then splits every hospital into its own patient-disjoint train/test subsets (paper
Tables 1-3 evaluate each Part Index on that hospital's data). A split that later steps could not use
(an empty hospital, one without test images, or without some class unless that is allowed) is
refused with the hospital and the seed named. The result is a manifest (image, patient, label,
hospital, subset) that is written once per run and read by every later step.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from dvlib.data.base import DatasetIndex
from dvlib.io import DvlibError, atomic_path

MANIFEST_COLUMNS = ["image", "patient", "label", "hospital", "subset"]
SCHEMES = ("iid", "dirichlet")
TEST_DESIGNS = ("per_hospital", "shared")


def make_split(index: DatasetIndex, n_hospitals: int = 4, scheme: str = "iid", alpha: float = 0.5,
               test_frac: float = 0.2, seed: int = 0, allow_missing_classes: bool = False,
               test_design: str = "per_hospital") -> pd.DataFrame:
    """Return the manifest for ``index`` split over ``n_hospitals`` hospitals.

    ``test_design``: ``per_hospital`` (each hospital holds out its own patients, the paper's) or
    ``shared`` (the test patients are drawn from all patients first, so every scheme with the same
    seed has the same pooled test set and the same pooled training set; each hospital's test split
    is its share of them)."""
    if test_design not in TEST_DESIGNS:
        raise DvlibError(f"unknown test design {test_design!r}; valid: {', '.join(TEST_DESIGNS)}")
    rec = index.records
    n_pat = rec["patient"].nunique()
    if scheme not in SCHEMES:
        raise DvlibError(f"unknown split scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if n_hospitals < 1:
        raise DvlibError(f"n_hospitals must be >= 1, got {n_hospitals}")
    if n_hospitals > n_pat:
        raise DvlibError(f"cannot split {n_pat} patients of {index.name!r} over {n_hospitals} hospitals: "
                         "more hospitals than patients")
    if not 0.0 < test_frac < 1.0:
        raise DvlibError(f"test_frac must be in (0, 1), got {test_frac}")
    if scheme == "iid":
        hospital = _stratified_groups(rec, n_hospitals, seed) if n_hospitals > 1 else np.zeros(len(rec), int)
    else:
        if not alpha > 0:
            raise DvlibError(f"dirichlet alpha must be > 0, got {alpha}")
        hospital = _dirichlet_groups(rec, n_hospitals, alpha, seed)
    manifest = pd.DataFrame({"image": rec["image"], "patient": rec["patient"], "label": rec["label"],
                             "hospital": hospital.astype(int) + 1, "subset": "train"})
    n_folds = max(2, int(round(1.0 / test_frac)))
    if test_design == "shared":  # chosen before, and apart from, the hospitals: the same for every scheme
        manifest.loc[_stratified_groups(manifest, n_folds, seed + 999, pick=0), "subset"] = "test"
    for h in range(1, n_hospitals + 1) if test_design == "per_hospital" else ():
        part = manifest[manifest["hospital"] == h]
        if len(part):
            test_mask = _stratified_groups(part, n_folds, seed + 1000 + h - 1, pick=0)
            manifest.loc[part.index[test_mask], "subset"] = "test"
    for h in range(1, n_hospitals + 1):
        part = manifest[manifest["hospital"] == h]
        for subset in ("train", "test"):
            if not (part["subset"] == subset).any():
                raise DvlibError(f"split seed {seed} ({scheme}{f', alpha {alpha}' if scheme == 'dirichlet' else ''}) "
                                 f"leaves hospital {h} with no {subset} images ({len(part)} images in all); "
                                 "use another seed, fewer hospitals or a larger alpha")
    try:
        validate_manifest(manifest, index.classes, allow_missing_classes=allow_missing_classes)
    except DvlibError as e:
        raise DvlibError(f"split seed {seed}: {e}") from None
    return manifest.sort_values(["hospital", "subset", "image"], ignore_index=True)


def _stratified_groups(rec: pd.DataFrame, k: int, seed: int, pick: int | None = None) -> np.ndarray:
    """Fold id per row (or a boolean mask of fold ``pick``), label-stratified, patient-grouped."""
    n_groups = rec["patient"].nunique()
    k_eff = min(k, n_groups)
    if k_eff < 2:
        return np.zeros(len(rec), bool) if pick is not None else np.zeros(len(rec), int)
    # StratifiedGroupKFold warns when a class has fewer members than folds; the folds are still valid.
    # sklearn is imported here, not above: every notebook kernel imports this module, few make splits.
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    cv = StratifiedGroupKFold(n_splits=k_eff, shuffle=True, random_state=seed)
    fold = np.zeros(len(rec), int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            for f, (_, test_idx) in enumerate(cv.split(np.zeros(len(rec)), rec["label"].values,
                                                       rec["patient"].values)):
                fold[test_idx] = f
        except ValueError as e:
            raise DvlibError(f"cannot make {k_eff} patient-disjoint, label-stratified parts of "
                             f"{len(rec)} images of {n_groups} patients ({e}); use fewer hospitals or a "
                             "larger test fraction") from e
    if pick is not None:
        return fold == pick
    return fold


def _dirichlet_groups(rec: pd.DataFrame, k: int, alpha: float, seed: int) -> np.ndarray:
    """Label skew: each class's patients are dealt to hospitals in Dirichlet(alpha) proportions."""
    rng = np.random.default_rng(seed)
    # a patient's class = its most frequent label (ties broken by name), so patients stay whole
    first = rec.groupby("patient")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())
    owner: dict[str, int] = {}
    for label in sorted(first.unique()):
        patients = np.array(sorted(first.index[first == label]))
        rng.shuffle(patients)
        props = rng.dirichlet([alpha] * k)
        cuts = (np.cumsum(props)[:-1] * len(patients)).round().astype(int)
        for h, chunk in enumerate(np.split(patients, cuts)):
            owner.update({p: h for p in chunk})
    return rec["patient"].map(owner).to_numpy()


def validate_manifest(manifest: pd.DataFrame, classes: list[str], allow_missing_classes: bool = False,
                      source: str = "manifest") -> None:
    """Raise if a patient spans hospitals or subsets, or a class is missing from a hospital's train set."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DvlibError(f"{source}: missing columns {missing}; expected {MANIFEST_COLUMNS}")
    bad_subset = sorted(set(manifest["subset"]) - {"train", "test"})
    if bad_subset:
        raise DvlibError(f"{source}: unknown subset values {bad_subset} (train/test)")
    if manifest["image"].duplicated().any():
        raise DvlibError(f"{source}: image {manifest['image'][manifest['image'].duplicated()].iloc[0]!r} listed twice")
    unknown = sorted(set(manifest["label"]) - set(classes))
    if unknown:
        raise DvlibError(f"{source}: labels {unknown} not among classes {classes}")
    spans = manifest.groupby("patient")[["hospital", "subset"]].nunique()
    leak = spans[(spans > 1).any(axis=1)]
    if len(leak):
        raise DvlibError(f"{source}: patient {leak.index[0]!r} appears in more than one hospital or subset "
                         f"({len(leak)} such patients): splits must be patient-disjoint")
    if not allow_missing_classes:
        for h, part in manifest[manifest["subset"] == "train"].groupby("hospital"):
            absent = [c for c in classes if c not in set(part["label"])]
            if absent:
                raise DvlibError(
                    f"{source}: hospital {h} has no training images of class(es) {absent}; weighted "
                    "cross-entropy needs every class. Use fewer hospitals, a larger dirichlet alpha, "
                    "or allow_missing_classes=True (those classes then get weight 0).")


def save_manifest(manifest: pd.DataFrame, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp:
        manifest[MANIFEST_COLUMNS].to_csv(tmp, index=False)
    return path


def load_manifest(path: str | os.PathLike, classes: list[str] | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DvlibError(f"{path}: manifest not found; run the split step first (`dvlib split`)")
    from dvlib.io import read_csv

    m = read_csv(path, dtype={"image": str, "patient": str, "label": str, "subset": str})
    if m.empty:
        raise DvlibError(f"{path}: the manifest lists no images")
    blank = [c for c in MANIFEST_COLUMNS if c in m.columns and m[c].isna().any()]
    if blank:
        raise DvlibError(f"{path}: column {blank[0]!r} has empty cells (row {int(m.index[m[blank[0]].isna()][0]) + 2})")
    if "hospital" in m.columns:
        try:
            m["hospital"] = m["hospital"].astype(int)
        except (TypeError, ValueError):
            raise DvlibError(f"{path}: column 'hospital' must hold integers") from None
    validate_manifest(m, classes if classes is not None else sorted(set(m.get("label", []))),
                      allow_missing_classes=True, source=str(path))
    return m


def shard_table(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Images per hospital x subset x class (tidy), for reports and invariant checks."""
    t = manifest.groupby(["hospital", "subset", "label"]).size().rename("images").reset_index()
    p = manifest.groupby(["hospital", "subset"])["patient"].nunique().rename("patients").reset_index()
    wide = t.pivot_table(index=["hospital", "subset"], columns="label", values="images", fill_value=0)
    wide = wide.reindex(columns=classes, fill_value=0).astype(int).reset_index()
    wide.columns.name = None
    return wide.merge(p, on=["hospital", "subset"])
