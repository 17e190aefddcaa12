"""The ODIR-2019 fundus subset (`odir_fundus`): layout, patients, the double-label rule, SUBSET.csv hashes."""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dvlib.cli import main
from dvlib.data import load_dataset
from dvlib.data import download as dl
from dvlib.io import DvlibError
from dvlib.split import make_split

SHARED_ODIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "odir_fundus"

# patient -> (left class, right class); None: that eye is absent
EYES = {
    **{p: ("normal", "normal") for p in range(1, 9)},
    **{p: ("cataract", "cataract") for p in range(10, 16)},
    **{p: ("glaucoma", "glaucoma") for p in range(30, 36)},
    16: ("cataract", None), 36: (None, "glaucoma"),
    20: ("glaucoma", "cataract"),        # two eyes, two classes: both kept, one patient
}
DOUBLE = "15_right"                      # also filed under glaucoma/ (byte-identical): dropped


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def odir_files() -> dict[str, bytes]:
    """``<class>/<patient>_<eye>.jpg`` -> bytes, in the official layout."""
    files = {}
    for p, sides in EYES.items():
        for eye, label in zip(("left", "right"), sides):
            if label:
                files[f"{label}/{p}_{eye}.jpg"] = jpeg(len(files))
    files[f"glaucoma/{DOUBLE}.jpg"] = files[f"cataract/{DOUBLE}.jpg"]
    return files


@pytest.fixture
def odir_root(tmp_path: Path) -> Path:
    """A data root holding ``odir_fundus/`` with patients.csv and SUBSET.csv as the shared copy has them."""
    folder = tmp_path / "data" / "odir_fundus"
    rows = []
    for name, data in odir_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        label, stem = name[:-4].split("/")
        patient, eye = stem.split("_")
        rows.append({"file": name, "label": label, "patient": patient, "eye": eye,
                     "sha256": hashlib.sha256(data).hexdigest(), "source_path": f"dataset/{name}"})
    table = pd.DataFrame(rows)
    table.to_csv(folder / "SUBSET.csv", index=False)
    pd.DataFrame({"image": table["file"].str[:-4].str.split("/").str[1], "patient": table["patient"]}).to_csv(
        folder / "patients.csv", index=False)
    return tmp_path / "data"


def test_loader_reads_layout_and_patients(odir_root: Path):
    d = load_dataset("odir_fundus", root=odir_root)
    assert d.classes == ["normal", "cataract", "glaucoma"]
    n_files = len(odir_files())
    assert len(d) == n_files - 2
    assert d.counts()["images"].to_dict() == {"normal": 16, "cataract": 13, "glaucoma": 14}
    rec = d.records.set_index("image")
    assert rec.loc["3_left", "patient"] == rec.loc["3_right", "patient"] == "3"
    assert rec.loc["36_right", "label"] == "glaucoma" and "36_left" not in rec.index
    assert d.records.groupby("patient").size().max() == 2
    assert d.load_image("12_right").shape == (12, 16, 3)


def test_double_labelled_eye_is_dropped_everywhere(odir_root: Path):
    d = load_dataset("odir_fundus", root=odir_root)
    assert DOUBLE not in set(d.records["image"])
    assert d.info["double_labelled_eyes"] == [DOUBLE]
    assert d.info["files_dropped"] == 2
    assert d.records.set_index("image").loc["15_left", "label"] == "cataract"   # the other eye stays
    s = d.summary()
    assert s["double_labelled"] == "15_right (cataract, glaucoma)"
    assert "dropped" in s["label_rule"]


def test_eyes_in_two_classes_are_kept_with_their_labels(odir_root: Path):
    d = load_dataset("odir_fundus", root=odir_root)
    rec = d.records.set_index("image")
    assert rec.loc["20_left", "label"] == "glaucoma" and rec.loc["20_right", "label"] == "cataract"
    assert rec.loc["20_left", "patient"] == rec.loc["20_right", "patient"] == "20"
    assert d.info["patients_with_two_classes"] == 1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_split_keeps_both_eyes_in_one_hospital_and_one_side(odir_root: Path, scheme: str):
    d = load_dataset("odir_fundus", root=odir_root)
    pairs = [(f"{p}_left", f"{p}_right") for p, sides in EYES.items() if None not in sides and p != 15]
    for seed in range(3):
        m = make_split(d, n_hospitals=2, scheme=scheme, alpha=1.0, test_frac=0.25, seed=seed,
                       allow_missing_classes=True).set_index("image")
        for left, right in pairs:          # the eyes by file name, not by the loader's patient column
            assert tuple(m.loc[left, ["hospital", "subset"]]) == tuple(m.loc[right, ["hospital", "subset"]])
        assert m["hospital"].nunique() == 2 and set(m["subset"]) == {"train", "test"}


def test_verify_passes_on_the_recorded_copy(odir_root: Path):
    report = dl.verify("odir_fundus", root=odir_root)
    assert f"SUBSET.csv: all {len(odir_files())} files present with the recorded sha256." in report.notes
    assert any("15_right (cataract, glaucoma)" in n for n in report.notes)
    assert report.status == "partial" and report.images == len(odir_files()) - 2


def test_verify_refuses_a_changed_file_naming_it(odir_root: Path):
    victim = odir_root / "odir_fundus" / "normal" / "4_left.jpg"
    victim.write_bytes(jpeg(999))              # still a valid image: only the hash can tell
    assert len(load_dataset("odir_fundus", root=odir_root)) == len(odir_files()) - 2
    with pytest.raises(DvlibError, match=re.escape(f"{victim}: sha256 differs from SUBSET.csv")):
        dl.verify("odir_fundus", root=odir_root)
    with pytest.raises(DvlibError, match=re.escape(f"{victim}: sha256 differs")):
        load_dataset("odir_fundus", root=odir_root, strict=True)


def test_verify_refuses_missing_and_unlisted_files(odir_root: Path):
    folder = odir_root / "odir_fundus"
    gone, extra = folder / "glaucoma" / "31_right.jpg", folder / "normal" / "77_left.jpg"
    gone.unlink()
    with pytest.raises(DvlibError, match=re.escape(f"{gone}: listed in SUBSET.csv but missing")):
        dl.verify("odir_fundus", root=odir_root)
    gone.write_bytes(odir_files()["glaucoma/31_right.jpg"])
    extra.write_bytes(jpeg(77))
    pd.concat([pd.read_csv(folder / "patients.csv", dtype=str),
               pd.DataFrame({"image": ["77_left"], "patient": ["77"]})]).to_csv(folder / "patients.csv", index=False)
    with pytest.raises(DvlibError, match=re.escape(f"{extra}: image not listed in SUBSET.csv")):
        dl.verify("odir_fundus", root=odir_root)


def test_cli_verify_exits_2_naming_the_changed_file(odir_root: Path, capsys):
    assert main(["data", "verify", "odir_fundus", "--root", str(odir_root), "--allow-partial"]) == 0
    victim = odir_root / "odir_fundus" / "cataract" / "11_right.jpg"
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert main(["data", "verify", "odir_fundus", "--root", str(odir_root), "--allow-partial"]) == 2
    assert f"{victim}: sha256 differs" in capsys.readouterr().err


def test_bad_layout_is_refused_by_name(odir_root: Path):
    folder = odir_root / "odir_fundus"
    odd = folder / "normal" / "scan_0001.jpg"
    odd.write_bytes(jpeg(5))
    with pytest.raises(DvlibError, match=re.escape(f"{odd}: not named <patient>_<left|right>")):
        load_dataset("odir_fundus", root=odir_root)
    odd.unlink()
    patients = pd.read_csv(folder / "patients.csv", dtype=str)
    clash = patients.copy()
    clash.loc[clash.index[clash["image"] == DOUBLE][0], "patient"] = "99"   # its two rows now disagree
    clash.to_csv(folder / "patients.csv", index=False)
    with pytest.raises(DvlibError, match=f"image '{DOUBLE}' is listed with different patients"):
        load_dataset("odir_fundus", root=odir_root)
    patients[patients["image"] != "5_left"].to_csv(folder / "patients.csv", index=False)
    with pytest.raises(DvlibError, match=re.escape(f"{folder / 'normal' / '5_left.jpg'}: no row for '5_left'")):
        load_dataset("odir_fundus", root=odir_root)
    patients.loc[patients["image"] == "5_left", "patient"] = "6"
    patients.to_csv(folder / "patients.csv", index=False)
    with pytest.raises(DvlibError, match="'5_left' is given patient '6', but its file name says '5'"):
        load_dataset("odir_fundus", root=odir_root)
    for f in (folder / "glaucoma").iterdir():
        f.unlink()
    (folder / "glaucoma").rmdir()
    with pytest.raises(DvlibError, match=re.escape("missing class folder(s) ['glaucoma']")):
        load_dataset("odir_fundus", root=odir_root)


def test_download_keeps_only_odir_named_files(tmp_path: Path):
    top = "Eye-Disease-Detection-Using-MobileNet-Data-science-4619a22/dataset"
    entries = {f"{top}/{name}": data for name, data in odir_files().items()}
    entries[f"{top}/normal/aug_3_left.jpg"] = jpeg(500)            # augmented copy: not ODIR-named
    entries[f"{top}/cataract/cataract_001.png"] = jpeg(501)        # another source
    entries[f"{top}/diabetic_retinopathy/40_left.jpg"] = jpeg(502)  # a class this subset leaves out
    archive = tmp_path / "odir.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    dest = dl.download("odir_fundus", root=tmp_path / "data", url=archive.as_uri(), verify_hash=False,
                       progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["SOURCE.json", "SUBSET.csv", "cataract", "glaucoma",
                                                      "normal", "patients.csv"]
    subset = pd.read_csv(dest / "SUBSET.csv", dtype=str).set_index("file")
    assert set(subset.index) == set(odir_files())
    assert subset.loc["glaucoma/15_right.jpg", "source_path"] == "dataset/glaucoma/15_right.jpg"
    want = hashlib.sha256(odir_files()["glaucoma/20_left.jpg"]).hexdigest()
    assert subset.loc["glaucoma/20_left.jpg", "sha256"] == want
    report = dl.verify("odir_fundus", root=tmp_path / "data")
    assert report.images == len(odir_files()) - 2 and report.patients == len(EYES)
    assert json.loads((dest / "SOURCE.json").read_text())["sha256_checked"] is False


@pytest.fixture
def shared_odir() -> Path:
    if not (SHARED_ODIR / "SUBSET.csv").exists():
        pytest.skip("the shared ODIR fundus subset is not beside this checkout")
    return SHARED_ODIR.parent


def test_real_subset(shared_odir: Path):
    d = load_dataset("odir_fundus", root=shared_odir)
    # the data card: 1678 files of 1009 patients; 1415_right and 625_left are in cataract/ and glaucoma/
    assert len(d) == 1678 - 4 and d.records["patient"].nunique() == 1009
    assert d.counts()["images"].to_dict() == {"normal": 1074, "cataract": 298 - 2, "glaucoma": 306 - 2}
    assert d.info["double_labelled_eyes"] == ["1415_right", "625_left"]
    rec = d.records.set_index("image")
    assert rec.loc["2074_left", "label"] == "glaucoma" and rec.loc["2074_right", "label"] == "cataract"
    m = make_split(d, n_hospitals=4, seed=0)
    assert (m.groupby("patient")[["hospital", "subset"]].nunique() == 1).all().all()
    eyes = m.set_index("image").loc[["2074_left", "2074_right"], ["hospital", "subset"]]
    assert len(eyes.drop_duplicates()) == 1
    report = dl.verify("odir_fundus", root=shared_odir)
    assert report.ok and "SUBSET.csv: all 1678 files present with the recorded sha256." in report.notes
