"""PAD-UFES-20 (Pacheco et al. 2020): smartphone photos of skin lesions, 6 diagnoses.

Official layout: ``metadata.csv`` and images anywhere under ``images/`` (the release splits them
over ``imgs_part_1..3``). Images are matched to ``img_id`` by file stem, so re-encoded copies
(``.jpg`` for ``.png``) work. Label = ``diagnostic``; patient = ``patient_id``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dvlib.data.base import DatasetIndex, register
from dvlib.io import DvlibError

CLASSES = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
REQUIRED = ("patient_id", "img_id", "diagnostic")
IMAGE_EXTS = {".png", ".jpg", ".jpeg"}


def find_images(folder: Path) -> dict[str, Path]:
    """Map file stem -> path for every image under ``folder`` (any depth)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not p.name.startswith("."):
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
