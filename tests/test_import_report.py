"""tools/import_report.py: a report archive from a GPU machine lands in reports/ and figures/, and
nothing else is written."""
from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from dvlib.io import DvlibError

_spec = importlib.util.spec_from_file_location("import_report", Path(__file__).parents[1] / "tools" / "import_report.py")
imp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imp)


def _archive(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def _nb() -> bytes:
    return nbformat.writes(new_notebook(cells=[new_code_cell("1 + 1")])).encode()


def test_report_lands_under_reports_and_figures_and_renders(tmp_path):
    arc = _archive(tmp_path / "r.tar.gz", {"reports/r1/01_split_data.ipynb": _nb(),
                                           "reports/r1/results/table.csv": b"a,b\n1,2\n",
                                           "figures/r1/fig.png": b"png"})
    root = tmp_path / "root"
    nbs = imp.import_report(arc, root)
    assert nbs == [root / "reports" / "r1" / "01_split_data.ipynb"]
    assert (root / "reports" / "r1" / "01_split_data.html").stat().st_size > 1000
    assert (root / "reports" / "r1" / "results" / "table.csv").read_text() == "a,b\n1,2\n"
    assert (root / "figures" / "r1" / "fig.png").read_bytes() == b"png"
    with pytest.raises(DvlibError, match=r"reports/r1 exists; pass --force"):
        imp.import_report(arc, root, html=False)
    (root / "reports" / "r1" / "stale.txt").write_text("old")
    imp.import_report(arc, root, html=False, force=True)
    assert not (root / "reports" / "r1" / "stale.txt").exists()


@pytest.mark.parametrize("bad, why", [
    ({"reports/../../evil.txt": b"x"}, "refusing member"),
    ({"/etc/evil.txt": b"x"}, "refusing member"),
    ({"notes/r1/a.txt": b"x"}, "not under reports/<run>/ or figures/<run>/"),
    ({"reports": b"x"}, "not under reports/<run>/ or figures/<run>/"),
])
def test_members_outside_the_report_are_refused_and_nothing_is_written(tmp_path, bad, why):
    arc = _archive(tmp_path / "bad.tar.gz", {"reports/r1/ok.csv": b"1", **bad})
    root = tmp_path / "root"
    with pytest.raises(DvlibError, match=why):
        imp.import_report(arc, root, html=False)
    assert not root.exists() and not (tmp_path / "evil.txt").exists()


def test_links_are_refused(tmp_path):
    arc = _archive(tmp_path / "l.tar.gz", {"reports/r1/ok.csv": b"1"}, links={"reports/r1/x": "/etc/passwd"})
    with pytest.raises(DvlibError, match="not a plain file"):
        imp.import_report(arc, tmp_path / "root", html=False)


def test_cli_reports_errors_with_exit_status_2(tmp_path, capsys):
    assert imp.main([str(tmp_path / "missing.tar.gz"), "--root", str(tmp_path)]) == 2
    assert "missing.tar.gz: no such archive" in capsys.readouterr().err
