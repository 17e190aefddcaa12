"""Unpack a report made elsewhere (``benchmarks/gpu_report.sh`` on a GPU machine) into this project.

    .venv/bin/python tools/import_report.py report.tar.gz [--root .] [--no-html] [--force]

The archive holds ``reports/<run>/`` (executed notebooks, logs, steps.json, results/*.csv) and
``figures/<run>/``. Only those two kinds of member are accepted (no absolute paths, no ``..``, no
links); an existing ``reports/<run>/`` is kept unless ``--force``. The notebooks are then rendered to
HTML here (the GPU machine has no nbconvert).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvlib.io import DvlibError  # noqa: E402


def members(tar: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], set[str]]:
    """The archive's members, checked: regular files and folders under reports/<run>/ or figures/<run>/."""
    ok, runs = [], set()
    for m in tar.getmembers():
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
            raise DvlibError(f"{tar.name}: refusing member {m.name!r} (absolute, '..', or not a plain file)")
        if len(p.parts) < 2 or p.parts[0] not in ("reports", "figures"):
            raise DvlibError(f"{tar.name}: member {m.name!r} is not under reports/<run>/ or figures/<run>/")
        runs.add(p.parts[1])
        ok.append(m)
    if not ok:
        raise DvlibError(f"{tar.name}: empty archive")
    return ok, runs


def import_report(archive: Path, root: Path = ROOT, html: bool = True, force: bool = False) -> list[Path]:
    if not archive.is_file():
        raise DvlibError(f"{archive}: no such archive")
    with tarfile.open(archive, "r:*") as tar:
        ok, runs = members(tar)
        for run in sorted(runs):
            for kind in ("reports", "figures"):
                dest = root / kind / run
                if dest.exists():
                    if not force:
                        raise DvlibError(f"{dest} exists; pass --force to replace it")
                    shutil.rmtree(dest)
        tar.extractall(root, members=ok, filter="data")
    notebooks = sorted(p for run in runs for p in (root / "reports" / run).glob("*.ipynb"))
    if html:
        from dvlib.pipeline import to_html

        for nb in notebooks:
            to_html(nb)
    return notebooks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", type=Path, help="report.tar.gz from benchmarks/gpu_report.sh")
    ap.add_argument("--root", type=Path, default=ROOT, help="project root (default: this one)")
    ap.add_argument("--no-html", action="store_true", help="do not render the notebooks to HTML")
    ap.add_argument("--force", action="store_true", help="replace reports/<run>/ and figures/<run>/ if present")
    a = ap.parse_args(argv)
    try:
        nbs = import_report(a.archive, a.root, html=not a.no_html, force=a.force)
    except DvlibError as e:
        print(f"import_report: error: {e}", file=sys.stderr)
        return 2
    for nb in nbs:
        print(nb.relative_to(a.root.resolve()) if nb.is_relative_to(a.root.resolve()) else nb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
