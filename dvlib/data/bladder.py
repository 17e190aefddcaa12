"""Endoscopic Bladder Tissue (Lazo et al., IEEE TBME 2023; Zenodo record 7741476).

1754 frames from TURBT procedures of 23 patients, 4 tissue classes: ``HGC`` (high-grade cancer),
``LGC`` (low-grade cancer), ``NST`` (non-suspicious tissue), ``NTL`` (non-tumour lesion,
cystitis). Each frame is White Light Imaging (``WLI``) or Narrow Band Imaging (``NBI``).

Layout under ``<root>/bladder/`` (the Zenodo zip's ``baldder_tissue_classification/`` folder —
the upstream spelling): an annotation CSV, ``annotations.csv``, and the frames anywhere below
(the release puts them in ``HGC/``, ``LGC/``, ``NST/``, ``NTL/``). Frames are matched to CSV
rows by file stem, so re-encoded copies (``.jpg`` for ``.png``) work.

Annotation CSV: if ``annotations.csv`` is absent, the only ``*.csv`` in the folder is used.
Column names are matched after normalisation (lower case, runs of non-alphanumerics -> ``_``)
against these accepted names (first match wins):

=============  ===========================================================================
field          accepted column names (normalised)
=============  ===========================================================================
image          ``image_name``, ``image``, ``img_name``, ``img``, ``image_id``, ``filename``,
               ``file_name``, ``file``, ``frame``, ``frame_name``, ``name``, ``hly``
tissue         ``tissue_type``, ``tissue``, ``label``, ``class``, ``tissue_class``
imaging        ``imaging_type``, ``imaging``, ``imaging_modality``, ``modality``
case           ``case_number``, ``case``, ``case_id``, ``case_no``, ``patient_id``, ``patient``
split          ``sub_dataset``, ``subset``, ``split``, ``dataset``, ``set``, ``partition``,
               ``official_split``
=============  ===========================================================================

``image``, ``tissue``, ``imaging`` and ``case`` are required (a missing one is an error naming
the CSV, the field, the accepted names and the columns found); ``split`` is optional (without it
``official_split`` is empty and ``info["official_split"]`` says so). ``hly`` as an image-name
header is accepted because the released CSV was reported to use it; the exact header of the
Zenodo file was not checked offline. Pass ``columns={"image": "<header>", ...}`` to override.

Records: ``patient`` = case number (hospitals must split by case, never by frame); extra
columns ``imaging`` (``WLI``/``NBI``) and ``official_split`` (``train``/``val``/``test``, the
authors' split, carried as information only).

:data:`SOURCE` is where ``dvlib data download bladder`` gets it (the Zenodo zip).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from dvlib.data.base import DatasetIndex, register
from dvlib.data.pad_ufes import find_images
from dvlib.data.sources import Source, archive_files
from dvlib.io import DvlibError

CLASSES = ["HGC", "LGC", "NST", "NTL"]
IMAGING = ("WLI", "NBI")
CSV_NAME = "annotations.csv"

COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image_name", "image", "img_name", "img", "image_id", "filename", "file_name", "file",
              "frame", "frame_name", "name", "hly"),
    "tissue": ("tissue_type", "tissue", "label", "class", "tissue_class"),
    "imaging": ("imaging_type", "imaging", "imaging_modality", "modality"),
    "case": ("case_number", "case", "case_id", "case_no", "patient_id", "patient"),
    "split": ("sub_dataset", "subset", "split", "dataset", "set", "partition", "official_split"),
}
REQUIRED_FIELDS = ("image", "tissue", "imaging", "case")
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "test": "test", "testing": "test"}


def normalise(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")


def find_csv(folder: Path) -> Path:
    path = folder / CSV_NAME
    if path.exists():
        return path
    csvs = sorted(p for p in folder.glob("*.csv") if not p.name.startswith("."))
    if len(csvs) == 1:
        return csvs[0]
    found = f"found {[p.name for p in csvs]}" if csvs else "found no CSV"
    raise DvlibError(f"{path}: missing (the bladder dataset needs its annotation CSV, "
                     f"{CSV_NAME}, in {folder}; {found})")


def resolve_columns(csv_path: Path, columns: list[str], override: dict[str, str] | None = None
                    ) -> dict[str, str | None]:
    """Map each field (image, tissue, imaging, case, split) to a column of the CSV."""
    by_norm: dict[str, str] = {}
    for c in columns:
        by_norm.setdefault(normalise(c), c)
    out: dict[str, str | None] = {}
    for field, aliases in COLUMN_ALIASES.items():
        if override and field in override:
            col = override[field]
            if col not in columns:
                raise DvlibError(f"{csv_path}: column {col!r} given for {field!r} is not in the CSV; "
                                 f"columns found: {list(columns)}")
            out[field] = col
            continue
        out[field] = next((by_norm[a] for a in aliases if a in by_norm), None)
    missing = [f for f in REQUIRED_FIELDS if out[f] is None]
    if missing:
        detail = "; ".join(f"{f}: one of {list(COLUMN_ALIASES[f])}" for f in missing)
        raise DvlibError(f"{csv_path}: missing column(s) for {missing} ({detail}); "
                         f"columns found: {list(columns)}")
    return out


def _clean_case(v: str) -> str:
    v = str(v).strip()
    return v[:-2] if re.fullmatch(r"\d+\.0", v) else v


@register("bladder", "Endoscopic Bladder Tissue (Lazo et al. 2023), 4 tissue classes, WLI/NBI, 23 cases")
def load_bladder(folder: Path, imaging: str = "both", strict: bool = False,
                 columns: dict[str, str] | None = None) -> DatasetIndex:
    mode = str(imaging).lower()
    if mode not in ("wli", "nbi", "both"):
        raise DvlibError(f"bladder: imaging must be 'wli', 'nbi' or 'both', got {imaging!r}")
    csv_path = find_csv(folder)
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DvlibError(f"{csv_path}: not a readable CSV ({e})") from e
    cols = resolve_columns(csv_path, list(table.columns), columns)
    t = pd.DataFrame({
        "name": table[cols["image"]].str.strip(),
        "label": table[cols["tissue"]].str.strip().str.upper(),
        "imaging": table[cols["imaging"]].str.strip().str.upper(),
        "patient": table[cols["case"]].map(_clean_case),
    })
    if cols["split"] is not None:
        raw = table[cols["split"]].str.strip().str.lower()
        t["official_split"] = raw.map(lambda s: SPLIT_VALUES.get(s, s))
    else:
        t["official_split"] = ""
    t = t[t["name"] != ""]
    for field, allowed in (("label", CLASSES), ("imaging", list(IMAGING))):
        bad = sorted(set(t[field]) - set(allowed))
        if bad:
            col = cols["tissue" if field == "label" else "imaging"]
            raise DvlibError(f"{csv_path}: column {col!r} has unknown values {bad}; expected {allowed}")
    no_case = t["patient"] == ""
    if no_case.any():
        raise DvlibError(f"{csv_path}: {int(no_case.sum())} rows have an empty {cols['case']!r} "
                         f"(case number), e.g. image {t.loc[no_case, 'name'].iloc[0]!r}")
    t["stem"] = t["name"].map(lambda s: Path(s).stem)
    dup = t["stem"][t["stem"].duplicated()]
    if len(dup):
        raise DvlibError(f"{csv_path}: image {dup.iloc[0]!r} is listed more than once")
    files = find_images(folder)
    has = t["stem"].isin(files.keys())
    rows_without_images = int((~has).sum())
    images_without_rows = sorted(set(files) - set(t["stem"]))
    if strict and (rows_without_images or images_without_rows):
        raise DvlibError(
            f"{folder}: {rows_without_images} rows of {csv_path.name} have no image file and "
            f"{len(images_without_rows)} image files have no row"
            + (f" (e.g. {images_without_rows[0]})" if images_without_rows else "")
            + "; drop --strict to use what matches")
    info = {"csv": str(csv_path), "imaging": mode, "csv_rows": len(t),
            "rows_without_images": rows_without_images, "images_without_rows": len(images_without_rows),
            "partial": rows_without_images > 0,
            "columns": {k: v for k, v in cols.items() if v is not None},
            "official_split": ("carried in records['official_split'] (information only)"
                               if cols["split"] else f"no split column in {csv_path.name}"),
            "patient_note": "patient = case number; split by case, never by frame"}
    m = t[has]
    if mode != "both":
        m = m[m["imaging"] == mode.upper()]
    records = pd.DataFrame({"image": m["stem"].values, "patient": m["patient"].values,
                            "label": m["label"].values, "path": [str(files[s]) for s in m["stem"]],
                            "imaging": m["imaging"].values, "official_split": m["official_split"].values})
    return DatasetIndex("bladder", list(CLASSES), records, root=folder, info=info)


# --- download source ----------------------------------------------------------------------------

def arrange(extracted: Path, staging: Path) -> None:
    """Zenodo zip ``baldder_tissue_classification/{HGC,LGC,NST,NTL}/, annotations.csv`` -> staging."""
    hits = archive_files(extracted, CSV_NAME)
    if not hits:
        csvs = [p.relative_to(extracted).as_posix() for p in archive_files(extracted, "*.csv")]
        raise DvlibError(f"no {CSV_NAME} (the bladder annotation CSV) in the archive"
                         + (f"; CSV files found: {csvs}" if csvs else ""))
    os.rename(hits[0].parent, staging)


def verify_notes(index: DatasetIndex) -> list[str]:
    """Imaging modes, the authors' split and CSV rows without a frame, for ``dvlib data verify``."""
    recs = index.records
    notes = ["imaging: " + ", ".join(f"{k} {v}" for k, v in recs["imaging"].value_counts().items())]
    splits = recs["official_split"].replace("", "(none)").value_counts()
    notes.append("official split (information only): " + ", ".join(f"{k} {v}" for k, v in splits.items()))
    if index.info.get("rows_without_images"):
        notes.append(f"{index.info['rows_without_images']} rows of the annotation CSV have no image file.")
    return notes


SOURCE = Source(
    name="bladder",
    title="Endoscopic Bladder Tissue Classification dataset",
    urls=("https://zenodo.org/records/7741476/files/baldder_tissue_classification.zip?download=1",),
    filename="baldder_tissue_classification.zip",
    sha256=None,
    archive="zip",
    homepage="https://zenodo.org/records/7741476",
    licence="not stated in this registry: see the Zenodo record "
            "https://zenodo.org/records/7741476 (not checked offline)",
    citation="J. F. Lazo, B. Rosa, M. Catellani, M. Fontana, F. A. Mistretta, G. Musi, O. de Cobelli, "
             "M. de Mathelin, E. De Momi. Semi-supervised bladder tissue classification in "
             "multi-domain endoscopic images. IEEE Transactions on Biomedical Engineering "
             "70(10):2822-2833, 2023. doi:10.1109/TBME.2023.3265679. Data: Zenodo record 7741476.",
    classes={c: None for c in CLASSES},
    images=1754,
    patients=23,
    patient_note="patient = case number (split by case, never by frame)",
    layout="bladder/annotations.csv + bladder/{HGC,LGC,NST,NTL}/*.png "
           "(the zip's baldder_tissue_classification/ folder, upstream spelling)",
    arrange=arrange,
    notes=("Totals (1754 frames, 23 patients) from the paper's Appendix A.1; per-class counts "
           "are not given there, so verify compares totals only.",),
    verify_notes=verify_notes,
)
