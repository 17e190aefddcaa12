"""One step of ``dvlib run``: a notebook executed into the report folder, kept only if it succeeds.

papermill writes into a temporary file beside the report; only a successful execution replaces
``<step>.ipynb`` (then rendered to HTML), and then a completion record ``logs/<step>.done.json``
(the notebook's and result files' sha256) is written. A failed execution is kept as
``<step>.failed.ipynb``, and the earlier notebook, HTML and record are left alone. The record is
removed when the step starts, so a step counts as done (:func:`is_done`) only after a successful
last execution: a failed ``--overwrite`` re-run, or a failed second ``dvlib run`` on the same run,
makes the next invocation run the step again instead of skipping it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from dvlib.io import DvlibError, sha256_file, write_json


def done_record(reports: Path, name: str) -> Path:
    return reports / "logs" / f"{name}.done.json"


def failed_notebook(reports: Path, name: str) -> Path:
    return reports / f"{name}.failed.ipynb"


def is_done(reports: Path, name: str, results: Sequence[Path]) -> bool:
    """Whether the step's last execution succeeded: its record names the notebook on disk (by sha256)
    and every result file it wrote is there."""
    out_nb = reports / f"{name}.ipynb"
    try:
        record = json.loads(done_record(reports, name).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and out_nb.is_file() and record.get("notebook_sha256") == sha256_file(out_nb)
            and all(Path(r).is_file() for r in results))


def mark_done(reports: Path, name: str, results: Sequence[Path], seconds: float) -> Path:
    out_nb = reports / f"{name}.ipynb"
    return write_json(done_record(reports, name), {
        "step": name, "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "seconds": seconds,
        "notebook": out_nb.name, "notebook_sha256": sha256_file(out_nb),
        "results": {Path(r).name: sha256_file(r) for r in results if Path(r).is_file()}})


def execute(src: Path, reports: Path, name: str, parameters: dict, cwd: Path, log) -> Path:
    """Execute ``src`` into ``reports/<name>.ipynb`` (returned) if it succeeds; else keep the execution
    as ``<name>.failed.ipynb`` and raise a :class:`DvlibError` naming the step and the failing cell."""
    import papermill as pm

    out_nb, failed, logfile = reports / f"{name}.ipynb", failed_notebook(reports, name), reports / "logs" / f"{name}.log"
    done_record(reports, name).unlink(missing_ok=True)  # from now on the step is not done until it succeeds
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".running.ipynb", dir=reports)  # one per invocation
    os.close(fd)
    tmp = Path(tmp)
    try:
        _run_notebook(src, tmp, parameters, cwd, logfile, log)
    except BaseException as e:
        written = tmp.exists() and tmp.stat().st_size > 0  # papermill wrote the cells up to the failure
        if written:
            os.replace(tmp, failed)
        tmp.unlink(missing_ok=True)
        kept = f"Executed notebook: {failed}" if written else "papermill wrote no notebook"
        if isinstance(e, pm.PapermillExecutionError):
            raise DvlibError(f"notebook {name} failed in cell {e.cell_index} (execution count {e.exec_count}): "
                             f"{e.ename}: {e.evalue}. {kept}; log: {logfile}") from None
        if isinstance(e, Exception):  # the kernel died, or did not start
            raise DvlibError(f"notebook {name} failed: {type(e).__name__}: {e}. {kept}; log: {logfile}") from None
        raise
    _paths_for_readers(tmp, cwd.parent)
    os.replace(tmp, out_nb)
    failed.unlink(missing_ok=True)  # an earlier failure, now superseded
    return out_nb


def project_relative(path, root: Path) -> str:
    """``path`` relative to the project ``root`` where it lies under it: a published report names no
    folder of the machine that made it."""
    p = Path(path).resolve()
    return p.relative_to(root.resolve()).as_posix() if p.is_relative_to(root.resolve()) else str(path)


def _paths_for_readers(notebook: Path, root: Path) -> None:
    """Papermill records where it read and wrote the notebook: project-relative in what is published."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    pm_meta = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if pm_meta.get(key):
            pm_meta[key] = project_relative(pm_meta[key], root)
    nbformat.write(nb, str(notebook))


def _run_notebook(src: Path, out_nb: Path, parameters: dict, cwd: Path, logfile: Path, log) -> None:
    """papermill in a thread; meanwhile the progress lines its kernel writes are shown as they come.
    The kernel's own stderr (connection warnings) and the cells' output go to ``logfile``."""
    import papermill as pm

    from dvlib.progress import ENV

    progress = logfile.with_suffix(".progress")
    progress.write_text("")
    failure: list[BaseException] = []

    def work():
        try:
            with open(logfile, "w") as lf:
                pm.execute_notebook(str(src), str(out_nb), parameters=parameters, cwd=str(cwd), kernel_name="python3",
                                    progress_bar=False, log_output=True, stdout_file=lf, stderr_file=lf)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            failure.append(e)

    old_env, saved_err = os.environ.get(ENV), os.dup(2)
    os.environ[ENV] = str(progress)
    with open(logfile.with_suffix(".kernel.log"), "w") as kernel_err:
        os.dup2(kernel_err.fileno(), 2)  # the kernel process inherits it: its warnings stay out of the terminal
        try:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            with open(progress) as f:
                while thread.is_alive() or f.tell() < progress.stat().st_size:
                    line = f.readline()
                    if line:
                        log(f"       {line.rstrip()}")
                    else:
                        thread.join(0.5)
        finally:
            os.dup2(saved_err, 2)
            os.close(saved_err)
            if old_env is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = old_env
    if failure:
        raise failure[0]


TEST_MARKER = "# NBVAL_"  # nbval's cell markers (# NBVAL_CHECK_OUTPUT ...): for the tests, not the reader


def notebook_title(nb, fallback: str) -> str:
    """The notebook's ``metadata.title``, else its first Markdown heading, else ``fallback``."""
    title = nb.metadata.get("title")
    if title:
        return str(title)
    for c in nb.cells:
        if c.cell_type == "markdown":
            for line in c.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


def for_readers(nb):
    """A copy of ``nb`` with the test markers taken out of the code cells (the notebook file keeps them)."""
    import copy

    nb = copy.deepcopy(nb)
    for c in nb.cells:
        if c.cell_type == "code" and TEST_MARKER in c.source:
            c.source = "\n".join(line for line in c.source.split("\n") if not line.lstrip().startswith(TEST_MARKER))
    return nb


def to_html(notebook: str | os.PathLike) -> Path:
    """``<notebook>.html`` beside it, titled after the notebook, without the test markers."""
    import nbformat
    from nbconvert import HTMLExporter

    from dvlib.io import write_text

    nb = nbformat.read(str(notebook), as_version=4)
    title = notebook_title(nb, Path(notebook).stem)
    body, _ = HTMLExporter().from_notebook_node(for_readers(nb), resources={"metadata": {"name": title}})
    return write_text(Path(notebook).with_suffix(".html"), body)
