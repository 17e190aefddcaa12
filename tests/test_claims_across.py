"""The claims across datasets (dvlib.reporting.across, tools/claims_across.py): made from result files
alone, one Holm family over every dataset and metric, a verdict per claim, refusals named."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from dvlib import stats
from dvlib.io import DvlibError
from dvlib.reporting import across
from dvlib.reporting.claims import claim, claims_frame, holm_interval

ROOT = Path(__file__).resolve().parents[1]
PAD = ROOT / "reports" / "quick-pad_ufes_20"
sys.path.insert(0, str(ROOT / "tools"))
import claims_across  # noqa: E402

# the committed reports' exact column sets (checked against reports/quick-pad_ufes_20 below)
FINETUNE_COLUMNS = ["split_seed", "train_seed", "model", "restore", "lam", "method", "eval_on", "n", "accuracy",
                    "balanced_accuracy", "macro_f1", "auc_ovr", "nonfinite_outputs", "confusion"]
RESTORE_COLUMNS = ["split_seed", "train_seed", "model", "method", "restore", "lam", "eval_on", "n", "accuracy",
                   "balanced_accuracy", "macro_f1", "auc_ovr", "nonfinite_outputs", "confusion"]
REPS = [(0, 0), (0, 1), (1, 0), (1, 1)]
PARTS = ("hospital_1", "hospital_2", "pooled")
BALANCED_SHIFT = 0.05  # balanced accuracy = accuracy - this, so both metrics carry the same differences
RIVALS = ("base_model", "params_mean", "full_training", "random_vector")


def accuracies(gaps: dict, seed: int) -> dict:
    """Pooled accuracy per model per replicate: Data Vector 0.7 + noise, each rival ``gap`` below it
    (plus its own noise)."""
    rng = np.random.default_rng(seed)
    dv = 0.7 + rng.normal(0, 0.01, len(REPS))
    return {"data_vector": dv, **{r: dv - gaps[r] + rng.normal(0, 0.01, len(REPS)) for r in RIVALS}}


def write_run(folder: Path, acc: dict, dataset: str, **settings) -> Path:
    """A run's result folder in the committed format: run.json, finetune_eval.csv, restore_eval.csv.
    Every part (each hospital's test split, pooled) gets the same value; both hospitals' own models
    score the Base Model value, so the pooled Base Model (their mean) is it too."""
    res = folder / "results"
    res.mkdir(parents=True)
    run = {"preset": "quick", "dataset": dataset, "scheme": "iid", "test_design": "per_hospital",
           "run": folder.name, **settings}
    (res / "run.json").write_text(json.dumps(run))
    ft, rs = [], []
    blank = {"n": 10, "macro_f1": 0.5, "auc_ovr": 0.5, "nonfinite_outputs": 0, "confusion": "[[1, 0], [0, 1]]"}
    for i, (s, t) in enumerate(REPS):
        for part in PARTS:
            for model, method, a in (("hospital_1", "base_model", acc["base_model"][i]),
                                     ("hospital_2", "base_model", acc["base_model"][i]),
                                     ("full", "full_training", acc["full_training"][i])):
                ft.append({"split_seed": s, "train_seed": t, "model": model, "restore": "none", "lam": np.nan,
                           "method": method, "eval_on": part, "accuracy": a, "balanced_accuracy": a - BALANCED_SHIFT,
                           **blank})
            for method in ("data_vector", "params_mean", "random_vector"):
                a = acc[method][i]
                rs.append({"split_seed": s, "train_seed": t, "model": f"restored_{method}_finetune_epoch",
                           "method": method, "restore": "finetune_epoch", "lam": 0.5, "eval_on": part, "accuracy": a,
                           "balanced_accuracy": a - BALANCED_SHIFT, **blank})
    pd.DataFrame(ft)[FINETUNE_COLUMNS].to_csv(res / "finetune_eval.csv", index=False)
    pd.DataFrame(rs)[RESTORE_COLUMNS].to_csv(res / "restore_eval.csv", index=False)
    return folder


def hand_holm(p: list[float]) -> list[float]:
    """Holm by hand: the k-th smallest (k from 0) times (m - k), running maximum, capped at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for k, i in enumerate(order):
        running = max(running, (m - k) * p[i])
        out[i] = min(1.0, running)
    return out


# Data Vector beats Base Model on both, Params Mean on "pad" only, Random Vector on neither (no gap),
# and loses to Full Training on both
GAPS_A = {"base_model": 0.10, "params_mean": 0.08, "full_training": -0.06, "random_vector": 0.0}
GAPS_B = {"base_model": 0.12, "params_mean": 0.0, "full_training": -0.05, "random_vector": 0.0}


@pytest.fixture
def two_runs(tmp_path):
    acc_a, acc_b = accuracies(GAPS_A, 1), accuracies(GAPS_B, 2)
    a = write_run(tmp_path / "runs" / "pad", acc_a, "pad_ufes_20")
    b = write_run(tmp_path / "runs" / "fundus", acc_b, "odir_fundus")
    return a, b, acc_a, acc_b


def test_fixture_has_the_committed_column_sets():
    for name, cols in (("finetune_eval.csv", FINETUNE_COLUMNS), ("restore_eval.csv", RESTORE_COLUMNS)):
        assert list(pd.read_csv(PAD / "results" / name, nrows=1).columns) == cols


def test_holm_family_spans_both_datasets_and_both_metrics(two_runs):
    a, b, acc_a, acc_b = two_runs
    long = across.claims_long([across.load_run(a), across.load_run(b)])
    assert len(long) == 2 * 2 * 4  # datasets x metrics x claims (one restore in these runs)
    ref = {}
    for run, acc in (("pad", acc_a), ("fundus", acc_b)):
        for metric in across.METRICS:
            for rival in RIVALS:
                d = acc["data_vector"] - acc[rival]  # the balanced shift cancels in the difference
                ref[(run, metric, rival)] = (d.mean() * 100, float(st.ttest_1samp(d, 0.0).pvalue))
    keys = list(zip(long["run"], long["metric"], long["rival"]))
    assert sorted(keys) == sorted(ref)
    np.testing.assert_allclose(long["diff_pp"], [ref[k][0] for k in keys], rtol=1e-9)
    np.testing.assert_allclose(long["p"], [ref[k][1] for k in keys], rtol=1e-9)
    np.testing.assert_allclose(long["p_holm"], hand_holm([ref[k][1] for k in keys]), rtol=1e-9)
    # a family of one dataset, or of one metric, would adjust less
    for part in (long["run"] == "pad", long["metric"] == "accuracy"):
        assert not np.allclose(long.loc[part, "p_holm"], hand_holm(list(long.loc[part, "p"])))


def test_verdict_for_each_case(two_runs, tmp_path):
    a, b, _, _ = two_runs
    csv_path, md_path = across.write_across([a, b], tmp_path / "out")
    t = pd.read_csv(csv_path).set_index(["metric", "claim"])
    for metric in across.METRICS:
        v = t.xs(metric)["verdict"]
        assert v["Data Vector (1 epoch per hospital) vs Base Model"] == "holds on both"
        assert v["Data Vector (1 epoch per hospital) vs Params Mean"] == "holds on pad only"
        assert v["Data Vector (1 epoch per hospital) vs Random Vector"] == "holds on neither"
        assert v["Data Vector (1 epoch per hospital) vs Full Training"] == \
            "holds on neither (Data Vector worse on pad, fundus)"
    md = md_path.read_text()
    assert "holds on pad only" in md and "Holm-adjusted over the whole family of 16 tests" in md
    assert "pad: difference, pp [95 % Holm-adjusted t-interval (family: 16 tests, every run x accuracy and " \
           "balanced accuracy x every claim)] (Holm p)" in md


def test_paper_numbers_beside_the_paper_restore_in_accuracy(two_runs, tmp_path):
    a, b, _, _ = two_runs
    t = pd.read_csv(across.write_across([a, b], tmp_path / "out")[0]).set_index(["metric", "claim"])
    acc = t.xs("accuracy")
    base = "Data Vector (1 epoch per hospital) vs Base Model"
    # Table 3 (PAD-UFES-20) and Table 1 (Retina, for the fundus set): mean over Parts of Data Vector - Base Model
    pad = np.mean([67.57, 66.01, 66.4, 66.79]) - np.mean([63.28, 64.45, 67.57, 63.67])
    retina = np.mean([70.71, 69.61, 72.37, 71.82]) - np.mean([57.45, 60.77, 65.19, 64.64])
    assert acc.at[base, "pad paper_diff_pp"] == pytest.approx(pad)
    assert acc.at[base, "fundus paper_diff_pp"] == pytest.approx(retina)
    full = "Data Vector (1 epoch per hospital) vs Full Training"
    assert acc.at[full, "fundus paper_diff_pp"] == pytest.approx(np.mean([70.71, 69.61, 72.37, 71.82]) - 73.48)
    assert t.xs("balanced_accuracy")["pad paper_diff_pp"].isna().all()  # the paper reports accuracy only


def test_made_from_the_result_files_alone(two_runs, tmp_path, monkeypatch):
    a, b, acc_a, _ = two_runs
    assert sorted(p.name for p in (a / "results").iterdir()) == ["finetune_eval.csv", "restore_eval.csv", "run.json"]
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for var in ("DVLIB_DATA", "DVLIB_RUNS"):
        monkeypatch.setenv(var, str(tmp_path / "nothing"))

    def refuse(*_, **__):
        raise AssertionError("the cross-dataset table touched model files or dvlib state")

    import torch

    import dvlib.runs
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(dvlib.runs, "project_root", refuse)
    monkeypatch.setattr(dvlib.runs, "runs_root", refuse)
    t = pd.read_csv(across.write_across([a, b], tmp_path / "out")[0])
    row = t[(t["metric"] == "accuracy") & (t["claim"] == "Data Vector (1 epoch per hospital) vs Base Model")]
    assert row["pad diff_pp"].iloc[0] == pytest.approx((acc_a["data_vector"] - acc_a["base_model"]).mean() * 100)


@pytest.mark.parametrize("field,value", [("test_design", "shared"), ("scheme", "dirichlet"), ("preset", "paper")])
def test_refuses_runs_of_different_test_designs(tmp_path, field, value):
    a = write_run(tmp_path / "pad", accuracies(GAPS_A, 1), "pad_ufes_20")
    b = write_run(tmp_path / "fundus", accuracies(GAPS_B, 2), "odir_fundus", **{field: value})
    with pytest.raises(DvlibError, match=rf"pad has {field}=.*fundus has {field}='{value}'"):
        across.write_across([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert claims_across.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["run.json", "finetune_eval.csv", "restore_eval.csv"])
def test_refuses_a_missing_result_file_naming_it(tmp_path, name):
    a = write_run(tmp_path / "pad", accuracies(GAPS_A, 1), "pad_ufes_20")
    b = write_run(tmp_path / "fundus", accuracies(GAPS_B, 2), "odir_fundus")
    (b / "results" / name).unlink()
    with pytest.raises(DvlibError, match=rf"fundus/results/{name}: result file not found"):
        across.write_across([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_run_with_one_replicate(tmp_path):
    a = write_run(tmp_path / "pad", accuracies(GAPS_A, 1), "pad_ufes_20")
    b = write_run(tmp_path / "fundus", accuracies(GAPS_B, 2), "odir_fundus")
    for name in ("finetune_eval.csv", "restore_eval.csv"):
        df = pd.read_csv(b / "results" / name)
        df[(df["split_seed"] == 0) & (df["train_seed"] == 0)].to_csv(b / "results" / name, index=False)
    with pytest.raises(DvlibError, match=r"fundus .*: 1 replicate\(s\).*no claim can be tested"):
        across.write_across([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_committed_pad_report_paired_with_a_copy_of_itself(tmp_path):
    copy = tmp_path / "pad-copy" / "results"
    copy.mkdir(parents=True)
    for name in across.NEEDS:
        shutil.copy(PAD / "results" / name, copy / name)
    out = tmp_path / "across"
    assert claims_across.main([str(PAD), str(copy.parent), "--out", str(out)]) == 0
    t = pd.read_csv(out / "claims_across.csv")
    assert len(t) == 24  # 3 restores x 4 rivals x 2 metrics
    for col in ("diff_pp", "holm_low_pp", "holm_high_pp", "p", "p_holm"):
        np.testing.assert_array_equal(t[f"quick-pad_ufes_20 {col}"], t[f"pad-copy {col}"])
    assert set(t["verdict"]) <= {"holds on both", "holds on neither", "holds on neither (Data Vector worse on "
                                 "quick-pad_ufes_20, pad-copy)"}
    # the same differences and replicate differences as the report's own claims tables (whose interval is
    # the unadjusted t-interval, or, once regenerated, Holm over that report's own family), and our interval
    # is Holm's over the cross-dataset family
    shared, _ = across.shared_claims([across.load_run(PAD), across.load_run(copy.parent)])
    for metric in across.METRICS:
        own = pd.read_csv(PAD / "results" / f"claims_{metric}.csv")
        column = next(c for c in own.columns if c.startswith("pooled difference, pp ["))
        per_run = claims_frame(PAD, metric, n_boot=0).set_index("claim")
        ours = t[t["metric"] == metric].set_index("claim")
        claims = {(c := claim(PAD, metric, rival, r))["claim"]: c for r, rival in shared}
        for name, text in zip(own.iloc[:, 0], own[column]):
            r, c = ours.loc[name], claims[name]
            d = r["quick-pad_ufes_20 diff_pp"]
            if "Holm-adjusted" in column:
                lo, hi = per_run.at[name, "holm low"], per_run.at[name, "holm high"]
            else:
                iv = stats.mean_interval(c["diffs"])
                lo, hi = iv.low * 100, iv.high * 100
            assert f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" == text
            assert d == pytest.approx(c["diffs"].mean() * 100, rel=1e-12)
            hlo, hhi = holm_interval(c["diffs"], r["quick-pad_ufes_20 p"], r["quick-pad_ufes_20 p_holm"])
            assert r["quick-pad_ufes_20 holm_low_pp"] == pytest.approx(hlo * 100, rel=1e-9, abs=1e-12)
            assert r["quick-pad_ufes_20 holm_high_pp"] == pytest.approx(hhi * 100, rel=1e-9, abs=1e-12)


def test_a_claim_one_run_lacks_is_left_out_and_said(two_runs, tmp_path):
    a, b, _, _ = two_runs
    rs = pd.read_csv(b / "results" / "restore_eval.csv")
    rs[rs["method"] != "params_mean"].to_csv(b / "results" / "restore_eval.csv", index=False)
    csv_path, md_path = across.write_across([a, b], tmp_path / "out")
    t = pd.read_csv(csv_path)
    assert sorted(set(t["claim"])) == [f"Data Vector (1 epoch per hospital) vs {r}"
                                       for r in ("Base Model", "Full Training", "Random Vector")]
    assert "Left out (not run in every run): 1 epoch per hospital vs Params Mean." in md_path.read_text()
    assert "whole family of 12 tests" in md_path.read_text()


def test_interval_excludes_zero_exactly_when_the_family_holm_p_is_below_alpha(tmp_path):
    """Params Mean: a steady 2.5-point gain with p = 0.03 on its own (its unadjusted 95 % t-interval
    excludes 0), but the 8th smallest of 16 p-values, so Holm over the whole family multiplies it by 8:
    its interval must then contain 0, as its verdict says."""
    dv = 0.7 + np.array([0.0, 0.01, -0.01, 0.005])
    gaps = {"base_model": [0.10, 0.11, 0.09, 0.10], "params_mean": [0.02, 0.03, 0.01, 0.04],
            "full_training": [-0.05, -0.06, -0.04, -0.05], "random_vector": [0.01, -0.01, 0.02, -0.02]}
    acc = {"data_vector": dv, **{r: dv - np.array(g) for r, g in gaps.items()}}
    runs = [across.load_run(write_run(tmp_path / name, acc, ds))
            for name, ds in (("pad", "pad_ufes_20"), ("fundus", "odir_fundus"))]
    long = across.claims_long(runs)
    assert len(long) == 16 and long["p"].notna().all()
    for _, r in long.iterrows():
        d = (acc["data_vector"] - acc[r["rival"]]) * 100
        # by hand: the t-interval at level 1 - 0.05 * p / p_holm
        half = st.t.ppf(1 - 0.025 * r["p"] / r["p_holm"], len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert r["holm_low_pp"] == pytest.approx(d.mean() - half, rel=1e-9)
        assert r["holm_high_pp"] == pytest.approx(d.mean() + half, rel=1e-9)
        assert (r["holm_low_pp"] > 0 or r["holm_high_pp"] < 0) == (r["p_holm"] < 0.05), r["claim"]
    pm = long[long["rival"] == "params_mean"]
    d = (acc["data_vector"] - acc["params_mean"]) * 100
    unadjusted = st.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(len(d)))
    assert unadjusted[0] > 0 and (pm["p"] < 0.05).all()  # the unadjusted reading would call it a gain
    assert (pm["p_holm"] >= 0.05).all() and (pm["holm_low_pp"] < 0).all() and (pm["holm_high_pp"] > 0).all()
    np.testing.assert_allclose(pm["p_holm"], 8 * pm["p"], rtol=1e-9)
    assert (long.loc[long["rival"] == "base_model", "holm_low_pp"] > 0).all()
    t = across.across_table(long, runs).set_index(["metric", "claim"])
    for metric in across.METRICS:
        assert t.at[(metric, "Data Vector (1 epoch per hospital) vs Params Mean"), "verdict"] == "holds on neither"
        assert t.at[(metric, "Data Vector (1 epoch per hospital) vs Base Model"), "verdict"] == "holds on both"
