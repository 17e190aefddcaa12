"""PAD-UFES-20 (Pacheco et al. 2020): smartphone photos of skin lesions, 6 diagnoses.

Official layout: ``metadata.csv`` and images anywhere under ``images/`` (the release splits them
over ``imgs_part_1..3``). Images are matched to ``img_id`` by file stem, so re-encoded copies
(``.jpg`` for ``.png``) work. Label = ``diagnostic``; patient = ``patient_id``.

:data:`SOURCE` is where ``dvlib data download pad_ufes_20`` gets it (Mendeley's "download all"
zip, whose ``images/imgs_part_*.zip`` are unpacked on install).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dvlib.data.base import DatasetIndex, register, visible_files
from dvlib.data.sources import Source, archive_files, extract, rel
from dvlib.io import DvlibError

CLASSES = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
REQUIRED = ("patient_id", "img_id", "diagnostic")
IMAGE_EXTS = {".png", ".jpg", ".jpeg"}


def find_images(folder: Path) -> dict[str, Path]:
    """Map file stem -> path for every image under ``folder`` (any depth)."""
    found: dict[str, Path] = {}
    for p in visible_files(folder)[0]:  # no .thumbnails or @eaDir copies
        if p.suffix.lower() in IMAGE_EXTS:
            if p.stem in found:
                raise DvlibError(f"two image files share the stem {p.stem!r}: {found[p.stem]} and {p}")
            found[p.stem] = p
    return found


@register("pad_ufes_20", "PAD-UFES-20 skin lesions (smartphone photos), 6 diagnoses")
def load_pad_ufes_20(folder: Path, strict: bool = False) -> DatasetIndex:
    meta_path = folder / "metadata.csv"
    if not meta_path.exists():
        raise DvlibError(f"{meta_path}: missing (PAD-UFES-20 needs metadata.csv and images/)")
    meta = pd.read_csv(meta_path, dtype=str)
    missing_cols = [c for c in REQUIRED if c not in meta.columns]
    if missing_cols:
        raise DvlibError(f"{meta_path}: missing columns {missing_cols}")
    bad = sorted(set(meta["diagnostic"].dropna()) - set(CLASSES))
    if bad:
        raise DvlibError(f"{meta_path}: unknown diagnostic values {bad}; expected {CLASSES}")
    img_dir = folder / "images"
    if not img_dir.is_dir():
        raise DvlibError(f"{img_dir}: missing (PAD-UFES-20 images go anywhere under images/)")
    files = find_images(img_dir)
    meta["stem"] = meta["img_id"].map(lambda s: Path(s).stem)
    has = meta["stem"].isin(files.keys())
    rows_without_images = int((~has).sum())
    images_without_rows = sorted(set(files) - set(meta["stem"]))
    info = {"metadata_rows": len(meta), "rows_without_images": rows_without_images,
            "images_without_rows": len(images_without_rows),
            "partial": rows_without_images > 0}
    if strict and (rows_without_images or images_without_rows):
        raise DvlibError(
            f"{folder}: {rows_without_images} metadata rows have no image file and "
            f"{len(images_without_rows)} image files have no metadata row"
            + (f" (e.g. {images_without_rows[0]})" if images_without_rows else "")
            + "; drop --strict to use what matches")
    m = meta[has]
    records = pd.DataFrame({"image": m["stem"].values, "patient": m["patient_id"].values,
                            "label": m["diagnostic"].values,
                            "path": [str(files[s]) for s in m["stem"]]})
    return DatasetIndex("pad_ufes_20", list(CLASSES), records, root=folder, info=info)


# --- download source ----------------------------------------------------------------------------

def arrange(extracted: Path, staging: Path) -> None:
    """Mendeley zip ``metadata.csv, images/imgs_part_{1,2,3}.zip`` -> staging with zips unpacked."""
    hits = archive_files(extracted, "metadata.csv")
    if not hits:
        raise DvlibError("no metadata.csv (PAD-UFES-20 metadata) in the archive")
    base = hits[0].parent
    images = base / "images"
    if not images.is_dir():
        raise DvlibError(f"no images/ folder next to metadata.csv in {rel(base, extracted)}")
    for inner in sorted(images.glob("*.zip")):
        extract(inner, images, label=f"{inner.name} (inside the archive)")
        inner.unlink()
    os.rename(base, staging)


def verify_notes(index: DatasetIndex) -> list[str]:
    """How metadata rows and image files matched, for ``dvlib data verify``."""
    info = index.info
    return [f"metadata.csv has {info.get('metadata_rows')} rows; "
            f"{info.get('rows_without_images')} have no image file here, "
            f"{info.get('images_without_rows')} image files have no row."]


SOURCE = Source(
    name="pad_ufes_20",
    title="PAD-UFES-20 (smartphone photos of skin lesions)",
    urls=("https://prod-dcd-datasets-cache-zipfiles.s3.eu-west-1.amazonaws.com/zr7vgbcyr2-1.zip",),
    filename="zr7vgbcyr2-1.zip",
    sha256=None,
    archive="zip",
    homepage="https://data.mendeley.com/datasets/zr7vgbcyr2/1",
    licence="CC BY 4.0",
    citation="A. G. C. Pacheco, G. R. Lima, A. S. Salomao, B. Krohling, I. P. Biral, G. G. de Angelo, "
             "F. C. R. Alves Jr, J. G. M. Esgario, A. C. Simora, P. B. C. Castro, et al. PAD-UFES-20: "
             "a skin lesion dataset composed of patient data and clinical images collected from "
             "smartphones. Data in Brief 32:106221, 2020. Mendeley Data, doi:10.17632/zr7vgbcyr2.1.",
    classes={"ACK": 730, "BCC": 845, "MEL": 52, "NEV": 244, "SCC": 192, "SEK": 235},
    images=2298,
    patients=1373,
    patient_note="patient = patient_id (several patients have several images and lesions)",
    layout="pad_ufes_20/metadata.csv + pad_ufes_20/images/imgs_part_{1,2,3}/*.png "
           "(the nested imgs_part_*.zip are unpacked)",
    arrange=arrange,
    notes=("Counts: 2298 images of 1373 patients (paper Appendix A.2); per-class counts from "
           "the official metadata.csv.",
           "The Mendeley 'download all' link is generated by Mendeley and may change; the "
           "landing page is the homepage."),
    verify_notes=verify_notes,
)
