"""A user's own images: one sub-folder per class. Patient = file stem unless a CSV says otherwise.

The optional ``patients.csv`` (columns ``image``, ``patient``; ``image`` is the file stem) maps
images to patients so that splits keep a patient's images together.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dvlib.data.base import DatasetIndex, register
from dvlib.data.pad_ufes import IMAGE_EXTS
from dvlib.io import DvlibError


@register("imagefolder", "your own images: <root>/imagefolder/<class>/*.png|jpg (+ optional patients.csv)")
def load_imagefolder(folder: Path, patients_csv: str | None = None, strict: bool = False) -> DatasetIndex:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DvlibError(f"{folder}: needs at least 2 class sub-folders, found {classes}")
    rows = []
    for c in classes:
        for p in sorted((folder / c).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                rows.append({"image": f"{c}/{p.stem}", "patient": p.stem, "label": c, "path": str(p)})
    empty = [c for c in classes if not any(r["label"] == c for r in rows)]
    if empty:
        raise DvlibError(f"{folder}: class folders without images: {empty}")
    records = pd.DataFrame(rows)
    csv = Path(patients_csv) if patients_csv else folder / "patients.csv"
    info: dict = {}
    if csv.exists():
        table = pd.read_csv(csv, dtype=str)
        if not {"image", "patient"} <= set(table.columns):
            raise DvlibError(f"{csv}: needs columns image, patient; has {list(table.columns)}")
        mapping = dict(zip(table["image"].map(lambda s: Path(s).stem), table["patient"]))
        stems = records["path"].map(lambda s: Path(s).stem)
        known = stems.isin(mapping.keys())
        info["images_without_patient"] = int((~known).sum())
        if strict and not known.all():
            raise DvlibError(f"{csv}: {int((~known).sum())} images have no patient row, "
                             f"e.g. {stems[~known].iloc[0]!r}")
        records.loc[known, "patient"] = stems[known].map(mapping)
    return DatasetIndex(folder.name, classes, records, root=folder, info=info)
