"""Small I/O helpers shared by every module: the user-facing error, atomic writes, hashing, JSON.

Every file dvlib writes goes through :func:`atomic_path`: a hidden temporary file next to the target,
renamed onto it only when complete. A temporary file left by a killed writer carries that writer's
process id in its name and is removed by the next write into the same folder.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".dvlib-tmp"
_TMP_NAME = re.compile(r"^\..+\.pid(\d+)\.[^.]+" + re.escape(TMP_SUFFIX) + r"$")


class DvlibError(ValueError):
    """A user-facing error: bad input, missing file, incompatible artifacts, failed write.

    The message always names the culprit (file, key or value); the command line prints it and exits 2.
    """


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete dvlib temporary files in ``folder`` whose writer process no longer runs."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_NAME.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _write_error(path: Path, e: OSError) -> DvlibError:
    why = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
           errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or str(e))
    return DvlibError(f"{path}: cannot write ({why}); nothing was written")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Nothing half-written is ever left: on any error (a full disk included) the temporary file is
    removed, and an OS error becomes a :class:`DvlibError` naming ``path``. ``mode``: the file's
    permissions (default: what ``open()`` would give under the umask).
    """
    path = Path(path)
    if path.is_dir():
        raise DvlibError(f"{path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.",
                                   suffix=(suffix or "") + TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from None
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; results are meant to be shared: the usual mode, as open() makes it
        os.chmod(tmp_path, (0o666 & ~umask) if mode is None else mode)
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DvlibError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DvlibError(f"{path}: not valid JSON ({e})") from None


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame atomically (no index column)."""
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def read_csv(path: str | os.PathLike, **kw):
    """``pandas.read_csv`` that names the file when it is missing, empty or not CSV."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DvlibError(f"{path}: file not found")
    try:
        return pd.read_csv(path, **kw)
    except pd.errors.EmptyDataError:
        raise DvlibError(f"{path}: empty file (expected a CSV with a header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DvlibError(f"{path}: not a readable CSV ({e})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
