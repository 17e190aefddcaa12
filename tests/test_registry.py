"""Each merge method and restore mode is registered once; the CLI, the notebooks and the docs derive from it."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from dvlib import methods, restore
from dvlib.cli import build_parser
from dvlib.io import DvlibError
from dvlib.models import HEADS
from dvlib.split import SCHEMES, TEST_DESIGNS

ROOT = Path(__file__).resolve().parents[1]


def _choices(*path):
    p = build_parser()
    for name in path[:-1]:
        p = next(a for a in p._actions if getattr(a, "choices", None) and name in a.choices).choices[name]
    return next(a for a in p._actions if path[-1] in a.option_strings).choices


def test_cli_choices_are_the_registries():
    assert list(_choices("merge", "--method")) == list(methods.METHODS)
    assert list(_choices("merge", "--bn-buffers")) == list(methods.BN_MODES)
    assert list(_choices("site", "restore", "--mode")) == list(restore.VISITS)
    assert set(restore.VISITS) == {v for m in restore.MODES.values() for v in m.visits}
    for command in (("split",), ("site", "finetune")):
        assert list(_choices(*command, "--head")) == list(HEADS)
    assert list(_choices("split", "--scheme")) == list(SCHEMES)
    assert list(_choices("split", "--test-design")) == list(TEST_DESIGNS)


def test_every_method_documents_itself():
    for m in methods.METHODS.values():
        assert m.label and m.formula and m.reference and m.lam_meaning, m.name
        assert m.lam is None or m.lam >= 0
    assert methods.run_lam("data_vector", 0.3) == 0.3 and methods.run_lam("ties", 0.3) == 1.0
    assert methods.run_lam("params_mean", 0.3) is None
    with pytest.raises(DvlibError, match="unknown merge method 'avg'; valid: data_vector"):
        methods.get("avg")


def _strings_outside_docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_report_labels_are_spelled_only_in_the_registries():
    """Renaming a method, baseline or restore mode is one line: the tables, claims, figures and the
    paper's columns take every label from dvlib.methods / dvlib.restore (the paper's OCR notes
    quote its cells, so data/paper.py is checked by its table below)."""
    labels = ({m.label for m in methods.METHODS.values()} | set(methods.BASELINES.values())
              | {m.label for m in restore.MODES.values() if m.label != m.name})
    for path in sorted((ROOT / "dvlib" / "reporting").glob("*.py")):
        for text in _strings_outside_docstrings(path):
            assert not [x for x in labels if x in text], (path.name, text)
    from dvlib.data.paper import COLUMNS, paper_table
    from dvlib.reporting.tables import METHOD_LABELS, PAPER_COLUMNS

    assert list(paper_table("pad_ufes_20").columns) == list(PAPER_COLUMNS.values()) == [methods.label(m) for m in COLUMNS]
    assert list(METHOD_LABELS) == [*methods.METHODS, *methods.BASELINES]
    with pytest.raises(DvlibError, match="no label for 'avg'; valid: data_vector"):
        methods.label("avg")


def test_docs_page_is_made_from_the_registries():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "tools" / "make_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "methods.md").read_text() == mod.render(), "run `python tools/make_docs.py`"
    for m in methods.METHODS:
        assert f"`{m}`" in mod.render()


def test_notebook_parameters_list_the_registries():
    from dvlib.pipeline import notebook_parameters, notebooks_dir

    merge_params = notebook_parameters(notebooks_dir() / "03_merge.ipynb")
    assert eval(merge_params["methods"]["default"]) == list(methods.METHODS)
    assert all(m in merge_params["methods"]["help"] for m in methods.METHODS)
    restore_params = notebook_parameters(notebooks_dir() / "04_restore_bn.ipynb")
    assert set(eval(restore_params["restore_modes"]["default"])) <= set(restore.MODES)


def test_dvlib_run_outside_a_checkout_says_how_to_get_the_notebooks(tmp_path, monkeypatch):
    from dvlib.pipeline import notebooks_dir

    monkeypatch.setenv("DVLIB_NOTEBOOKS", str(tmp_path))
    with pytest.raises(DvlibError, match="not there .*01_split_data.*git clone.*DVLIB_NOTEBOOKS"):
        notebooks_dir()
