"""``dvlib run``: execute the numbered notebooks with papermill, render them to HTML.

Notebooks 07 (Flower baselines) and 08 (privacy audit) run only when asked (:data:`EXTRAS`).
Each notebook gets the same parameters (run, preset, dataset, seeds, train_seeds, device, runs_dir,
figures_dir)
and is written, executed, to ``reports/<run>/``; figures go to ``figures/<run>/``. A step whose last
execution succeeded (:func:`dvlib.notebook_step.is_done`: its notebook, completion record and result
files) is skipped unless ``overwrite``. A failing notebook stops the chain with its name and the
failing cell (a :class:`StepFailed`, exit code 2), kept as ``<step>.failed.ipynb``, never in place of
the last good one. Notebook 08's privacy budget is checked before any notebook runs
(:mod:`dvlib.privacy_budget`).
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
from dvlib.notebook_step import execute, is_done, mark_done, project_relative, to_html

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
    # absolute: papermill changes the process's folder to notebooks/ while the progress of its thread is read
    reports = (Path(reports_dir) if reports_dir else root / "reports" / run).resolve()
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
    existed = (Path(runs) / run).exists()
    the_run = open_run(run, preset, seeds=seeds, train_seeds=train_seeds, root=runs, device=device,
                       dataset=dataset, **(extra or {}))
    params = {"run": run, "preset": preset, "dataset": dataset, "seeds": the_run.split_seeds,
              "train_seeds": the_run.train_seeds, "device": device,
              # the defaults as "" (the notebooks' own defaults): no folder of this machine in a published report
              "runs_dir": runs if runs_dir else "", "figures_dir": str(figures.resolve()) if figures_dir else ""}
    try:
        declared = _check_parameters(the_run, params, notebook_params or {}, nb_dir, steps)
    except DvlibError:
        if not existed:  # refused before anything ran: leave no run behind
            shutil.rmtree(the_run.dir, ignore_errors=True)
        raise
    (reports / "logs").mkdir(parents=True, exist_ok=True)
    try:
        with absolute_env_paths():
            records = _execute(the_run, params, declared, notebook_params, nb_dir, reports, steps, overwrite, html, log)
    except StepFailed as e:  # the report says which step failed, and keeps the others' records
        write_json(reports / "steps.json", merge_steps(reports / "steps.json", e.records))
        raise
    default_reports = not reports_dir
    publish_results(the_run, reports / "results", root / "data" / "splits" / run if default_reports else reports / "splits")
    write_json(reports / "steps.json", merge_steps(reports / "steps.json", records))
    return records


class StepFailed(DvlibError):
    """A notebook of the chain failed; ``records``: this invocation's step records, the failed one last."""

    def __init__(self, message: str, records: list[dict]):
        super().__init__(message)
        self.records = records


def _check_parameters(the_run, params: dict, notebook_params: dict, nb_dir: Path, steps) -> dict:
    """Each notebook's declared parameters; refuses unknown ones and (when 08 runs) an invalid
    privacy budget, before any notebook runs."""
    from dvlib.privacy_budget import check_notebook_budget

    declared = {name: notebook_parameters(nb_dir / f"{name}.ipynb") for name, _ in STEPS}
    unknown = sorted(set(notebook_params) - set().union(*declared.values()))
    if unknown:
        raise DvlibError(f"no notebook takes the parameters {unknown}; each notebook's are: "
                         + "; ".join(f"{n}: {', '.join(sorted(set(d) - set(params)))}" for n, d in declared.items()
                                     if set(d) - set(params)))
    if EXTRAS["privacy"] in steps:
        with absolute_env_paths():  # the split may be computed from the data, as notebook 01 will
            check_notebook_budget(the_run, notebook_params)
    return declared


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
    records = []
    for name, outputs in STEPS:
        if steps and name not in steps:
            continue
        out_nb, results = reports / f"{name}.ipynb", [the_run.result(o) for o in outputs]
        if not overwrite and is_done(reports, name, results):
            log(f"[skip] {name}: done (use --overwrite to redo)")
            records.append({"step": name, "status": "skipped", "seconds": 0.0,
                            "output": project_relative(out_nb, nb_dir.parent)})
            continue
        log(f"[run ] {name} ...")
        t0 = time.perf_counter()
        step_params = {**params, **{k: v for k, v in (notebook_params or {}).items() if k in declared[name]}}
        if "lam" in declared[name]:  # 03's literal lam must equal the run's (open_run refuses otherwise)
            step_params["lam"] = the_run.preset.lam
        try:
            execute(nb_dir / f"{name}.ipynb", reports, name, step_params, nb_dir, log)
        except DvlibError as e:
            log(f"[fail] {name}")
            failed = {"step": name, "status": "failed", "seconds": time.perf_counter() - t0, "error": str(e),
                      "output": project_relative(reports / f"{name}.failed.ipynb", nb_dir.parent)}
            raise StepFailed(str(e), records + [failed]) from None
        dt = time.perf_counter() - t0
        if html:
            to_html(out_nb)
        mark_done(reports, name, results, dt)  # last: a step is done only once everything of it is
        log(f"[done] {name} in {dt:.1f} s -> {out_nb}")
        records.append({"step": name, "status": "ran", "seconds": dt, "output": project_relative(out_nb, nb_dir.parent)})
    return records


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
