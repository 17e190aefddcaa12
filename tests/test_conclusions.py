""""What this shows" (notebooks 01-06) and the provenance table: written from the result files, true
for the run they are made on (6 replicates, or 1)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dvlib import stats
from dvlib.io import DvlibError
from dvlib.reporting import conclusions
from dvlib.reporting.claims import headline
from dvlib.reporting.provenance import provenance_table

REPORT = Path(__file__).resolve().parents[1] / "reports" / "quick-pad_ufes_20" / "results"
needs_report = pytest.mark.skipif(not (REPORT / "layer_cosine.csv").exists(), reason="needs the committed report")
STEPS = ("01", "02", "03", "04", "05", "06")


@pytest.fixture(scope="module")
def one_replicate(tmp_path_factory) -> Path:
    """The committed report's result files cut down to replicate (split 0, training seed 0)."""
    out = tmp_path_factory.mktemp("one") / "results"
    out.mkdir()
    for f in REPORT.iterdir():
        if f.name.endswith(".json"):
            (out / f.name).write_text(f.read_text())
        elif f.name.endswith(".csv") and f.name.split(".")[0] in conclusions.SOURCES:
            df = pd.read_csv(f)
            df = df[(df["split_seed"] == 0) & (df.get("train_seed", 0) == 0)]
            df.to_csv(out / f.name, index=False)
    return out


def _pct(v: float) -> str:
    return f"{v * 100:.1f}"


@needs_report
def test_every_notebook_gets_a_conclusion_from_its_files():
    for step in STEPS:
        text = conclusions.what_this_shows(REPORT, step)
        assert text.startswith("### What this shows\n\n") and len(text.splitlines()) > 2, step
        assert "nan" not in text.lower() and "_" not in text.replace("theta_pre", "").replace("tau_i", ""), (step, text)
    with pytest.raises(DvlibError, match="no 'what this shows' for notebook '09'"):
        conclusions.what_this_shows(REPORT, "09")


@needs_report
def test_numbers_are_the_result_files_numbers():
    ft = pd.read_csv(REPORT / "finetune_eval.csv")
    full = ft[(ft["method"] == "full_training") & (ft["eval_on"] == "pooled")]
    iv = stats.mean_interval(full["accuracy"].to_numpy())
    text = conclusions.what_this_shows(REPORT, "02")
    assert f"reaches {_pct(iv.estimate)} [{_pct(iv.low)}, {_pct(iv.high)}] % accuracy" in text
    assert "over 6 replicates" in text

    lam = pd.read_csv(REPORT / "lambda_eval.csv")
    curve = lam[lam["eval_on"] == "pooled"].groupby("lam")["accuracy"].mean()
    assert f"peaks at {_pct(curve.max())} % (lambda {curve.idxmax():g})" in conclusions.what_this_shows(REPORT, "03")

    shards = pd.read_csv(REPORT / "shards.csv")
    train = shards[(shards["split_seed"] == 0) & (shards["subset"] == "train")]
    assert f"{train['MEL'].min()}–{train['MEL'].max()} training images" in conclusions.what_this_shows(REPORT, "01")

    cos = pd.read_csv(REPORT / "layer_cosine.csv")
    m = cos[cos["model"] == "merged_data_vector"].groupby("layer_index")["cosine"].mean()
    assert f"mean cosine of {m.mean():.2f}" in conclusions.what_this_shows(REPORT, "05")
    assert "cannot tell the two apart" in conclusions.what_this_shows(REPORT, "05")


@needs_report
def test_06_ends_on_the_headline_in_both_metrics():
    text = conclusions.what_this_shows(REPORT, "06")
    last = headline(REPORT, "accuracy", "finetune_epoch").splitlines()
    assert text.endswith(last[-1]) and all(line in text for line in last[1:])
    assert "In accuracy, Data Vector" in text and "In balanced accuracy, Data Vector" in text
    # Holm over the 12 accuracy claims: Data Vector after 1 epoch per hospital is worse than Full Training
    assert "In accuracy, Data Vector (restored with 1 epoch per hospital) is better than Random Vector; worse " \
           "than Full Training; not significantly different from Base Model, Params Mean." in text


@needs_report
def test_one_replicate_says_no_test_is_possible(one_replicate):
    for step in STEPS[1:]:
        text = conclusions.what_this_shows(one_replicate, step)
        assert conclusions.NO_TEST in text, step
        assert "[" not in text.split("**Headline.**")[0], (step, text)  # no interval anywhere
    assert "Holm p" not in conclusions.what_this_shows(one_replicate, "06")


def _provenance(tmp_path: Path, git: dict) -> Path:
    (tmp_path / "provenance.json").write_text(json.dumps({
        "run": "r", "git": git, "versions": {"python": "3.11.7", "torch": "2.11.0", "timm": None},
        "dataset": {"name": "pad_ufes_20", "images": 10, "patients": 4, "sha256": "ab" * 32},
        "steps": {"finetune": {"device": "cuda", "name": "NVIDIA H100"}}}))
    return tmp_path


def test_provenance_table_explains_a_dirty_tree(tmp_path):
    t = provenance_table(_provenance(tmp_path, {"commit": "c" * 40, "dirty": True, "changed": ["a.py", "b.py"]}))
    assert list(t.index) == ["run", "data", "commit", "device", "versions"] and t.index.name == "provenance"
    assert t.loc["commit", "value"] == ("cccccccccccc plus uncommitted changes: a.py, b.py (the code that ran differed "
                                        "from this commit, so the commit alone may not reproduce it exactly)")
    assert t.loc["versions", "value"] == "python 3.11.7, torch 2.11.0"
    assert t.loc["device", "value"] == "cuda (NVIDIA H100)"
    assert t.loc["data", "value"] == f"pad_ufes_20: 10 images of 4 patients, sha256 {'ab' * 8}…"
    clean = provenance_table(_provenance(tmp_path, {"commit": "d" * 40, "dirty": False}))
    assert clean.loc["commit", "value"] == "dddddddddddd (clean: the commit alone reproduces the code)"


def test_provenance_table_refuses_a_missing_or_broken_file(tmp_path):
    with pytest.raises(DvlibError, match="provenance.json: no provenance recorded"):
        provenance_table(tmp_path)
    (tmp_path / "provenance.json").write_text("{")
    with pytest.raises(DvlibError, match="provenance.json: not valid JSON"):
        provenance_table(tmp_path)
