"""ODIR-2019 fundus subset: colour fundus photos of normal, cataract and glaucoma eyes.

Layout under ``<root>/odir_fundus/`` (as ``dvlib data download odir_fundus`` installs it)::

    <class>/<patient>_<left|right>.jpg   class: normal, cataract or glaucoma
    patients.csv                         image (file stem), patient: both eyes share the patient id
    SUBSET.csv                           file, label, patient, eye, sha256, source_path (one row per file)

Label rule: an eye filed under two classes (the same ``<patient>_<eye>`` in two class folders)
carries both diagnoses, so a single-label classifier can be neither trained nor scored on it:
every copy is dropped and named in ``info``. A patient whose two eyes are in different classes
keeps both eyes, each with its own label; the shared patient id keeps them in one hospital and
one side of train/test.

``dvlib data verify odir_fundus`` hashes every file once against ``SUBSET.csv`` (through
``verify_notes``) and refuses a changed, missing or unlisted file by name; loading hashes nothing
unless ``strict=True``.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pandas as pd

from dvlib.data.base import DatasetIndex, is_hidden, register
from dvlib.data.pad_ufes import IMAGE_EXTS
from dvlib.data.sources import Source, rel, archive_dirs
from dvlib.io import DvlibError, read_csv, sha256_file

CLASSES = ["normal", "cataract", "glaucoma"]      # the paper's Retina order, less "retina disease"
EYE_STEM = re.compile(r"(\d+)_(left|right)")
SUBSET_FILE = "SUBSET.csv"
PATIENTS_FILE = "patients.csv"
LABEL_RULE = ("an eye filed under two classes is dropped (every copy); a patient's two eyes keep "
              "their own classes and stay together by patient id")


def _eye_files(folder: Path) -> list[tuple[str, str, Path]]:
    """(label, stem, path) of every image in the class folders; anything off-layout is refused."""
    missing = [c for c in CLASSES if not (folder / c).is_dir()]
    if missing:
        raise DvlibError(f"{folder}: missing class folder(s) {missing}; odir_fundus needs {CLASSES}")
    extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in CLASSES
                   and not is_hidden(p.name))
    if extra:
        raise DvlibError(f"{folder}: unexpected folder(s) {extra}; odir_fundus holds only {CLASSES}")
    found = []
    for label in CLASSES:
        seen: dict[str, Path] = {}
        for p in sorted((folder / label).iterdir()):
            if is_hidden(p.name) or (p.is_file() and p.suffix.lower() not in IMAGE_EXTS):
                continue
            if p.is_dir():
                raise DvlibError(f"{p}: unexpected folder; images sit directly in {folder / label}")
            if not EYE_STEM.fullmatch(p.stem):
                raise DvlibError(f"{p}: not named <patient>_<left|right> (the ODIR file names)")
            if p.stem in seen:
                raise DvlibError(f"two image files share the stem {p.stem!r}: {seen[p.stem]} and {p}")
            seen[p.stem] = p
            found.append((label, p.stem, p))
    return found


def _patients(folder: Path) -> dict[str, str]:
    """patients.csv as image stem -> patient; one row per file, so an eye may repeat with the same id."""
    path = folder / PATIENTS_FILE
    table = read_csv(path, dtype=str, keep_default_na=False)
    if not {"image", "patient"} <= set(table.columns):
        raise DvlibError(f"{path}: needs columns image, patient; has {list(table.columns)[:10]}")
    table = table.drop_duplicates(["image", "patient"])
    clash = table["image"][table["image"].duplicated()]
    if len(clash):
        raise DvlibError(f"{path}: image {clash.iloc[0]!r} is listed with different patients")
    return dict(zip(table["image"], table["patient"]))


@register("odir_fundus", "ODIR-2019 fundus subset (224 px): normal, cataract, glaucoma; patient = both eyes")
def load_odir_fundus(folder: Path, strict: bool = False) -> DatasetIndex:
    """Index the class folders; ``strict`` (``dvlib split --strict``) also runs :func:`check_subset`."""
    if strict:
        check_subset(folder)
    files = _eye_files(folder)
    if not files:
        raise DvlibError(f"{folder}: no images in the class folders {CLASSES}")
    patients = _patients(folder)
    rows = []
    for label, stem, path in files:
        if stem not in patients:
            raise DvlibError(f"{path}: no row for {stem!r} in {folder / PATIENTS_FILE}")
        if patients[stem] != EYE_STEM.fullmatch(stem).group(1):
            raise DvlibError(f"{folder / PATIENTS_FILE}: {stem!r} is given patient {patients[stem]!r}, "
                             f"but its file name says {EYE_STEM.fullmatch(stem).group(1)!r}")
        rows.append({"image": stem, "patient": patients[stem], "label": label, "path": str(path)})
    classes_of: dict[str, list[str]] = {}
    for r in rows:            # files come class by class, so each list is in CLASSES order
        classes_of.setdefault(r["image"], []).append(r["label"])
    double = sorted(s for s, c in classes_of.items() if len(c) > 1)
    records = pd.DataFrame([r for r in rows if r["image"] not in double],
                           columns=["image", "patient", "label", "path"])
    mixed = records.groupby("patient")["label"].nunique()
    info = {
        "label_rule": LABEL_RULE,
        "double_labelled": "; ".join(f"{s} ({', '.join(classes_of[s])})" for s in double) or "none",
        "double_labelled_eyes": double,
        "files_dropped": len(rows) - len(records),
        "patients_with_two_classes": int((mixed > 1).sum()),
    }
    return DatasetIndex("odir_fundus", list(CLASSES), records, root=folder, info=info)


# --- verification against SUBSET.csv ----------------------------------------------------------

def check_subset(folder: Path) -> str:
    """Hash every file listed in SUBSET.csv once; refuse changed, missing or unlisted images by name."""
    path = folder / SUBSET_FILE
    if not path.exists():
        return f"no {SUBSET_FILE}: the files' sha256 were not checked."
    table = read_csv(path, dtype=str, keep_default_na=False)
    if not {"file", "sha256"} <= set(table.columns):
        raise DvlibError(f"{path}: needs columns file, sha256; has {list(table.columns)[:10]}")
    problems = []
    for name, want in zip(table["file"], table["sha256"]):
        f = folder / name
        if not f.is_file():
            problems.append(f"{f}: listed in {SUBSET_FILE} but missing")
        elif sha256_file(f) != want.strip().lower():
            problems.append(f"{f}: sha256 differs from {SUBSET_FILE} (the file changed)")
    listed = {Path(n).as_posix() for n in table["file"]}
    problems += [f"{p}: image not listed in {SUBSET_FILE}" for _, _, p in _eye_files(folder)
                 if p.relative_to(folder).as_posix() not in listed]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DvlibError(f"{folder} is not the recorded subset: " + "; ".join(problems[:5]) + more)
    return f"{SUBSET_FILE}: all {len(table)} files present with the recorded sha256."


def verify_notes(index: DatasetIndex) -> list[str]:
    """The hash check and the label rule, for ``dvlib data verify``."""
    info = index.info
    return [check_subset(Path(index.root)),
            f"label rule: {info['label_rule']}; dropped {info['files_dropped']} files: "
            f"{info['double_labelled']}; patients with eyes in two classes: "
            f"{info['patients_with_two_classes']}.",
            "published = this subset as recorded (SUBSET.csv less the dropped copies), not ODIR-5K."]


# --- download source ----------------------------------------------------------------------------

def arrange(extracted: Path, staging: Path) -> None:
    """The GitHub copy's ``dataset/<class>/`` -> ``<staging>/<class>/`` with its ODIR-named files only,
    plus ``patients.csv`` and ``SUBSET.csv`` (their sha256 computed here)."""
    found = [d for c in CLASSES for d in archive_dirs(extracted, c)]
    if not found:
        raise DvlibError(f"no class folders {CLASSES} found in the archive; expected dataset/<class>/")
    base = min((d.parent for d in found), key=lambda p: (len(p.parts), str(p)))
    missing = [c for c in CLASSES if not (base / c).is_dir()]
    if missing:
        raise DvlibError(f"class folder(s) {missing} missing in {rel(base, extracted)}")
    top = base.relative_to(extracted).parts[1:]           # drop GitHub's <repo>-<commit>/ level
    rows = []
    for label in CLASSES:
        (staging / label).mkdir(parents=True)
        for p in sorted((base / label).iterdir()):
            m = EYE_STEM.fullmatch(p.stem)
            if not (m and p.suffix == ".jpg" and p.is_file()):
                continue          # augmented copies and other sources: not ODIR-named, left out
            target = staging / label / p.name
            os.rename(p, target)
            rows.append({"file": f"{label}/{p.name}", "label": label, "patient": m.group(1),
                         "eye": m.group(2), "sha256": sha256_file(target),
                         "source_path": "/".join((*top, label, p.name))})
    with open(staging / SUBSET_FILE, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file"])
        w.writeheader()
        w.writerows(rows)
    pd.DataFrame({"image": [Path(r["file"]).stem for r in rows],
                  "patient": [r["patient"] for r in rows]}).to_csv(staging / PATIENTS_FILE, index=False)


SOURCE = Source(
    name="odir_fundus",
    title="ODIR-2019 fundus subset (normal, cataract, glaucoma; 224 px JPEG)",
    urls=("https://github.com/ahmadcs22/Eye-Disease-Detection-Using-MobileNet-Data-science/archive/4619a22.zip",),
    filename="Eye-Disease-Detection-Using-MobileNet-Data-science-4619a22.zip",
    sha256=None,
    archive="zip",
    homepage="https://odir2019.grand-challenge.org/",
    licence="not stated by the public copy; ODIR-2019 was released for research: cite the challenge "
            "and do not redistribute the images",
    citation="N. Li, T. Li, C. Hu, K. Wang, H. Kang. A Benchmark of Ocular Disease Intelligent "
             "Recognition: One Shot for Multi-disease Detection. arXiv:2102.07978, 2021 (the ODIR-5K set "
             "of Peking University's ODIR-2019 challenge, https://odir2019.grand-challenge.org/).",
    classes={"normal": 1074, "cataract": 296, "glaucoma": 304},
    images=1674,
    patients=1009,
    patient_note="patient = the ODIR id in <patient>_<eye>: both eyes of a patient share it",
    layout="odir_fundus/{normal,cataract,glaucoma}/<patient>_<left|right>.jpg + patients.csv + SUBSET.csv",
    arrange=arrange,
    notes=("Counts: the 1678 files recorded in SUBSET.csv less the 4 copies of the 2 eyes filed under "
           "both cataract/ and glaucoma/ (dropped by the label rule); they are this subset's, not "
           "ODIR-5K's, which has 8 diagnostic labels at the original resolution.",
           "The archive is a third-party GitHub copy (commit 4619a22, abbreviated as recorded); only its "
           "ODIR-named files <patient>_<left|right>.jpg are kept. The link was not checked offline."),
    verify_notes=verify_notes,
)
