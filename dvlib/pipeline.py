"""``dvlib run``: execute the numbered notebooks with papermill, render them to HTML.

Notebooks 07 (Flower baselines) and 08 (privacy audit) run only when asked (:data:`EXTRAS`).
Each notebook gets the same parameters (run, preset, dataset, seeds, train_seeds, device, runs_dir,
figures_dir)
and is written, executed, to ``reports/<run>/``; figures go to ``figures/<run>/``. A step whose
executed notebook and result files exist is skipped unless ``overwrite``. A failing notebook stops
the chain with its name and the failing cell.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from dvlib.io import DvlibError, write_json

STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("01_split_data", ("shards",)),
    ("02_finetune_hospitals", ("finetune_eval", "finetune_history")),
    ("03_merge", ("merge_eval", "lambda_eval", "bn_policy_eval")),
    ("04_restore_bn", ("restore_eval", "restore_log")),
    ("05_layerwise_similarity", ("layer_cosine",)),
    ("06_results", ("table_accuracy", "table_balanced_accuracy", "ablation_accuracy")),
    ("07_federated", ("federated_eval", "federated_log", "federated_checks")),
    ("08_privacy", ("privacy_audit", "dp_eval", "dp_audit")),
]
# run only when asked (``dvlib run --with federated privacy`` or ``--steps``): hours on a CPU
EXTRAS = {"federated": "07_federated", "privacy": "08_privacy"}
CHAIN = [name for name, _ in STEPS if name not in EXTRAS.values()]  # what runs by default


def notebooks_dir() -> Path:
    """The chain's notebooks: ``$DVLIB_NOTEBOOKS``, else ``notebooks/`` of the project checkout."""
    from dvlib.runs import project_root

    d = Path(os.environ["DVLIB_NOTEBOOKS"]) if os.environ.get("DVLIB_NOTEBOOKS") else project_root() / "notebooks"
    missing = [name for name, _ in STEPS if not (d / f"{name}.ipynb").is_file()]
    if missing:
        raise DvlibError(f"{d}: the notebooks of the chain are not there ({', '.join(missing)}). `dvlib run` runs the "
                         "project's notebooks: run it in a checkout of the dvlib repository (git clone, then "
                         "`pip install -e .`), or set DVLIB_NOTEBOOKS=/path/to/dvlib/notebooks")
    return d


def run_chain(run: str, preset: str = "quick", dataset: str = "", seeds: Sequence[int] = (0,),
              train_seeds: Sequence[int] | None = None, device: str = "auto", runs_dir: str = "",
              reports_dir: str = "", figures_dir: str = "", overwrite: bool = False,
              steps: Sequence[str] | None = None, html: bool = True, extra: dict | None = None,
              notebook_params: dict | None = None, log=print) -> list[dict]:
    """Execute the chain; returns one record per step (name, status, seconds, output).

    ``extra`` are preset overrides (fixed in the run's settings); ``notebook_params`` go to the
    notebooks whose parameters cell declares them (e.g. ``devices`` to 02, ``methods`` to 03).
    """
    from dvlib.runs import open_run, project_root

    root = project_root()
    nb_dir = notebooks_dir()
    reports = Path(reports_dir) if reports_dir else root / "reports" / run
    figures = Path(figures_dir) if figures_dir else root / "figures" / run
    runs = str(Path(runs_dir).resolve()) if runs_dir else str(root / "runs")
    known = [s for s, _ in STEPS]
    if steps:
        bad = [s for s in steps if s not in known]
        if bad:
            raise DvlibError(f"unknown steps {bad}; valid: {known}")
    else:
        steps = CHAIN
    from dvlib.data.base import DATASETS

    if dataset and dataset not in DATASETS and Path(dataset).is_dir():  # a folder: the kernels run in notebooks/
        dataset = str(Path(dataset).resolve())
    # create (or check) the run first so that a settings clash stops before any notebook runs
    the_run = open_run(run, preset, seeds=seeds, train_seeds=train_seeds, root=runs, device=device,
                       dataset=dataset, **(extra or {}))
    params = {"run": run, "preset": preset, "dataset": dataset, "seeds": the_run.split_seeds,
              "train_seeds": the_run.train_seeds, "device": device, "runs_dir": runs,
              "figures_dir": str(figures.resolve())}
    declared = {name: notebook_parameters(nb_dir / f"{name}.ipynb") for name, _ in STEPS}
    unknown = sorted(set(notebook_params or {}) - set().union(*declared.values()))
    if unknown:
        raise DvlibError(f"no notebook takes the parameters {unknown}; each notebook's are: "
                         + "; ".join(f"{n}: {', '.join(sorted(set(d) - set(params)))}" for n, d in declared.items()
                                     if set(d) - set(params)))
    (reports / "logs").mkdir(parents=True, exist_ok=True)
    with absolute_env_paths():
        records = _execute(the_run, params, declared, notebook_params, nb_dir, reports, steps, overwrite, html, log)
    default_reports = not reports_dir
    publish_results(the_run, reports / "results", root / "data" / "splits" / run if default_reports else reports / "splits")
    write_json(reports / "steps.json", merge_steps(reports / "steps.json", records))
    return records


def merge_steps(path: Path, records: list[dict]) -> list[dict]:
    """The report's step records: this invocation's, and an earlier one's for every step not run now
    (``--steps 07_federated`` on a finished chain keeps the chain's times), in notebook order."""
    try:
        earlier = json.loads(Path(path).read_text()) if Path(path).exists() else []
    except (OSError, ValueError) as e:
        raise DvlibError(f"{path}: unreadable step records ({e}); remove it to start them again") from None
    now = {r["step"] for r in records}
    order = [s for s, _ in STEPS]
    kept = [r for r in earlier if isinstance(r, dict) and r.get("step") in order and r["step"] not in now]
    return sorted(kept + records, key=lambda r: order.index(r["step"]))


ENV_PATHS = ("DVLIB_DATA", "DVLIB_RUNS", "DVLIB_RESNET50")


@contextlib.contextmanager
def absolute_env_paths(names: Sequence[str] = ENV_PATHS):
    """Relative paths in these variables (and the default data root) made absolute for the duration:
    the kernels run in notebooks/, so ``DVLIB_DATA=../shared/datasets`` must mean what it meant where
    the user typed it."""
    from dvlib.data.base import data_root

    old = {n: os.environ.get(n) for n in {*names, "DVLIB_DATA"}}
    try:
        for n, v in old.items():
            if v and not os.path.isabs(v):
                os.environ[n] = str(Path(v).resolve())
        os.environ["DVLIB_DATA"] = str(data_root().resolve())  # also the default, data/raw, from here
        yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _execute(the_run, params, declared, notebook_params, nb_dir, reports, steps, overwrite, html, log) -> list[dict]:
    import papermill as pm

    records = []
    for name, outputs in STEPS:
        if steps and name not in steps:
            continue
        out_nb = reports / f"{name}.ipynb"
        done = out_nb.exists() and all(the_run.result(o).exists() for o in outputs)
        if done and not overwrite:
            log(f"[skip] {name}: outputs exist (use --overwrite to redo)")
            records.append({"step": name, "status": "skipped", "seconds": 0.0, "output": str(out_nb)})
            continue
        log(f"[run ] {name} ...")
        t0 = time.perf_counter()
        logfile = reports / "logs" / f"{name}.log"
        step_params = {**params, **{k: v for k, v in (notebook_params or {}).items() if k in declared[name]}}
        try:
            _run_notebook(nb_dir / f"{name}.ipynb", out_nb, step_params, nb_dir, logfile, log)
        except pm.PapermillExecutionError as e:
            raise DvlibError(f"notebook {name} failed in cell {e.cell_index} (execution count {e.exec_count}): "
                             f"{e.ename}: {e.evalue}. Executed notebook: {out_nb}; log: {logfile}") from None
        dt = time.perf_counter() - t0
        if html:
            to_html(out_nb)
        log(f"[done] {name} in {dt:.1f} s -> {out_nb}")
        records.append({"step": name, "status": "ran", "seconds": dt, "output": str(out_nb)})
    return records


def _run_notebook(src: Path, out_nb: Path, parameters: dict, cwd: Path, logfile: Path, log) -> None:
    """papermill in a thread; meanwhile the progress lines its kernel writes are shown as they come.
    The kernel's own stderr (connection warnings) and the cells' output go to ``logfile``."""
    import threading

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


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict]:
    """The names (with type, default and comment) that a notebook's ``parameters`` cell declares."""
    import papermill as pm

    return pm.inspect_notebook(str(path))


def publish_results(run, dest: Path, splits: Path | None = None) -> Path:
    """Copy the run's tidy result files next to the rendered notebooks, so that a reviewer (or
    ``reporting``) can redraw every table and figure from the committed report alone; and the split
    manifests to ``splits`` (``data/splits/<run>/`` for the project's reports), so that anyone can
    check the exact split used."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted((run.dir / "results").glob("*")):
        if f.suffix in (".csv", ".md", ".json", ".gz"):
            shutil.copyfile(f, dest / f.name)
    seeds = {"split_seeds": list(run.split_seeds), "train_seeds": list(run.train_seeds)}
    try:  # a later invocation on some replicates (e.g. --train-seeds 0 for notebook 07) keeps the others
        earlier = json.loads((dest / "run.json").read_text()) if (dest / "run.json").exists() else {}
    except (OSError, ValueError):
        earlier = {}
    if all(earlier.get(k) == v for k, v in run.settings.items()):
        seeds = {k: sorted(set(v) | set(earlier.get(k) or [])) for k, v in seeds.items()}
    write_json(dest / "run.json", {**run.settings, "run": run.name, **seeds})
    if splits is not None:
        splits.mkdir(parents=True, exist_ok=True)
        for s in run.split_seeds:
            if run.manifest_path(s).exists():
                shutil.copyfile(run.manifest_path(s), splits / f"split_{s}.csv")
    return dest


def to_html(notebook: str | os.PathLike) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    from dvlib.io import write_text

    nb = nbformat.read(str(notebook), as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    return write_text(Path(notebook).with_suffix(".html"), body)
