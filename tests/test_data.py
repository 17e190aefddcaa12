"""Dataset registry: PAD-UFES-20 layout, image folders, the synthetic set, and bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dvlib.data import DATASETS, load_dataset
from dvlib.io import DvlibError


def test_pad_ufes_matches_by_stem_and_counts_mismatches(pad_root: Path):
    d = load_dataset("pad_ufes_20", root=pad_root)
    assert len(d) == 54  # 36 patients, every other one with 2 images
    assert d.classes == ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
    assert d.info["rows_without_images"] == 1
    assert d.info["images_without_rows"] == 0
    assert set(d.records["patient"]) == {f"PAT_{p}" for p in range(36)}
    jpgs = d.records[d.records["path"].str.endswith(".jpg")]
    assert len(jpgs) == 18  # re-encoded copies are matched by stem
    assert d.load_image(d.records["image"][0]).shape == (30, 40, 3)


def test_pad_ufes_strict_rejects_mismatches(pad_root: Path):
    with pytest.raises(DvlibError, match="1 metadata rows have no image file"):
        load_dataset("pad_ufes_20", root=pad_root, strict=True)
    extra = pad_root / "pad_ufes_20" / "images" / "PAT_X_1_1.png"
    extra.write_bytes((pad_root / "pad_ufes_20" / "images" / "imgs_part_1" / "PAT_0_100_0.png").read_bytes())
    d = load_dataset("pad_ufes_20", root=pad_root)
    assert d.info["images_without_rows"] == 1
    with pytest.raises(DvlibError, match="PAT_X_1_1"):
        load_dataset("pad_ufes_20", root=pad_root, strict=True)


def test_pad_ufes_bad_metadata(pad_root: Path):
    meta = pad_root / "pad_ufes_20" / "metadata.csv"
    pd.read_csv(meta).drop(columns=["diagnostic"]).to_csv(meta, index=False)
    with pytest.raises(DvlibError, match=r"metadata.csv: missing columns \['diagnostic'\]"):
        load_dataset("pad_ufes_20", root=pad_root)


def test_corrupt_image_names_the_file(pad_root: Path):
    d = load_dataset("pad_ufes_20", root=pad_root)
    victim = Path(d.records["path"][3])
    victim.write_bytes(b"not an image at all")
    with pytest.raises(DvlibError, match=f"corrupt or unreadable image file: {victim}"):
        d.load_image(d.records["image"][3])


def test_missing_root_says_where_and_about_dvlib_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DVLIB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DvlibError) as e:
        load_dataset("pad_ufes_20")
    msg = str(e.value)
    assert str((tmp_path / "nowhere" / "pad_ufes_20").resolve()) in msg
    assert "DVLIB_DATA" in msg


def test_unknown_dataset_lists_valid_ones():
    with pytest.raises(DvlibError) as e:
        load_dataset("imagenet21k")
    for name in ("pad_ufes_20", "synthetic", "imagefolder"):
        assert name in str(e.value)


def test_imagefolder_with_patients_csv(tmp_path: Path):
    rng = np.random.default_rng(1)
    for c in ("benign", "malignant"):
        for i in range(4):
            from tests.conftest import write_image

            write_image(tmp_path / "site" / c / f"{c}_{i}.png", rng)
    pd.DataFrame({"image": ["benign_0.png", "benign_1.png"], "patient": ["P1", "P1"]}).to_csv(
        tmp_path / "site" / "patients.csv", index=False)
    d = load_dataset(str(tmp_path / "site"))
    assert d.classes == ["benign", "malignant"]
    assert len(d) == 8
    by_stem = dict(zip(d.records["path"].map(lambda p: Path(p).stem), d.records["patient"]))
    assert by_stem["benign_0"] == by_stem["benign_1"] == "P1"
    assert by_stem["malignant_3"] == "malignant_3"  # default: patient = file stem


def test_synthetic_is_deterministic_and_class_conditional():
    a = load_dataset("synthetic", n_patients=40)
    b = load_dataset("synthetic", n_patients=40)
    pd.testing.assert_frame_equal(a.records, b.records)
    img = a.load_image(a.records["image"][7])
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    np.testing.assert_array_equal(img, b.load_image(a.records["image"][7]))
    # not noise: the mean image of a class differs from another class's
    means = {c: np.mean([a.load_image(i).astype(float) for i in a.records[a.records.label == c]["image"][:8]], 0)
             for c in ("disc", "ring")}
    assert np.abs(means["disc"] - means["ring"]).mean() > 2.0


def test_synthetic_is_learnable_by_a_small_cnn():
    from dvlib import models, train
    from dvlib.loader import ImageCache, cache_size_for
    from dvlib.split import make_split

    d = load_dataset("synthetic", n_patients=120)
    m = make_split(d, n_hospitals=1, test_frac=0.25, seed=0)
    cache = ImageCache.build(d, m["image"], cache_size_for(48))
    cls = {c: i for i, c in enumerate(d.classes)}
    tr, te = m[m.subset == "train"], m[m.subset == "test"]
    y = torch.tensor(tr["label"].map(cls).to_numpy())
    net = models.build("smallcnn", 4, weights="random", seed=0)
    train.fit(net, cache, cache.rows(tr["image"]), y, epochs=8, batch_size=32, lr=3e-3, size=48, seed=0,
              progress=False)
    from dvlib.metrics import compute_metrics

    probs = train.predict(net, cache, cache.rows(te["image"]), size=48)
    met = compute_metrics(te["label"].map(cls).to_numpy(), probs, d.classes)
    assert met["accuracy"] > 0.5  # chance is 0.25


def test_real_subset_loads(shared_data: Path):
    d = load_dataset("pad_ufes_20", root=shared_data)
    assert len(d) == 1233
    assert d.records["patient"].nunique() == 906
    assert d.counts()["images"].to_dict() == {"ACK": 324, "BCC": 399, "MEL": 49, "NEV": 223, "SCC": 71, "SEK": 167}
    assert d.info["partial"] is True


def test_registry_has_the_paper_datasets():
    assert {"pad_ufes_20", "retina", "bladder", "synthetic", "imagefolder"} <= set(DATASETS)
