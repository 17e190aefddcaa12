"""Check an installed dataset against its published counts (:func:`verify`); describe a source (:func:`info`).

Both work on whatever is registered in :data:`~dvlib.data.sources.SOURCES`; a dataset adds its
own lines to the verify report through ``Source.verify_notes``. :mod:`dvlib.data.download`
re-exports them (``from dvlib.data.download import verify, info, format_info``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dvlib.data.base import data_root, load_dataset
from dvlib.data.paper import PAPER_RESULTS
from dvlib.data.sources import SOURCE_FILE, SOURCES, Source, get_source
from dvlib.io import read_json


# --- verify -----------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    """What :func:`verify` found, against the published counts. ``str(report)`` is the text."""

    name: str
    folder: Path
    status: str                      # "complete" | "partial" | "mismatch"
    images: int
    patients: int
    published_images: int
    published_patients: int | None
    table: pd.DataFrame              # index class; columns published, found, diff, patients
    notes: list[str]
    source: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"

    @property
    def partial(self) -> bool:
        return self.status == "partial"

    def counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.table["found"].items()}

    def text(self) -> str:
        src = SOURCES[self.name]
        lines = [f"{self.name}: {src.title} at {self.folder}"]
        pct = 100.0 * self.images / self.published_images if self.published_images else float("nan")
        pat = (f", {self.patients} of {self.published_patients} patients"
               if self.published_patients is not None else "")
        if self.status == "complete":
            lines.append(f"COMPLETE: {self.images} images as published{pat}.")
        elif self.status == "partial":
            lines.append(f"PARTIAL: only {self.images} of the {self.published_images} published images "
                         f"({pct:.1f} %){pat}. This copy is incomplete: results on it are not "
                         f"comparable one to one with the paper's.")
        else:
            lines.append(f"MISMATCH: {self.images} images found, {self.published_images} published{pat}; "
                         f"the per-class counts do not fit the published ones.")
        t = self.table
        w = max([len("class"), len("total")] + [len(str(c)) for c in t.index])

        def num(v):
            return "n/a" if v is None or pd.isna(v) else str(int(v))

        def diff(v):
            return "n/a" if v is None or pd.isna(v) else f"{int(v):+d}"

        lines.append(f"{'class':<{w}}  {'published':>9}  {'found':>6}  {'diff':>6}  {'patients':>8}")
        for c, r in t.iterrows():
            lines.append(f"{str(c):<{w}}  {num(r['published']):>9}  {int(r['found']):>6}  "
                         f"{diff(r['diff']):>6}  {int(r['patients']):>8}")
        lines.append(f"{'total':<{w}}  {self.published_images:>9}  {self.images:>6}  "
                     f"{self.images - self.published_images:>+6}  {self.patients:>8}")
        if self.published_patients is not None:
            lines.append(f"patients: {self.patients} found, {self.published_patients} published "
                         f"({self.patients - self.published_patients:+d})")
        lines.extend(self.notes)
        return "\n".join(lines)

    __str__ = text


def _status(images: int, patients: int, src: Source, table: pd.DataFrame) -> str:
    """``complete`` (as published), ``partial`` (fewer, nothing too many) or ``mismatch``."""
    known = table["diff"].dropna()
    too_many = (known > 0).any() or images > src.images or (
        src.patients is not None and patients > src.patients)
    if too_many:
        return "mismatch"
    if images == src.images and (known == 0).all() and (src.patients is None or patients == src.patients):
        return "complete"
    if images < src.images:
        return "partial"
    return "mismatch"


def verify(name: str, root: str | os.PathLike | None = None) -> VerifyReport:
    """Count images per class and patients on disk and compare them with the published numbers."""
    src = get_source(name)
    index = load_dataset(name, root=root)
    folder = Path(index.root) if index.root is not None else Path(root or data_root()) / name
    counts = index.counts()
    published = pd.Series({c: src.classes.get(c) for c in index.classes}, dtype="Float64")
    table = pd.DataFrame({"published": published.astype("Int64"),
                          "found": counts["images"].astype(int),
                          "patients": counts["patients"].astype(int)})
    table["diff"] = (table["found"] - table["published"]).astype("Int64")
    table = table[["published", "found", "diff", "patients"]]
    table.index.name = "class"
    images = len(index)
    patients = int(index.records["patient"].nunique())
    notes = list(src.verify_notes(index))
    if src.patients is None:
        notes.append(f"patients: {src.patient_note}.")
    if src.classes and all(v is None for v in src.classes.values()):
        notes.append("per-class counts are not published; only the totals are compared.")
    source_file = folder / SOURCE_FILE
    source = None
    if source_file.exists():
        source = read_json(source_file)
        checked = "checked" if source.get("sha256_checked") else "NOT checked against a known hash"
        notes.append(f"source: {source.get('file')} from {source.get('url')}, sha256 {source.get('sha256')} "
                     f"({checked}), downloaded {source.get('downloaded_utc')}.")
    else:
        notes.append(f"source: no {SOURCE_FILE} (not installed by `dvlib data download`).")
    return VerifyReport(name=name, folder=folder, status=_status(images, patients, src, table),
                        images=images, patients=patients, published_images=src.images,
                        published_patients=src.patients, table=table, notes=notes, source=source)


# --- info -------------------------------------------------------------------------------------

def info(name: str) -> dict:
    """Source, licence, citation and published counts of one dataset (plain JSON-able dict)."""
    src = get_source(name)
    paper = PAPER_RESULTS.get(name, {})
    return {
        "name": src.name,
        "title": src.title,
        "homepage": src.homepage,
        "urls": list(src.urls),
        "file": src.filename,
        "archive": src.archive,
        "sha256": src.sha256,
        "sha256_note": ("recorded in the registry" if src.sha256 else
                        "unknown: download needs --sha256 HEX or --no-verify-hash; the computed "
                        "hash is recorded in SOURCE.json"),
        "licence": src.licence,
        "citation": src.citation,
        "published": {"images": src.images, "patients": src.patients, "classes": dict(src.classes)},
        "patients": src.patient_note,
        "layout": src.layout,
        "paper": {"table": paper.get("table"), "full_training": paper.get("full_training")},
        "notes": list(src.notes),
    }


def format_info(d: dict) -> str:
    """:func:`info`'s dict as the text ``dvlib data info`` prints."""
    classes = ", ".join(f"{k} {'n/a' if v is None else v}" for k, v in d["published"]["classes"].items())
    pat = d["published"]["patients"]
    lines = [
        f"{d['name']}: {d['title']}",
        f"  homepage:  {d['homepage']}",
        *[f"  url:       {u}" for u in d["urls"]],
        f"  file:      {d['file']} ({d['archive']})",
        f"  sha256:    {d['sha256'] or '-'} ({d['sha256_note']})",
        f"  licence:   {d['licence']}",
        f"  citation:  {d['citation']}",
        f"  published: {d['published']['images']} images, "
        f"{'no patient ids' if pat is None else f'{pat} patients'}; per class: {classes}",
        f"  patients:  {d['patients']}",
        f"  layout:    {d['layout']}",
    ]
    if d["paper"].get("table"):
        lines.append(f"  paper:     Table {d['paper']['table']}, Full Training {d['paper']['full_training']} %")
    lines += [f"  note:      {n}" for n in d["notes"]]
    return "\n".join(lines)
