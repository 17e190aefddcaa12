"""Download sources: what a dataset's archive is and how it becomes the loader's layout.

Each dataset module (:mod:`~dvlib.data.retina`, :mod:`~dvlib.data.bladder`,
:mod:`~dvlib.data.pad_ufes`, :mod:`~dvlib.data.odir_fundus`) defines its :class:`Source` next to its loader, and
:mod:`dvlib.data` registers them with :func:`register_source` in the paper's order.
:mod:`dvlib.data.download` works on whatever is in :data:`SOURCES`. This module also holds the
helpers the ``arrange`` functions share (finding folders in an archive, extracting one), so
that neither side imports the other.
"""
from __future__ import annotations

import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dvlib.io import DvlibError

if TYPE_CHECKING:
    from dvlib.data.base import DatasetIndex


def _no_notes(index: DatasetIndex) -> list[str]:
    return []


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from and what it should contain once downloaded."""

    name: str
    title: str
    urls: tuple[str, ...]
    filename: str
    sha256: str | None                # None: nobody has computed it yet (never guessed)
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
    #: extra lines for ``dvlib data verify``, computed from the loaded index; a DvlibError refuses the copy
    verify_notes: Callable[[DatasetIndex], list[str]] = _no_notes


SOURCES: dict[str, Source] = {}
SOURCE_FILE = "SOURCE.json"           # written into <root>/<name>/ by download, read by verify


def register_source(src: Source) -> Source:
    """Add ``src`` to :data:`SOURCES` (replacing one of the same name) and return it."""
    SOURCES[src.name] = src
    return src


def get_source(name: str) -> Source:
    """The registered source of dataset ``name``; a DvlibError lists the valid names."""
    if name not in SOURCES:
        raise DvlibError(f"no download source for dataset {name!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[name]


# --- helpers for the arrange functions --------------------------------------------------------

def archive_dirs(top: Path, name: str) -> list[Path]:
    """Folders called ``name`` under ``top`` (no ``__MACOSX`` copies), shallowest first."""
    hits = [p for p in top.rglob(name) if p.is_dir() and "__MACOSX" not in p.parts]
    return sorted(hits, key=lambda p: (len(p.parts), str(p)))


def archive_files(top: Path, name: str) -> list[Path]:
    """Files matching ``name`` under ``top`` (no ``__MACOSX`` copies), shallowest first."""
    hits = [p for p in top.rglob(name) if p.is_file() and "__MACOSX" not in p.parts]
    return sorted(hits, key=lambda p: (len(p.parts), str(p)))


def rel(p: Path, top: Path) -> str:
    """``p`` as named inside the archive extracted at ``top``, for error messages."""
    r = p.relative_to(top).as_posix()
    return "the archive's top level" if r == "." else f"{r}/"


def _safe_target(dest: Path, member: str, label: str) -> Path:
    target = (dest / member).resolve()
    root = dest.resolve()
    if target != root and root not in target.parents:
        raise DvlibError(f"{label}: refusing to extract {member!r} outside the target folder")
    return target


def extract(archive: Path, dest: Path, label: str | None = None) -> None:
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
