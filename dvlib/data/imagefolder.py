"""A user's own images: one sub-folder per class. Patient = file stem unless a CSV says otherwise.

The optional ``patients.csv`` (columns ``image``, ``patient``; ``image`` is the file stem) maps
images to patients so that splits keep a patient's images together. Hidden files and folders
anywhere under the folder (:func:`dvlib.data.base.is_hidden`: ``.thumbnails/``, ``@eaDir/``,
``__MACOSX/``, ``Thumbs.db``, ``.DS_Store``) are skipped; ``info["hidden_skipped"]`` counts them and
``info["hidden_note"]`` says so, both in :meth:`~dvlib.data.base.DatasetIndex.summary`.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dvlib.data.base import DatasetIndex, count_files, is_hidden, register, visible_files
from dvlib.data.pad_ufes import IMAGE_EXTS
from dvlib.io import DvlibError, read_csv


@register("imagefolder", "your own images: <root>/imagefolder/<class>/*.png|jpg (+ optional patients.csv)")
def load_imagefolder(folder: Path, patients_csv: str | None = None, strict: bool = False) -> DatasetIndex:
    try:
        entries = sorted(folder.iterdir())
        classes = [p.name for p in entries if p.is_dir() and not is_hidden(p.name)]
    except OSError as e:
        raise DvlibError(f"{folder}: cannot read the folder ({e.strerror or e})") from None
    if len(classes) < 2:
        raise DvlibError(f"{folder}: needs at least 2 class sub-folders, found {classes}")
    hidden = sum(count_files(p) for p in entries if is_hidden(p.name))
    rows = []
    for c in classes:  # one walk per class: a class folder may be a symbolic link
        files, n = visible_files(folder / c)
        hidden += n
        rows += [{"image": f"{c}/{p.stem}", "patient": p.stem, "label": c, "path": str(p)}
                 for p in files if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
    empty = [c for c in classes if not any(r["label"] == c for r in rows)]
    if empty:
        raise DvlibError(f"{folder}: class folders without images: {empty}"
                         + (f" ({hidden} hidden files skipped)" if hidden else ""))
    records = pd.DataFrame(rows)
    csv = Path(patients_csv) if patients_csv else folder / "patients.csv"
    # the count reaches the dataset summary; the names stay out (they may name patients)
    info: dict = {}
    if hidden:
        info.update(hidden_skipped=hidden, hidden_note=f"skipped {hidden} hidden files under {folder}")
    if csv.exists():
        table = read_csv(csv, dtype=str, keep_default_na=False)
        if not {"image", "patient"} <= set(table.columns):
            raise DvlibError(f"{csv}: needs columns image, patient; has {list(table.columns)[:10]}")
        blank = table.index[(table["image"].str.strip() == "") | (table["patient"].str.strip() == "")]
        if len(blank):
            raise DvlibError(f"{csv}: row {int(blank[0]) + 2} has an empty image or patient "
                             f"({len(blank)} such rows)")
        stems_csv = table["image"].map(lambda s: Path(s).stem)
        clash = table.assign(stem=stems_csv).groupby("stem")["patient"].nunique()
        if (clash > 1).any():
            raise DvlibError(f"{csv}: image {clash.index[clash > 1][0]!r} is listed with different patients")
        mapping = dict(zip(stems_csv, table["patient"]))
        stems = records["path"].map(lambda s: Path(s).stem)
        known = stems.isin(mapping.keys())
        info["images_without_patient"] = int((~known).sum())
        if strict and not known.all():
            raise DvlibError(f"{csv}: {int((~known).sum())} images have no patient row, "
                             f"e.g. {stems[~known].iloc[0]!r}")
        records.loc[known, "patient"] = stems[known].map(mapping)
    return DatasetIndex(folder.name, classes, records, root=folder, info=info)
