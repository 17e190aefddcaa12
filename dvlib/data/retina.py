"""Retina (GitHub ``yiweichen04/retina_dataset``): 601 colour fundus photos, 4 classes.

Official layout (the repository's ``dataset/`` folder), under ``<root>/retina/``::

    dataset/1_normal/          300 images  -> class ``normal``
    dataset/2_cataract/        100 images  -> class ``cataract``
    dataset/2_glaucoma/        101 images  -> class ``glaucoma``
    dataset/3_retina_disease/  100 images  -> class ``retina_disease``

The class folders may also sit directly under ``<root>/retina/`` (no ``dataset/`` level).
Images are found at any depth inside each class folder (``.png``, ``.jpg``, ``.jpeg``).

**No patient ids are published.** Each image is therefore treated as its own patient
(``patient`` = ``image``), so a "patient-level" split of Retina is an image-level split: two
photos of the same eye, if the release contains any, could land on different sides. The
``info`` of the index says so (``info["patient_note"]``).

:data:`SOURCE` is where ``dvlib data download retina`` gets it (GitHub's zip of the repository).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dvlib.data.base import DatasetIndex, register, visible_files
from dvlib.data.pad_ufes import IMAGE_EXTS
from dvlib.data.sources import Source, rel, archive_dirs
from dvlib.io import DvlibError

#: official folder name -> class name, in the paper's (and the folders') order
FOLDERS = {
    "1_normal": "normal",
    "2_cataract": "cataract",
    "2_glaucoma": "glaucoma",
    "3_retina_disease": "retina_disease",
}
CLASSES = list(FOLDERS.values())
PATIENT_NOTE = ("no patient ids are published: each image is treated as its own patient, "
                "so patient-level splits are image-level splits")


def class_root(folder: Path) -> Path:
    """The folder holding the four class folders: ``<folder>/dataset`` if present, else ``folder``."""
    inner = folder / "dataset"
    return inner if inner.is_dir() else folder


@register("retina", "Retina fundus photos (yiweichen04/retina_dataset), 4 classes, no patient ids")
def load_retina(folder: Path) -> DatasetIndex:
    base = class_root(folder)
    missing = [f for f in FOLDERS if not (base / f).is_dir()]
    if missing:
        raise DvlibError(f"{base}: missing class folder(s) {missing}; Retina needs "
                         f"{list(FOLDERS)} (under {folder}/dataset/ or directly under {folder}/)")
    rows = []
    empty = []
    for sub, label in FOLDERS.items():
        n0 = len(rows)
        for p in visible_files(base / sub)[0]:  # no .thumbnails or @eaDir copies
            if p.suffix.lower() in IMAGE_EXTS:
                rel = p.relative_to(base / sub).with_suffix("").as_posix()
                image = f"{sub}/{rel}"
                rows.append({"image": image, "patient": image, "label": label, "path": str(p)})
        if len(rows) == n0:
            empty.append(sub)
    if empty:
        raise DvlibError(f"{base}: class folder(s) without images: {empty}")
    records = pd.DataFrame(rows, columns=["image", "patient", "label", "path"])
    info = {"patient_note": PATIENT_NOTE, "layout": str(base)}
    return DatasetIndex("retina", list(CLASSES), records, root=folder, info=info)


# --- download source ----------------------------------------------------------------------------

def arrange(extracted: Path, staging: Path) -> None:
    """GitHub zip ``retina_dataset-master/dataset/<class folders>`` -> ``<staging>/dataset/``."""
    found = [d for f in FOLDERS for d in archive_dirs(extracted, f)]
    if not found:
        raise DvlibError(f"no Retina class folders found in the archive; expected "
                         f"dataset/{{{','.join(FOLDERS)}}}/")
    base = min((d.parent for d in found), key=lambda p: (len(p.parts), str(p)))
    missing = [f for f in FOLDERS if not (base / f).is_dir()]
    if missing:
        raise DvlibError(f"Retina class folder(s) {missing} missing in {rel(base, extracted)} "
                         f"(found {sorted(p.name for p in base.iterdir() if p.is_dir())})")
    staging.mkdir(parents=True)
    os.rename(base, staging / "dataset")


SOURCE = Source(
    name="retina",
    title="Retina dataset (colour fundus photos)",
    urls=("https://github.com/yiweichen04/retina_dataset/archive/refs/heads/master.zip",),
    filename="retina_dataset-master.zip",
    sha256=None,
    archive="zip",
    homepage="https://github.com/yiweichen04/retina_dataset",
    licence="not stated in this registry: no licence was recorded for the repository; check "
            "https://github.com/yiweichen04/retina_dataset before redistributing",
    citation="yiweichen04. Retina dataset. GitHub, https://github.com/yiweichen04/retina_dataset "
             "(reference [23] of the paper).",
    classes={"normal": 300, "cataract": 100, "glaucoma": 101, "retina_disease": 100},
    images=601,
    patients=None,
    patient_note=PATIENT_NOTE,
    layout="retina/dataset/{1_normal,2_cataract,2_glaucoma,3_retina_disease}/*.png",
    arrange=arrange,
    notes=("Counts from the paper's Appendix A.3.",
           "GitHub archive zips are generated on the fly and not guaranteed byte-stable."),
)
