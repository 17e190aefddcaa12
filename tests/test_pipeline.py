"""The papermill chain end to end (smoke preset, synthetic data, CPU) into temporary folders."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from dvlib.io import DvlibError
from dvlib.pipeline import STEPS, run_chain


from tests.conftest import CHAIN_LAMBDAS as LAMBDAS


@pytest.fixture(scope="module")
def chain(smoke_chain):
    return smoke_chain


def test_every_notebook_runs_and_renders(chain):
    base, records = chain
    assert [r["step"] for r in records] == [s for s, _ in STEPS]
    assert all(r["status"] == "ran" for r in records)
    for name, _ in STEPS:
        nb = nbformat.read(str(base / "reports" / f"{name}.ipynb"), as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, name
        assert (base / "reports" / f"{name}.html").stat().st_size > 10_000
        assert (base / "reports" / "logs" / f"{name}.log").exists()


def test_every_result_file_exists_and_parses(chain):
    base, _ = chain
    results = base / "runs" / "t-smoke" / "results"
    for _, outputs in STEPS:
        for o in outputs:
            df = pd.read_csv(results / f"{o}.csv")
            assert len(df) > 0, o
    ev = pd.read_csv(results / "restore_eval.csv")
    assert {"params_mean", "data_vector", "random_vector", "ties", "dare", "weighted", "pretrained"} <= set(ev["method"])
    assert {"none", "recalibrate", "finetune_epoch"} <= set(ev["restore"])
    assert set(ev["eval_on"]) == {"hospital_1", "hospital_2", "hospital_3", "hospital_4", "pooled"}
    assert ev[["accuracy", "balanced_accuracy"]].apply(lambda s: s.between(0, 1)).all().all()
    # the published copy beside the notebooks holds the same tables
    published = base / "reports" / "results"
    assert (published / "table_accuracy.csv").read_text() == (results / "table_accuracy.csv").read_text()
    assert json.loads((published / "run.json").read_text())["preset"] == "smoke"


def test_notebook_parameters_reach_the_notebook_that_declares_them(chain):
    base, _ = chain
    lam = pd.read_csv(base / "runs" / "t-smoke" / "results" / "lambda_eval.csv")
    assert sorted(lam["lam"].unique()) == LAMBDAS
    nb = nbformat.read(str(base / "reports" / "03_merge.ipynb"), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "lambdas = [0.0, 0.25, 0.5, 1.0]" in injected[0].source
    nb2 = nbformat.read(str(base / "reports" / "02_finetune_hospitals.ipynb"), as_version=4)
    injected = [c for c in nb2.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "lambdas" not in injected[0].source  # 02 does not declare it, so it does not get it


def test_every_notebook_parameter_is_a_run_flag():
    """The notebooks' parameters cells and `dvlib run` use the same names (``runs_dir`` = ``--runs-dir``)."""
    from dvlib.cli import build_parser
    from dvlib.cli.run_cmd import NOTEBOOK_PARAMS
    from dvlib.pipeline import notebook_parameters, notebooks_dir

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    flags = {a.dest for a in run_parser._actions}
    declared = set()
    for name, _ in STEPS:
        params = notebook_parameters(notebooks_dir() / f"{name}.ipynb")
        assert set(params) <= flags, (name, set(params) - flags)
        assert all(p["help"] for p in params.values()), f"{name}: every parameter has a comment"
        declared |= set(params)
    assert set(NOTEBOOK_PARAMS) <= declared


def test_federated_and_privacy_notebooks_run_only_when_asked(monkeypatch, tmp_path):
    """``dvlib run`` runs 01-06; ``--with federated privacy`` adds 07 and 08 after them."""
    import dvlib.pipeline as pipeline
    from dvlib.cli import main

    asked = []
    monkeypatch.setattr(pipeline, "run_chain", lambda *a, **kw: asked.append(kw["steps"]) or [])
    common = ["run", "--preset", "smoke", "--runs-dir", str(tmp_path)]
    assert main(common) == 0 and main(common + ["--with", "privacy", "federated"]) == 0
    assert main(common + ["--steps", "03_merge", "--with", "privacy"]) == 0
    assert asked == [None, pipeline.CHAIN + ["08_privacy", "07_federated"], ["03_merge", "08_privacy"]]
    assert pipeline.CHAIN == [s for s, _ in STEPS][:6]
    seen = []  # and run_chain itself, given no steps, executes the main chain only
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "_execute", lambda the_run, params, declared, nbp, nb_dir, reports, steps, *a:
                        seen.append(list(steps)) or [])
    pipeline.run_chain("t-default", "smoke", seeds=[0], device="cpu", runs_dir=str(tmp_path / "runs"),
                       reports_dir=str(tmp_path / "reports"), figures_dir=str(tmp_path / "figures"), log=lambda *_: None)
    assert seen == [pipeline.CHAIN]


def test_unknown_notebook_parameter_is_refused_before_any_notebook_runs(tmp_path):
    with pytest.raises(DvlibError, match=r"no notebook takes the parameters \['lamdbas'\].*03_merge: lam, lambdas, methods"):
        run_chain("t-typo", "smoke", seeds=[0], device="cpu", runs_dir=str(tmp_path / "runs"),
                  reports_dir=str(tmp_path / "reports"), figures_dir=str(tmp_path / "figures"),
                  notebook_params={"lamdbas": [0.5]}, log=lambda *_: None)
    assert not list((tmp_path / "reports").glob("*.ipynb"))


# the figures each executed notebook must show, whatever the matplotlib backend (CI sets MPLBACKEND=Agg)
FIGURES_SHOWN = {"01_split_data": 1, "02_finetune_hospitals": 1, "03_merge": 1, "05_layerwise_similarity": 1,
                 "06_results": 2, "07_federated": 2, "08_privacy": 2}


def test_every_notebook_that_draws_shows_its_figures(chain):
    base, _ = chain
    for name, _ in STEPS:
        nb = nbformat.read(str(base / "reports" / f"{name}.ipynb"), as_version=4)
        shown = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
        assert shown == FIGURES_SHOWN.get(name, 0), (name, shown)


def test_reports_carry_no_progress_noise_or_warnings(chain):
    base, _ = chain
    for name, _ in STEPS:
        nb = nbformat.read(str(base / "reports" / f"{name}.ipynb"), as_version=4)
        stderr = [o["text"] for c in nb.cells for o in c.get("outputs", [])
                  if o.get("output_type") == "stream" and o.get("name") == "stderr"]
        assert not stderr, (name, stderr[:2])
        progress = (base / "reports" / "logs" / f"{name}.progress").read_text()
        if name == "02_finetune_hospitals":  # the progress went to the terminal's feed instead
            assert "hospital_1 (split 0, train 0): epoch 8/8" in progress and "ETA" in progress


def test_figures_written(chain):
    base, _ = chain
    for name in ("fig2_layerwise_cosine", "lambda_curve", "shards", "training"):
        for ext in ("png", "pdf"):
            assert (base / "figures" / f"{name}.{ext}").stat().st_size > 1000


def test_figures_redraw_from_result_files_alone(chain, tmp_path):
    from dvlib import reporting

    base, _ = chain
    published = base / "reports" / "results"  # no checkpoints here
    reporting.plot_layer_cosine(published, tmp_path / "fig2")
    reporting.plot_lambda_curve(published, out=tmp_path / "lam")
    assert (tmp_path / "fig2.png").exists() and (tmp_path / "lam.pdf").exists()
    table = reporting.paper_table(published, "accuracy")
    assert list(table.columns) == ["Params Mean", "Data Vector", "Random Vector", "Base Model", "Full Training"]
    assert list(table.index) == ["1", "2", "3", "4", "pooled"]


def test_second_run_skips_finished_steps(chain):
    base, _ = chain
    records = run_chain("t-smoke", "smoke", seeds=[0], device="cpu", runs_dir=str(base / "runs"),
                        reports_dir=str(base / "reports"), figures_dir=str(base / "figures"), log=lambda *_: None)
    assert all(r["status"] == "skipped" for r in records)


def test_changed_settings_do_not_overwrite_a_run(chain):
    base, _ = chain
    with pytest.raises(DvlibError, match=r"exists with other settings \(lr\)"):
        run_chain("t-smoke", "smoke", seeds=[0], device="cpu", runs_dir=str(base / "runs"), extra={"lr": 0.5},
                  reports_dir=str(base / "reports"), figures_dir=str(base / "figures"), log=lambda *_: None)


def test_failing_notebook_names_itself_and_the_cell(tmp_path):
    with pytest.raises(DvlibError, match=r"notebook 01_split_data failed in cell \d+ .*unknown dataset .no_such_dataset_dir."):
        run_chain("t-fail", "smoke", dataset="no_such_dataset_dir", seeds=[0], device="cpu",
                  runs_dir=str(tmp_path / "runs"), reports_dir=str(tmp_path / "reports"),
                  figures_dir=str(tmp_path / "figures"), log=lambda *_: None, html=False)
    reports = tmp_path / "reports"  # papermill's execution is kept beside, never as the report's notebook
    failed = nbformat.read(str(reports / "01_split_data.failed.ipynb"), as_version=4)
    assert any(o.output_type == "error" for c in failed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert not (reports / "01_split_data.ipynb").exists() and not list(reports.glob(".*.running.ipynb"))
    assert not (reports / "logs" / "01_split_data.done.json").exists()


def test_relative_data_paths_mean_what_they_mean_where_the_chain_starts(tmp_path, pad_root, monkeypatch):
    """The kernels run in notebooks/: a relative DVLIB_DATA (or image folder) given from elsewhere
    must still be found there, and the caller's environment is left as it was."""
    import os

    monkeypatch.chdir(pad_root.parent)
    monkeypatch.setenv("DVLIB_DATA", pad_root.name)
    records = run_chain("t-rel", "smoke", dataset="pad_ufes_20", seeds=[0], device="cpu", steps=["01_split_data"],
                        runs_dir="runs", reports_dir="reports", figures_dir="figures", html=False,
                        extra={"n_hospitals": 2}, log=lambda *_: None)
    assert records[0]["status"] == "ran"
    assert (pad_root.parent / "reports" / "logs" / "01_split_data.done.json").exists()
    shards = pd.read_csv(pad_root.parent / "runs" / "t-rel" / "results" / "shards.csv")
    assert shards["patients"].sum() == 36
    assert os.environ["DVLIB_DATA"] == pad_root.name


def test_a_later_step_keeps_the_reports_earlier_step_records_and_seeds(tmp_path):
    """``dvlib run --steps 07_federated --train-seeds 0`` on a finished chain: steps.json keeps the
    chain's records and results/run.json every seed the report's files hold."""
    import json

    from dvlib.io import DvlibError
    from dvlib.pipeline import merge_steps, publish_results
    from dvlib.runs import open_run

    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps([{"step": "01_split_data", "status": "ran", "seconds": 3.0},
                                 {"step": "07_federated", "status": "ran", "seconds": 9.0}]))
    merged = merge_steps(steps, [{"step": "07_federated", "status": "ran", "seconds": 5.0},
                                 {"step": "02_finetune_hospitals", "status": "skipped", "seconds": 0.0}])
    assert [(r["step"], r["seconds"]) for r in merged] == [("01_split_data", 3.0), ("02_finetune_hospitals", 0.0),
                                                          ("07_federated", 5.0)]
    steps.write_text("{not json")
    with pytest.raises(DvlibError, match="steps.json: unreadable step records"):
        merge_steps(steps, [])
    dest = tmp_path / "results"
    publish_results(open_run("r", "smoke", seeds=[0, 1], train_seeds=[0, 1], root=tmp_path / "runs"), dest)
    publish_results(open_run("r", "smoke", seeds=[0], train_seeds=[0], root=tmp_path / "runs"), dest)
    published = json.loads((dest / "run.json").read_text())
    assert published["split_seeds"] == [0, 1] and published["train_seeds"] == [0, 1]


# --- a failed step: never in place of the good notebook, never counted as done -------------------------------

def _chain_args(tmp_path, *more) -> list[str]:
    return ["run", "--preset", "smoke", "--run", "t-nb", "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
            str(tmp_path / "reports"), "--figures-dir", str(tmp_path / "figures"), "--steps", "01_split_data", *more]


def _fake_execution(monkeypatch, fail_when):
    """Notebook execution replaced: each attempt writes a notebook naming itself and the step's result
    files, then raises papermill's error if ``fail_when(attempt)``; returns the paths it was given."""
    import nbformat.v4 as v4
    import papermill as pm

    import dvlib.notebook_step as notebook_step

    given = []

    def execute(src, out_nb, parameters, cwd, logfile, log):
        attempt = len(given)
        given.append(Path(out_nb))
        nbformat.write(v4.new_notebook(cells=[v4.new_code_cell(f"print('attempt {attempt}')")]), str(out_nb))
        results = Path(parameters["runs_dir"]) / parameters["run"] / "results"
        results.mkdir(parents=True, exist_ok=True)
        for o in dict(STEPS)[Path(src).stem]:
            (results / f"{o}.csv").write_text(f"attempt\n{attempt}\n")
        if fail_when(attempt):
            raise pm.PapermillExecutionError(3, 2, "x", "ValueError", f"attempt {attempt} broke", [])

    monkeypatch.setattr(notebook_step, "_run_notebook", execute)
    return given


def test_a_failed_rerun_keeps_the_good_notebook_and_the_step_runs_again(tmp_path, monkeypatch, capsys):
    import hashlib

    from dvlib.cli import main

    given = _fake_execution(monkeypatch, lambda attempt: attempt == 1)
    reports, args = tmp_path / "reports", _chain_args(tmp_path)
    nb, html, failed = (reports / f"01_split_data.{ext}" for ext in ("ipynb", "html", "failed.ipynb"))
    record = reports / "logs" / "01_split_data.done.json"
    assert main(args) == 0
    good, good_html = nb.read_bytes(), html.read_bytes()
    assert json.loads(record.read_text())["notebook_sha256"] == hashlib.sha256(good).hexdigest()
    assert main(args) == 0 and len(given) == 1  # done: skipped
    assert main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "notebook 01_split_data failed in cell 3 (execution count 2): ValueError: attempt 1 broke" in err
    assert str(failed) in err
    assert given[1] != nb and given[1].parent == reports  # papermill never writes the report's notebook itself
    assert nb.read_bytes() == good and html.read_bytes() == good_html
    assert "attempt 1" in failed.read_text() and not record.exists()
    assert json.loads((reports / "steps.json").read_text())[0]["status"] == "failed"
    assert main(args) == 0 and len(given) == 3  # not done: runs again without --overwrite
    assert "attempt 2" in nb.read_text() and not failed.exists() and record.exists()
    assert json.loads((reports / "steps.json").read_text())[0]["status"] == "ran"
    assert not list(reports.glob(".*.running.ipynb"))


@pytest.mark.parametrize("late", ["fails", "succeeds"])
def test_two_runs_on_one_name_leave_the_successful_notebook(tmp_path, monkeypatch, late):
    """A second ``dvlib run`` on the same run executes the step while the first one still runs; whichever
    of the two fails, the report keeps the successful execution, counted as done."""
    from dvlib.cli import main

    args = _chain_args(tmp_path, "--no-html")
    codes, failing = [], 0 if late == "fails" else 1

    def fails(attempt):
        if attempt == 0:  # while the first run executes the step, a second run executes it to its end
            codes.append(main(args))
        return attempt == failing

    given = _fake_execution(monkeypatch, fails)
    assert main(args) == (2 if failing == 0 else 0)
    assert codes == [0 if failing == 0 else 2] and len(given) == 2
    reports = tmp_path / "reports"
    assert f"attempt {1 - failing}" in (reports / "01_split_data.ipynb").read_text()
    assert (reports / "logs" / "01_split_data.done.json").exists()
    assert main(args) == 0 and len(given) == 2  # done: the third run skips it


@pytest.mark.parametrize("flags, shown", [
    (["--epsilons", "1", "inf"], "argument --epsilons: must be a finite number in (0.0, inf), got 'inf'"),
    (["--epsilons", "nan"], "argument --epsilons: must be a finite number in (0.0, inf), got 'nan'"),
    (["--epsilons", "0"], "argument --epsilons: must be a finite number in (0.0, inf), got '0'"),
    (["--epsilons", "-1"], "argument --epsilons: must be a finite number in (0.0, inf), got '-1'"),
    (["--delta", "1"], "argument --delta: must be a finite number in (0.0, 1.0), got '1'"),
    (["--delta", "0"], "argument --delta: must be a finite number in (0.0, 1.0), got '0'"),
    (["--delta", "nan"], "argument --delta: must be a finite number in (0.0, 1.0), got 'nan'"),
    (["--n-boot", "0"], "argument --n-boot: must be an integer >= 10, got '0'"),
    (["--n-boot", "9"], "argument --n-boot: must be an integer >= 10, got '9'"),
])
def test_a_bad_privacy_budget_is_refused_as_the_flags_are_parsed(tmp_path, monkeypatch, capsys, flags, shown):
    import dvlib.pipeline as pipeline
    from dvlib.cli import main

    monkeypatch.setattr(pipeline, "run_chain", lambda *a, **kw: pytest.fail("the chain started"))
    assert main(_chain_args(tmp_path, "--with", "privacy", *flags)) == 2
    assert shown in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_delta_is_checked_against_the_smallest_hospital_before_any_notebook_runs(tmp_path, monkeypatch, capsys):
    import dvlib.pipeline as pipeline
    from dvlib.cli import main
    from dvlib.privacy_budget import training_images
    from dvlib.runs import open_run

    executed = []
    monkeypatch.setattr(pipeline, "_execute", lambda the_run, params, declared, nbp, *a: executed.append(nbp) or [])
    n = min(training_images(open_run("probe", "smoke", root=tmp_path / "probe")).values())
    limit = 2 / n
    assert main(_chain_args(tmp_path, "--with", "privacy", "--delta", repr(limit))) == 2
    err = capsys.readouterr().err
    assert f"--delta {limit!r} is at least 2/n" in err and f"(n = {n} training images)" in err
    assert not executed and sorted(p.name for p in tmp_path.iterdir()) == ["probe", "runs"]
    assert not list((tmp_path / "runs").iterdir())  # the run this call created is gone again
    just_below = float(np.nextafter(limit, 0))
    assert main(_chain_args(tmp_path, "--with", "privacy", "--delta", repr(just_below))) == 0
    assert executed == [{"delta": just_below}]
    # without 08 among the steps, delta concerns no notebook that runs: not checked against n
    assert main(_chain_args(tmp_path, "--delta", "0.9")) == 0 and executed[-1] == {"delta": 0.9}


def test_a_report_made_with_the_default_folders_names_no_folder_of_the_machine(tmp_path, monkeypatch):
    """The injected parameters leave the default folders to the notebooks (""), and papermill's paths and
    steps.json name the report's files relative to the project: nothing of this machine is published."""
    import shutil

    import nbformat.v4 as v4

    import dvlib.notebook_step as notebook_step
    from dvlib.cli import main
    from dvlib.pipeline import notebooks_dir

    project = tmp_path / "checkout"
    (project / "dvlib").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    shutil.copytree(notebooks_dir(), project / "notebooks")
    monkeypatch.chdir(project)
    given = {}

    def execute(src, out_nb, parameters, cwd, logfile, log):
        given.update(parameters)
        nb = v4.new_notebook(cells=[v4.new_code_cell("1")])
        nb.metadata["papermill"] = {"input_path": str(src), "output_path": str(out_nb)}
        nbformat.write(nb, str(out_nb))
        results = project / "runs" / parameters["run"] / "results"  # where the notebook's "" default puts them
        results.mkdir(parents=True, exist_ok=True)
        for o in dict(STEPS)[Path(src).stem]:
            (results / f"{o}.csv").write_text("x\n1\n")

    monkeypatch.setattr(notebook_step, "_run_notebook", execute)
    assert main(["run", "--preset", "smoke", "--run", "t-rel", "--steps", "01_split_data", "--no-html"]) == 0
    assert given["runs_dir"] == "" and given["figures_dir"] == ""
    reports = project / "reports" / "t-rel"
    meta = nbformat.read(str(reports / "01_split_data.ipynb"), as_version=4).metadata["papermill"]
    assert meta == {"input_path": "notebooks/01_split_data.ipynb", "output_path": meta["output_path"]}
    assert meta["output_path"].startswith("reports/t-rel/.01_split_data.")  # the temporary it was executed into
    steps = json.loads((reports / "steps.json").read_text())
    assert [s["output"] for s in steps] == ["reports/t-rel/01_split_data.ipynb"]
    published = "".join(p.read_text() for p in reports.rglob("*") if p.is_file())
    assert str(tmp_path) not in published


def test_project_relative_keeps_a_path_outside_the_project():
    from dvlib.notebook_step import project_relative

    root = Path("/srv/proj")
    assert project_relative("/srv/proj/reports/r/01.ipynb", root) == "reports/r/01.ipynb"
    assert project_relative("/elsewhere/r/01.ipynb", root) == "/elsewhere/r/01.ipynb"
