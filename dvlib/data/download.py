"""Download and install any registered dataset (:data:`SOURCES`, see :mod:`dvlib.data.sources`).

:func:`download` installs ``<root>/<name>/`` in four steps: fetch the archive into
``<root>/.downloads/<name>/<file>.part`` (``Range`` requests: a rerun resumes an interrupted
transfer), check its sha256, extract + arrange + validate it in a staging folder inside ``<root>``
(the dataset's own loader must accept it), and install it with one rename. Only an *interrupted*
transfer leaves something behind (its ``.part``); a failed hash check, extraction or validation
deletes the archive and never leaves a ``<root>/<name>/``. ``url="file:///..."`` installs an
archive downloaded by hand.

Hashes: the registry records no sha256 that nobody has computed. So with no expected hash (from
the registry or ``sha256=`` / ``--sha256``) :func:`download` refuses unless ``verify_hash=False`` /
``--no-verify-hash``; either way the computed hash is recorded in ``<root>/<name>/SOURCE.json``.

This module is also the public face of the registry: :data:`SOURCES`, :func:`get_source` and
(from :mod:`dvlib.data.verify`) :func:`verify`, :func:`info` and :func:`format_info`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import http.client
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlparse

from dvlib.data.base import DATASETS, data_root
from dvlib.data.sources import SOURCE_FILE, SOURCES, Source, extract, get_source
from dvlib.data.verify import VerifyReport, format_info, info, verify
from dvlib.io import DvlibError, sha256_file, write_json

__all__ = ["SOURCES", "SOURCE_FILE", "Source", "VerifyReport", "download", "format_info", "get_source",
           "info", "partial_path", "verify"]

DOWNLOADS = ".downloads"
_CHUNK = 1 << 16


def _filename_for(src: Source, url: str | None) -> str:
    """The archive's file name: the last part of ``url``'s path, else the registry's."""
    if not url:
        return src.filename
    name = PurePosixPath(urlparse(url).path).name
    return name if name and name not in (".", "..") else src.filename


def partial_path(name: str, root: str | os.PathLike | None = None, url: str | None = None) -> Path:
    """Where :func:`download` keeps the archive while it downloads (``<root>/.downloads/<name>/<file>.part``)."""
    src = get_source(name)
    base = Path(root) if root is not None else data_root()
    return base / DOWNLOADS / name / (_filename_for(src, url) + ".part")


# --- download ---------------------------------------------------------------------------------

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
    expected, hash_origin = _expected_hash(src, url, sha256, verify_hash)   # None: not checked
    filename = _filename_for(src, url)
    part = partial_path(name, root, url)
    created_root = not base.exists()
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        used = _fetch_any((url,) if url else src.urls, part, progress, timeout)
        got = _check_hash(part, filename, used, expected, dest)
        with _temp_dir(base, name) as tmp:
            staging, summary = _stage(src, part, filename, tmp, base)
            _install(staging, dest, {
                "dataset": name, "title": src.title, "url": used, "file": filename,
                "bytes": part.stat().st_size, "sha256": got,
                "sha256_expected": expected, "sha256_checked": expected is not None,
                "sha256_from": hash_origin,
                "downloaded_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "images_indexed": summary.get("images"), "licence": src.licence,
                "citation": src.citation,
            })
        part.unlink(missing_ok=True)
    finally:
        _tidy(part, base, created_root)
    return dest


def _expected_hash(src: Source, url: str | None, sha256: str | None,
                   verify_hash: bool) -> tuple[str | None, str | None]:
    """The archive's expected sha256 and where it comes from; refuse when none is known.

    ``(None, None)`` when hash checking is off (a given ``sha256`` must still be well formed).
    """
    if sha256:
        expected, origin = sha256.strip().lower(), "--sha256"
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise DvlibError(f"--sha256 must be 64 hexadecimal characters, got {sha256!r}")
    else:
        expected, origin = src.sha256, ("dvlib registry" if src.sha256 else None)
    if verify_hash and expected is None:
        raise DvlibError(
            f"no sha256 is known for the {src.name} archive ({_filename_for(src, url)}): dvlib records "
            f"none it has not computed. Pass --sha256 HEX (Python: sha256=...) if you have the hash "
            f"from a trusted source, or --no-verify-hash (verify_hash=False) to download without a "
            f"check; the computed hash is then printed and recorded in {src.name}/{SOURCE_FILE}.")
    return (expected, origin) if verify_hash else (None, None)


# --- the steps of download(), in order: fetch, check the hash, stage, install, tidy up -------

class _ConnectError(DvlibError):
    """Nothing was transferred (bad URL, refused connection, HTTP error): try the next URL."""


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
    """Fetch from the first URL that connects and return it; an interrupted transfer stops here."""
    errors = []
    for url in urls:
        try:
            _fetch(url, part, progress, timeout)
            return url
        except _ConnectError as e:
            errors.append(str(e))
    raise DvlibError("download failed: " + "; ".join(errors))


def _check_hash(part: Path, filename: str, used: str, expected: str | None, dest: Path) -> str:
    """Return the archive's sha256; check it against ``expected`` (None: not checked, say so).

    A mismatching file is deleted: resuming cannot repair it.
    """
    got = sha256_file(part)
    if expected is None:
        print(f"{dest.name}: sha256 of {filename} is {got} (NOT checked: --no-verify-hash); "
              f"recorded in {dest / SOURCE_FILE}", file=sys.stderr)
    elif got != expected:
        part.unlink()
        raise DvlibError(f"{filename}: sha256 mismatch (downloaded from {used}): expected "
                         f"{expected}, got {got}; the downloaded file was deleted")
    return got


@contextlib.contextmanager
def _temp_dir(base: Path, name: str) -> Iterator[Path]:
    """A scratch folder inside ``base`` (same file system, so installing is one rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stage(src: Source, part: Path, filename: str, tmp: Path, base: Path) -> tuple[Path, dict]:
    """Extract ``part`` into ``tmp``, arrange it as ``tmp/<name>`` and run the loader on it.

    Return the staged folder and the loader's summary. On failure the archive is deleted.
    """
    extracted, staging = tmp / "extracted", tmp / src.name
    try:
        extract(part, extracted, label=filename)
        try:
            src.arrange(extracted, staging)
            summary = _validate(src, staging)
        except DvlibError as e:   # name paths inside the archive, not the deleted temp folder
            raise DvlibError(f"{filename}: " + str(e).replace(f"{tmp}{os.sep}", "")) from None
    except DvlibError as e:
        part.unlink(missing_ok=True)
        raise DvlibError(f"{e} -- nothing was installed in {base}; the downloaded archive "
                         f"was deleted") from None
    return staging, summary


def _validate(src: Source, staging: Path) -> dict:
    """Run the dataset's loader on the staged folder; it must index at least one image."""
    index = DATASETS[src.name].build(staging)
    if len(index) == 0:
        raise DvlibError(f"the {src.name} loader found no images in the extracted archive")
    return index.summary()


def _install(staging: Path, dest: Path, record: dict) -> None:
    """Record the source in ``SOURCE.json`` and move the staged folder to ``dest`` in one rename."""
    write_json(staging / SOURCE_FILE, record)
    if dest.exists():
        raise DvlibError(f"{dest} appeared while downloading; left it untouched")
    os.rename(staging, dest)


def _tidy(part: Path, base: Path, created_root: bool) -> None:
    """Remove an empty ``.part``, then the empty folders this download created."""
    if part.exists() and part.stat().st_size == 0:
        part.unlink()
    stop, p = base.resolve(), part.parent.resolve()
    while p != stop and stop in p.parents:
        try:
            p.rmdir()
        except OSError:
            break
        p = p.parent
    if created_root:
        try:
            base.rmdir()          # only succeeds when nothing at all was left behind
        except OSError:
            pass
