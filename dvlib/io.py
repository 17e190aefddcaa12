"""Small I/O helpers shared by every module: the user-facing error, atomic writes, hashing, JSON.

Every file dvlib writes goes through :func:`atomic_path`: a hidden temporary file next to the target,
renamed onto it only when complete. A temporary file left by a killed writer carries that writer's
machine and process id in its name and is removed by the next write into the same folder on that
machine. Inside
:func:`all_or_nothing` the renames wait until the whole group is written, so a command that writes
several files (an evaluation's CSV, JSON and PNG) leaves all of them or none. Every failed write
(a read-only folder, a full disk, a folder path through a file) is a :class:`DvlibError` naming
the file; the temporary file is gone.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".dvlib-tmp"
# .<target name>.h<host hash>.pid<writer pid>.<mkstemp's random part><the target's suffix>.dvlib-tmp: a pid
# means something on its own machine only (a folder may be shared between machines)
_TMP_TAIL = r"\.pid(\d+)\.[A-Za-z0-9_]+(?:\.[^./]+)*" + re.escape(TMP_SUFFIX) + r"$"
_TMP_NAME = re.compile(r"^\..+\.h([0-9a-f]{8})" + _TMP_TAIL)
_OLD_TMP_NAME = re.compile(r"^\..+()" + _TMP_TAIL)  # before the host was recorded: taken as this machine's
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust writers (safetensors) report an OSError
_GROUP: contextvars.ContextVar[list | None] = contextvars.ContextVar("dvlib_write_group", default=None)


class DvlibError(ValueError):
    """A user-facing error: bad input, missing file, incompatible artifacts, failed write.

    The message always names the culprit (file, key or value); the command line prints it and exits 2.
    """


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # somebody else's live process / not a pid of this system
        return True
    return True


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a dvlib temporary file's name (see :func:`atomic_path`)."""
    return (_TMP_NAME.match(name) or _OLD_TMP_NAME.match(name)) is not None


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete dvlib temporary files in ``folder`` whose writer process no longer runs."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_NAME.match(p.name) or _OLD_TMP_NAME.match(p.name)
        if not m or m.group(1) not in ("", _HOST):  # not a temporary file, or another machine's writer's
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


_WHY = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
        errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
        errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large", errno.EISDIR: "it is a folder",
        errno.ENAMETOOLONG: "file name too long", errno.EIO: "input/output error"}


def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (a file in the folder path)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _write_error(path: Path, e: OSError | int) -> DvlibError:
    code = e if isinstance(e, int) else e.errno
    blocker = _blocking_file(path) if code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT) else None
    if blocker is not None:
        why = f"{blocker} is a file, not a folder"
    else:
        why = _WHY.get(code) or (os.strerror(code) if isinstance(e, int) else (e.strerror or str(e)))
    return DvlibError(f"{path}: cannot write ({why}); nothing was written")


def _os_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of a writer's own error type that wraps one (safetensors)."""
    if isinstance(e, OSError):
        return e.errno
    m = _OS_ERROR.search(str(e))
    return int(m.group(1)) if m and "I/O error" in str(e) else None


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or a DvlibError if no file can be written there: it is a folder, or its
    folder path runs through a file. Commands call it before their work, :func:`atomic_path` again."""
    path = Path(path)
    if path.is_dir():
        raise DvlibError(f"{path}: is a folder; give a file name")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise DvlibError(f"{path}: cannot write ({blocker} is a file, not a folder); nothing was written")
    return path


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Group the writes of a block: every :func:`atomic_path` in it renames only when the whole
    block has succeeded; if anything fails, every temporary file is removed and no target is touched."""
    if _GROUP.get() is not None:  # nested: the outer group decides
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _GROUP.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _GROUP.reset(token)
    done: list[Path] = []
    for i, (tmp, target) in enumerate(pending):
        try:
            os.replace(tmp, target)
            done.append(target)
        except OSError as e:
            for t, _ in pending[i:]:
                t.unlink(missing_ok=True)
            for t in done:  # a half-renamed group would mix new and old files
                t.unlink(missing_ok=True)
            raise _write_error(target, e) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Nothing half-written is ever left: on any error (a full disk included) the temporary file is
    removed, and an OS error (also one a writer library wraps in its own type) becomes a
    :class:`DvlibError` naming ``path``. ``mode``: the file's permissions (default: what ``open()``
    would give under the umask). Inside :func:`all_or_nothing` the rename waits for the group.
    """
    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.h{_HOST}.pid{os.getpid()}.",
                                   suffix=(suffix or "") + TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from None
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    group = _GROUP.get()
    try:
        yield tmp_path
        # mkstemp makes 0600 files; results are meant to be shared: the usual mode, as open() makes it
        os.chmod(tmp_path, (0o666 & ~umask) if mode is None else mode)
        if group is None:
            os.replace(tmp_path, path)
        else:
            group.append((tmp_path, path))
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        code = _os_errno(e) if isinstance(e, Exception) and not isinstance(e, DvlibError) else None
        if code is not None:
            raise _write_error(path, code if not isinstance(e, OSError) else e) from None
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DvlibError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise DvlibError(f"{path}: cannot read ({e.strerror or e})") from None


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
        raise DvlibError(f"{path}: not a readable CSV ({type(e).__name__}: {str(e).strip()})") from None
    except OSError as e:
        raise DvlibError(f"{path}: cannot read ({e.strerror or e})") from None


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
