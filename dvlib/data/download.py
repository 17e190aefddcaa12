"""Download, verify and describe the paper's three datasets (Retina, Bladder, PAD-UFES-20).

:data:`SOURCES` is the source registry: for each dataset the public URL(s), the archive's
sha256 (``None`` where nobody has computed it yet), the archive type, how the archive is
rearranged into the loader's layout, the licence, the citation and the published counts.

:func:`download` -- resumable HTTP download into ``<root>/.downloads/<name>/<file>.part``
(``Range`` requests; a rerun after an interruption continues where it stopped), sha256 check,
extraction into a temporary folder inside ``<root>``, rearrangement and validation (the
dataset's own loader must accept it), then one rename into ``<root>/<name>/``. A failed
download, hash check, extraction or validation never leaves a ``<root>/<name>/`` folder: only
an *interrupted* transfer keeps its ``.part`` file (that is what makes resuming possible); a
file that fails the hash check or does not extract is deleted.

**Unknown hashes.** None of the three archives' sha256 is recorded in this registry (no copy was
available when it was written, and a hash is never claimed without computing it). When neither
the registry nor the caller (``sha256=`` / ``--sha256``) provides one, :func:`download` refuses
before downloading anything unless hash checking is switched off (``verify_hash=False`` /
``--no-verify-hash``). Either way the hash of what was downloaded is computed, printed and
recorded in ``<root>/<name>/SOURCE.json`` together with whether it was checked, so a later
download can be pinned to it with ``--sha256``. GitHub's generated archives (Retina) are not
guaranteed byte-stable, so a pinned hash for them may need refreshing.

A manually downloaded archive can be installed with ``url="file:///path/to/archive.zip"``.

:func:`verify` counts images per class and patients in what is on disk and compares them with
the published numbers; :func:`info` returns source, licence, citation and counts.
"""
from __future__ import annotations

import datetime as _dt
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlparse

import pandas as pd

from dvlib.data import bladder as _bladder
from dvlib.data import retina as _retina
from dvlib.data.base import DATASETS, data_root, load_dataset
from dvlib.data.paper import PAPER_RESULTS
from dvlib.io import DvlibError, read_json, sha256_file, write_json

DOWNLOADS = ".downloads"
SOURCE_FILE = "SOURCE.json"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from and what it should contain once downloaded."""

    name: str
    title: str
    urls: tuple[str, ...]
    filename: str
    sha256: str | None
    archive: str                      # "zip" or "tar" (the content is sniffed anyway)
    homepage: str
    licence: str
    citation: str
    classes: dict[str, int | None]    # published images per class (None: not published)
    images: int                       # published number of images
    patients: int | None              # published number of patients (None: no patient ids)
    patient_note: str
    layout: str
    arrange: Callable[[Path, Path], None]   # (extracted archive folder, staging folder)
    notes: tuple[str, ...] = field(default_factory=tuple)


# --- rearranging archives into the loaders' layouts ------------------------------------------

def _visible_dirs(top: Path, name: str) -> list[Path]:
    hits = [p for p in top.rglob(name) if p.is_dir() and "__MACOSX" not in p.parts]
    return sorted(hits, key=lambda p: (len(p.parts), str(p)))


def _visible_files(top: Path, name: str) -> list[Path]:
    hits = [p for p in top.rglob(name) if p.is_file() and "__MACOSX" not in p.parts]
    return sorted(hits, key=lambda p: (len(p.parts), str(p)))


def _rel(p: Path, top: Path) -> str:
    r = p.relative_to(top).as_posix()
    return "the archive's top level" if r == "." else f"{r}/"


def _arrange_retina(extracted: Path, staging: Path) -> None:
    """GitHub zip ``retina_dataset-master/dataset/<class folders>`` -> ``<staging>/dataset/``."""
    found = [d for f in _retina.FOLDERS for d in _visible_dirs(extracted, f)]
    if not found:
        raise DvlibError(f"no Retina class folders found in the archive; expected "
                         f"dataset/{{{','.join(_retina.FOLDERS)}}}/")
    base = min((d.parent for d in found), key=lambda p: (len(p.parts), str(p)))
    missing = [f for f in _retina.FOLDERS if not (base / f).is_dir()]
    if missing:
        raise DvlibError(f"Retina class folder(s) {missing} missing in {_rel(base, extracted)} "
                         f"(found {sorted(p.name for p in base.iterdir() if p.is_dir())})")
    staging.mkdir(parents=True)
    os.rename(base, staging / "dataset")


def _arrange_bladder(extracted: Path, staging: Path) -> None:
    """Zenodo zip ``baldder_tissue_classification/{HGC,LGC,NST,NTL}/, annotations.csv`` -> staging."""
    hits = _visible_files(extracted, _bladder.CSV_NAME)
    if not hits:
        csvs = [p.relative_to(extracted).as_posix() for p in _visible_files(extracted, "*.csv")]
        raise DvlibError(f"no {_bladder.CSV_NAME} (the bladder annotation CSV) in the archive"
                         + (f"; CSV files found: {csvs}" if csvs else ""))
    os.rename(hits[0].parent, staging)


def _arrange_pad_ufes(extracted: Path, staging: Path) -> None:
    """Mendeley zip ``metadata.csv, images/imgs_part_{1,2,3}.zip`` -> staging with zips unpacked."""
    hits = _visible_files(extracted, "metadata.csv")
    if not hits:
        raise DvlibError("no metadata.csv (PAD-UFES-20 metadata) in the archive")
    base = hits[0].parent
    images = base / "images"
    if not images.is_dir():
        raise DvlibError(f"no images/ folder next to metadata.csv in {_rel(base, extracted)}")
    for inner in sorted(images.glob("*.zip")):
        _extract(inner, images, label=f"{inner.name} (inside the archive)")
        inner.unlink()
    os.rename(base, staging)


# --- the registry -----------------------------------------------------------------------------

SOURCES: dict[str, Source] = {
    "retina": Source(
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
        patient_note=_retina.PATIENT_NOTE,
        layout="retina/dataset/{1_normal,2_cataract,2_glaucoma,3_retina_disease}/*.png",
        arrange=_arrange_retina,
        notes=("Counts from the paper's Appendix A.3.",
               "GitHub archive zips are generated on the fly and not guaranteed byte-stable."),
    ),
    "bladder": Source(
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
        classes={c: None for c in _bladder.CLASSES},
        images=1754,
        patients=23,
        patient_note="patient = case number (split by case, never by frame)",
        layout="bladder/annotations.csv + bladder/{HGC,LGC,NST,NTL}/*.png "
               "(the zip's baldder_tissue_classification/ folder, upstream spelling)",
        arrange=_arrange_bladder,
        notes=("Totals (1754 frames, 23 patients) from the paper's Appendix A.1; per-class counts "
               "are not given there, so verify compares totals only.",),
    ),
    "pad_ufes_20": Source(
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
        arrange=_arrange_pad_ufes,
        notes=("Counts: 2298 images of 1373 patients (paper Appendix A.2); per-class counts from "
               "the official metadata.csv.",
               "The Mendeley 'download all' link is generated by Mendeley and may change; the "
               "landing page is the homepage."),
    ),
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DvlibError(f"no download source for dataset {name!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[name]


# --- download ---------------------------------------------------------------------------------

class _ConnectError(DvlibError):
    """Nothing was transferred (bad URL, refused connection, HTTP error): try the next URL."""


def _filename_for(src: Source, url: str | None) -> str:
    if not url:
        return src.filename
    name = PurePosixPath(urlparse(url).path).name
    return name if name and name not in (".", "..") else src.filename


def partial_path(name: str, root: str | os.PathLike | None = None, url: str | None = None) -> Path:
    """Where :func:`download` keeps the archive while it downloads (``<root>/.downloads/<name>/<file>.part``)."""
    src = get_source(name)
    base = Path(root) if root is not None else data_root()
    return base / DOWNLOADS / name / (_filename_for(src, url) + ".part")


def _check_hex(sha: str) -> str:
    s = sha.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise DvlibError(f"--sha256 must be 64 hexadecimal characters, got {sha!r}")
    return s


def _fetch(url: str, part: Path, progress: bool, timeout: float, _retry: bool = True) -> None:
    """Download ``url`` into ``part``, resuming from its current size with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    from dvlib import __version__

    req = urllib.request.Request(url, headers={"User-Agent": f"dvlib/{__version__}"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:          # nothing left to fetch: the .part is already whole
            return
        raise _ConnectError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise _ConnectError(f"{url}: cannot download ({reason})") from None
    with resp:
        status = getattr(resp, "status", None) or 200
        total = None
        if have and status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                if not _retry:
                    raise DvlibError(f"{url}: the server answered the resume request with a wrong "
                                     f"Content-Range {resp.headers.get('Content-Range')!r}")
                resp.close()
                part.unlink()
                return _fetch(url, part, progress, timeout, _retry=False)
            mode = "ab"
            total = int(m.group(2)) if m.group(2) != "*" else None
        else:                                # 200: whole file (server ignored or got no Range)
            mode, have = "wb", 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        from tqdm import tqdm

        failure = None
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[:-len(".part")],
                                         disable=not progress, leave=False) as bar:
            try:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as e:
                failure = e
        size = part.stat().st_size
        if failure is not None or (total is not None and size < total):
            why = f" ({type(failure).__name__}: {failure})" if failure is not None else ""
            raise DvlibError(f"{url}: download interrupted at {size} of {total if total else '?'} "
                             f"bytes{why}; the partial file {part} is kept: run the same command "
                             f"again to resume")


def _fetch_any(urls: tuple[str, ...], part: Path, progress: bool, timeout: float) -> str:
    errors = []
    for url in urls:
        try:
            _fetch(url, part, progress, timeout)
            return url
        except _ConnectError as e:
            errors.append(str(e))
    raise DvlibError("download failed: " + "; ".join(errors))


def _safe_target(dest: Path, member: str, label: str) -> Path:
    target = (dest / member).resolve()
    root = dest.resolve()
    if target != root and root not in target.parents:
        raise DvlibError(f"{label}: refusing to extract {member!r} outside the target folder")
    return target


def _extract(archive: Path, dest: Path, label: str | None = None) -> None:
    """Extract a zip or tar archive into ``dest``; any corruption is a DvlibError naming the file."""
    label = label or archive.name
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for m in z.infolist():
                    _safe_target(dest, m.filename, label)
                z.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                if hasattr(tarfile, "data_filter"):
                    t.extractall(dest, filter="data")
                else:  # pragma: no cover  (Python < 3.11.4)
                    for m in t.getmembers():
                        _safe_target(dest, m.name, label)
                        if m.issym() or m.islnk():
                            raise DvlibError(f"{label}: refusing to extract the link {m.name!r}")
                    t.extractall(dest)
        else:
            raise DvlibError(f"{label}: not a zip or tar archive (truncated or corrupt download?)")
    except DvlibError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, ValueError) as e:
        raise DvlibError(f"{label}: corrupt or truncated archive ({type(e).__name__}: {e})") from e


def _validate(src: Source, staging: Path) -> dict:
    """Run the dataset's loader on the staged folder; it must index at least one image."""
    index = DATASETS[src.name].build(staging)
    if len(index) == 0:
        raise DvlibError(f"the {src.name} loader found no images in the extracted archive")
    return index.summary()


def _prune(path: Path, stop: Path) -> None:
    """Remove ``path`` and its parents up to (not including) ``stop`` while they are empty."""
    stop = stop.resolve()
    p = path.resolve()
    while p != stop and stop in p.parents:
        try:
            p.rmdir()
        except OSError:
            return
        p = p.parent


def download(name: str, root: str | os.PathLike | None = None, url: str | None = None,
             progress: bool = True, sha256: str | None = None, verify_hash: bool = True,
             timeout: float = 60.0) -> Path:
    """Download, check, extract and install dataset ``name`` as ``<root>/<name>/``; return that path.

    ``root`` defaults to :func:`~dvlib.data.base.data_root`. ``url`` replaces the registry's
    URL(s) (any urllib URL, including ``file://``). ``sha256`` is the expected hash of the
    archive (overrides the registry's). With no expected hash known, the call refuses unless
    ``verify_hash=False``; then the hash is only computed, printed and recorded.
    """
    src = get_source(name)
    base = Path(root) if root is not None else data_root()
    dest = base / name
    if dest.exists():
        raise DvlibError(f"{dest} already exists; run `dvlib data verify {name}` to check it, "
                         f"or move it away to download again")
    expected = _check_hex(sha256) if sha256 else src.sha256
    hash_origin = "--sha256" if sha256 else ("dvlib registry" if src.sha256 else None)
    if verify_hash and expected is None:
        raise DvlibError(
            f"no sha256 is known for the {name} archive ({_filename_for(src, url)}): dvlib records "
            f"none it has not computed. Pass --sha256 HEX (Python: sha256=...) if you have the hash "
            f"from a trusted source, or --no-verify-hash (verify_hash=False) to download without a "
            f"check; the computed hash is then printed and recorded in {name}/{SOURCE_FILE}.")
    urls = (url,) if url else src.urls
    filename = _filename_for(src, url)
    part = partial_path(name, root, url)
    created_root = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        used = _fetch_any(urls, part, progress, timeout)
        got = sha256_file(part)
        if verify_hash and got != expected:
            part.unlink()
            raise DvlibError(f"{filename}: sha256 mismatch (downloaded from {used}): expected "
                             f"{expected}, got {got}; the downloaded file was deleted")
        if not verify_hash:
            print(f"{name}: sha256 of {filename} is {got} (NOT checked: --no-verify-hash); "
                  f"recorded in {dest / SOURCE_FILE}", file=sys.stderr)
        size = part.stat().st_size
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base))
        try:
            extracted, staging = tmp / "extracted", tmp / name
            try:
                _extract(part, extracted, label=filename)
                try:
                    src.arrange(extracted, staging)
                except DvlibError as e:
                    raise DvlibError(f"{filename}: {e}") from None
                try:
                    summary = _validate(src, staging)
                except DvlibError as e:   # name paths inside the archive, not the deleted temp folder
                    msg = str(e).replace(f"{staging.parent}{os.sep}", "")
                    raise DvlibError(f"{filename}: {msg}") from None
            except DvlibError as e:
                part.unlink(missing_ok=True)
                raise DvlibError(f"{e} -- nothing was installed in {base}; the downloaded archive "
                                 f"was deleted") from None
            write_json(staging / SOURCE_FILE, {
                "dataset": name, "title": src.title, "url": used, "file": filename, "bytes": size,
                "sha256": got, "sha256_expected": expected if verify_hash else None,
                "sha256_checked": bool(verify_hash), "sha256_from": hash_origin if verify_hash else None,
                "downloaded_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "images_indexed": summary.get("images"), "licence": src.licence,
                "citation": src.citation,
            })
            if dest.exists():
                raise DvlibError(f"{dest} appeared while downloading; left it untouched")
            os.rename(staging, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        part.unlink(missing_ok=True)
    finally:
        if part.exists() and part.stat().st_size == 0:
            part.unlink()
        _prune(part.parent, base)
        if created_root:
            try:
                base.rmdir()          # only succeeds when nothing at all was left behind
            except OSError:
                pass
    return dest


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
    notes: list[str] = []
    info = index.info
    if name == "pad_ufes_20":
        notes.append(f"metadata.csv has {info.get('metadata_rows')} rows; "
                     f"{info.get('rows_without_images')} have no image file here, "
                     f"{info.get('images_without_rows')} image files have no row.")
    if name == "bladder":
        recs = index.records
        notes.append("imaging: " + ", ".join(f"{k} {v}" for k, v in recs["imaging"].value_counts().items()))
        splits = recs["official_split"].replace("", "(none)").value_counts()
        notes.append("official split (information only): "
                     + ", ".join(f"{k} {v}" for k, v in splits.items()))
        if info.get("rows_without_images"):
            notes.append(f"{info['rows_without_images']} rows of the annotation CSV have no image file.")
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
    status = _status(images, patients, src, table)
    return VerifyReport(name=name, folder=folder, status=status, images=images, patients=patients,
                        published_images=src.images, published_patients=src.patients, table=table,
                        notes=notes, source=source)


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
