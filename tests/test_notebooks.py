"""The notebooks are their own source and each runs standalone: a student's edit round trip, the data
found from notebooks/, one line saying what to run first, and 03's literal lambda checked against the run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dvlib.io import DvlibError
from dvlib.pipeline import CHAIN, STEPS, notebook_parameters, notebooks_dir
from dvlib.runs import open_run, project_root
from dvlib.step_inputs import CHAIN as NEEDS_CHAIN
from dvlib.step_inputs import OUTPUTS

ROOT = project_root()


def _execute(src: Path, out: Path, **parameters):
    import papermill as pm

    return pm.execute_notebook(str(src), str(out), parameters=parameters, kernel_name="python3", cwd=str(src.parent),
                               progress_bar=False, log_output=False)


def _dirs(tmp_path: Path, run: str) -> dict:
    return {"run": run, "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures")}


def test_a_students_edit_runs_and_nbval_passes_with_no_generator(tmp_path):
    """Edit a parameter in a copy of notebook 01, execute it, see the edit in its output, and nbval
    (as make test runs it) passes on the executed copy."""
    assert not (ROOT / "tools" / "make_notebooks.py").exists() and not (notebooks_dir() / ".generated.json").exists()
    nb = nbformat.read(str(notebooks_dir() / "01_split_data.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "seeds: list = [0]" in params.source
    params.source = params.source.replace("seeds: list = [0]", "seeds: list = [3]")
    edited, executed = tmp_path / "edited.ipynb", tmp_path / "executed.ipynb"
    nbformat.write(nb, str(edited))
    _execute(edited, executed, **_dirs(tmp_path, "t-edit"))
    out = nbformat.read(str(executed), as_version=4)
    text = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "split seeds [3]" in text and "split seed 3: {'patient_disjoint': True" in text
    assert (tmp_path / "runs" / "t-edit" / "split_3" / "manifest.csv").is_file()
    assert not (tmp_path / "runs" / "t-edit" / "split_0").exists()
    nbval = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                            "--nbval-lax", "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
                            "--rootdir", str(tmp_path), "-c", os.devnull, str(executed)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert nbval.returncode == 0, nbval.stdout[-3000:]
    assert re.search(r"\b\d+ passed\b", nbval.stdout)


def test_a_relative_data_root_is_read_from_the_project_root(tmp_path, monkeypatch):
    from dvlib.data.base import data_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVLIB_DATA", "../shared/datasets")
    assert data_root() == ROOT / "../shared/datasets"
    monkeypatch.delenv("DVLIB_DATA")
    assert data_root() == ROOT / "data" / "raw"
    monkeypatch.setenv("DVLIB_DATA", str(tmp_path / "elsewhere"))
    assert data_root() == tmp_path / "elsewhere"


def test_a_kernel_started_in_notebooks_finds_the_data_with_the_makefiles_data_path():
    value = re.search(r"^DVLIB_DATA \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert not Path(value).is_absolute()
    expected = (ROOT / value / "pad_ufes_20").resolve()
    if not (expected / "metadata.csv").exists():
        pytest.skip(f"{value}/pad_ufes_20 is not beside this checkout")
    code = "from dvlib.data import load_dataset; i = load_dataset('pad_ufes_20'); print(i.root); print(len(i))"
    env = {**os.environ, "DVLIB_DATA": value}
    done = subprocess.run([sys.executable, "-c", code], cwd=notebooks_dir(), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    root, n = done.stdout.split()
    assert Path(root).resolve() == expected and int(n) > 0


def _touch(paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_a_notebook_opened_before_its_inputs_says_in_one_line_what_to_run_first(tmp_path):
    assert list(NEEDS_CHAIN) == CHAIN
    root = tmp_path / "runs"
    with pytest.raises(DvlibError) as fresh:
        open_run("t-hint", "smoke", root=root, step="03_merge")
    assert str(fresh.value) == (f"03_merge needs split_0/manifest.csv of run 't-hint': run 01_split_data.ipynb to "
                                f"02_finetune_hospitals.ipynb first (or: dvlib run --run t-hint --preset smoke "
                                f"--runs-dir {root} --steps 01_split_data 02_finetune_hospitals)")
    run = open_run("t-hint", root=root)
    _touch(OUTPUTS["01_split_data"](run))
    with pytest.raises(DvlibError) as after_01:
        open_run("t-hint", root=root, step="03_merge")
    message = str(after_01.value)
    assert "\n" not in message
    assert message == (f"03_merge needs split_0/train_0/models/hospital_1.dv.safetensors of run 't-hint': run "
                       f"02_finetune_hospitals.ipynb first (or: dvlib run --run t-hint --preset smoke --runs-dir {root} "
                       f"--steps 02_finetune_hospitals)")
    hospitals = OUTPUTS["02_finetune_hospitals"](run)
    assert [p.name for p in hospitals] == [f"hospital_{h}.dv.safetensors" for h in (1, 2, 3, 4)] + ["full.dv.safetensors"]
    _touch(hospitals[:-1])
    with pytest.raises(DvlibError, match=r"needs split_0/train_0/models/full\.dv\.safetensors"):
        open_run("t-hint", root=root, step="03_merge")
    _touch(hospitals[-1:])
    assert open_run("t-hint", root=root, step="03_merge").name == "t-hint"
    with pytest.raises(DvlibError, match=r"run 03_merge\.ipynb to 04_restore_bn\.ipynb first .*--steps 03_merge 04_restore_bn\)$"):
        open_run("t-hint", root=root, step="05_layerwise_similarity")
    with pytest.raises(DvlibError, match=r"--seeds 0 1 --train-seeds 5 --steps 01_split_data"):
        open_run("t-hint", root=root, seeds=[0, 1], train_seeds=[5], step="02_finetune_hospitals")
    with pytest.raises(DvlibError, match="unknown step '03_merg'"):
        open_run("t-hint", root=root, step="03_merg")


def test_opening_03_on_a_run_without_02s_files_stops_on_the_hint(tmp_path):
    import papermill as pm

    from dvlib import experiment as ex

    ex.step_split(open_run("t-03", "smoke", root=tmp_path / "runs"))
    with pytest.raises(pm.PapermillExecutionError) as failed:
        _execute(notebooks_dir() / "03_merge.ipynb", tmp_path / "03.ipynb", **_dirs(tmp_path, "t-03"))
    assert failed.value.ename == "DvlibError"
    assert failed.value.evalue == (f"03_merge needs split_0/train_0/models/hospital_1.dv.safetensors of run 't-03': "
                                   f"run 02_finetune_hospitals.ipynb first (or: dvlib run --run t-03 --preset smoke "
                                   f"--runs-dir {tmp_path / 'runs'} --steps 02_finetune_hospitals)")


def test_03s_lambda_is_a_literal_that_must_equal_the_runs(tmp_path):
    from dvlib.presets import get_preset

    declared = notebook_parameters(notebooks_dir() / "03_merge.ipynb")["lam"]
    assert declared["inferred_type_name"] == "float" and float(declared["default"]) == get_preset("smoke").lam
    assert "lambda" in declared["help"]
    root = tmp_path / "runs"
    run = open_run("t-lam", "smoke", root=root, lam=0.5)
    _touch(OUTPUTS["01_split_data"](run))
    with pytest.raises(DvlibError, match=r"exists with other settings \(lam\)"):
        open_run("t-lam", "smoke", root=root, lam=0.25)
    assert open_run("t-lam", "smoke", root=root, lam=0.5).preset.lam == 0.5


def test_the_chain_gives_03_the_runs_lambda_and_no_other_notebook(tmp_path, monkeypatch):
    """``dvlib run --lam 0.25``: 03's parameters cell gets the run's lambda, so its literal never
    refuses the chain's own run."""
    import dvlib.pipeline as pipeline

    given = {}

    def execute(src, reports, name, params, nb_dir, log):
        given[name] = params
        nbformat.write(nbformat.v4.new_notebook(), str(reports / f"{name}.ipynb"))
        results = Path(params["runs_dir"]) / params["run"] / "results"
        results.mkdir(parents=True, exist_ok=True)
        for o in dict(STEPS)[name]:
            (results / f"{o}.csv").write_text("x\n1\n")

    monkeypatch.setattr(pipeline, "execute", execute)
    pipeline.run_chain("t-lam", "smoke", seeds=[0], device="cpu", runs_dir=str(tmp_path / "runs"),
                       reports_dir=str(tmp_path / "reports"), figures_dir=str(tmp_path / "figures"), html=False,
                       steps=["02_finetune_hospitals", "03_merge"], extra={"lam": 0.25}, log=lambda *_: None)
    assert given["03_merge"]["lam"] == 0.25
    assert "lam" not in given["02_finetune_hospitals"]


def test_committed_notebooks_hold_no_machine_path_and_no_test_marker():
    for path in sorted(notebooks_dir().glob("*.ipynb")):
        text = path.read_text()
        assert str(ROOT) not in text and f"{ROOT.parent}/" not in text, path.name
        assert "NBVAL" not in text, path.name
        nb = nbformat.read(str(path), as_version=4)
        sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert not re.search(r"^\s*(async\s+)?def |^\s*class ", sources, re.M), f"{path.name}: a definition in a cell"
