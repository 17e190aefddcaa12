"""The report's claims: the plain sentences say what the claims table says, and an interval is judged
at the same (Holm) level as its verdict."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dvlib import stats
from dvlib.reporting.claims import claims_frame, claims_table, headline, holm_interval, verdict

REPORT = Path(__file__).resolve().parents[1] / "reports" / "quick-pad_ufes_20" / "results"
REPLICATES = [(s, t) for s in (0, 1, 2) for t in (0, 1)]
# Data Vector minus Base Model per replicate: unadjusted p = 0.023, so Holm over 4 claims (x4) is > 0.05
BASE_GAP = np.array([0.03, 0.01, 0.005, 0.04, 0.005, 0.03])
NO_GAP = np.array([0.01, -0.01, 0.02, -0.02, 0.0, 0.0])  # mean 0: p = 1


def write_results(folder: Path, replicates=REPLICATES, base_gap=BASE_GAP) -> Path:
    """finetune_eval.csv and restore_eval.csv of a run with one restore mode, pooled rows only."""
    ft, rs = [], []
    for i, (s, t) in enumerate(replicates):
        dv = 0.60 + 0.01 * i
        row = dict(split_seed=s, train_seed=t, eval_on="pooled", n=100)
        ba = {"balanced_accuracy": dv - 0.2, "macro_f1": 0.5, "auc_ovr": 0.8}  # the same for every model: no gap
        for h in (1, 2):
            ft.append({**row, "model": f"hospital_{h}", "method": "base_model", "accuracy": dv - base_gap[i], **ba})
        ft.append({**row, "model": "full", "method": "full_training", "accuracy": dv - NO_GAP[i], **ba})
        for method, acc in (("data_vector", dv), ("params_mean", dv - NO_GAP[i]), ("random_vector", dv + NO_GAP[i])):
            rs.append({**row, "model": f"restored_{method}_finetune_epoch", "method": method,
                       "restore": "finetune_epoch", "accuracy": acc, **ba})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(ft).to_csv(folder / "finetune_eval.csv", index=False)
    pd.DataFrame(rs).to_csv(folder / "restore_eval.csv", index=False)
    return folder


def test_unadjusted_difference_that_holm_does_not_keep_reads_as_no_difference(tmp_path):
    plain = stats.paired_t(BASE_GAP)
    assert plain.low > 0 and plain.pvalue < 0.05  # the 95 % t-interval alone would call a difference
    results = write_results(tmp_path)
    row = claims_frame(results, "accuracy", n_boot=0).set_index("rival").loc["base_model"]
    assert row["t p (Holm)"] == pytest.approx(min(1.0, 4 * plain.pvalue)) and row["t p (Holm)"] >= 0.05
    assert row["holm low"] < 0 < row["holm high"]
    line = next(x for x in headline(results, "accuracy", "finetune_epoch").splitlines() if "vs Base Model" in x)
    acc, bal = line.split("; ")
    assert acc.startswith("- vs Base Model: accuracy +2.0 [") and "no significant difference" in acc
    low, high = (float(v) for v in acc.split("[")[1].split("]")[0].split(", "))
    assert low < 0 < high and (low, high) == (round(row["holm low"], 1), round(row["holm high"], 1))
    assert bal.startswith("balanced accuracy +0.0 [+0.0, +0.0] points (Holm p=1: no significant difference)")
    table = claims_table(results, "accuracy").iloc[0]
    assert table["verdict"] == "no significant difference" and "[-" in table.iloc[1]


def test_holm_interval_excludes_zero_exactly_when_holm_rejects():
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = rng.normal(rng.uniform(-0.05, 0.05), 0.03, size=6)
        p = stats.paired_t(d).pvalue
        for m in (1, 3, 12):
            ph = min(1.0, m * p)
            low, high = holm_interval(d, p, ph)
            assert (low > 0 or high < 0) == (ph < 0.05), (d, p, ph, low, high)
            if m == 1:  # no correction: the ordinary 95 % t-interval
                iv = stats.mean_interval(d)
                assert (low, high) == pytest.approx((iv.low, iv.high))


def test_one_replicate_says_no_test_is_possible(tmp_path):
    results = write_results(tmp_path, REPLICATES[:1])
    df = claims_frame(results, "accuracy", n_boot=0)
    assert df["t p (Holm)"].isna().all() and df["holm low"].isna().all()
    assert {verdict(r) for _, r in df.iterrows()} == {"on 1 replicate: no test possible"}
    lines = headline(results, "accuracy", "finetune_epoch").splitlines()
    assert "over 1 replicate(s)" in lines[0]
    assert lines[1] == ("- vs Base Model: accuracy +3.0 points (on 1 replicate: no test possible); "
                        "balanced accuracy +0.0 points (on 1 replicate: no test possible).")


def test_sign_test_counts_replicates_not_hospital_cells(tmp_path):
    df = claims_frame(write_results(tmp_path), "accuracy", n_boot=0).set_index("rival")
    assert df.loc["base_model", "replicates W/T/L"] == "6/0/0"
    assert df.loc["base_model", "sign p"] == pytest.approx(2 / 2**6)


@pytest.mark.skipif(not (REPORT / "restore_predictions.csv.gz").exists(), reason="needs the committed report")
def test_headline_verdicts_are_the_claims_tables():
    """One Holm family for both: the sentences for a restore mode carry the table's verdicts, p-values
    and intervals, in accuracy and in balanced accuracy."""
    frames = {m: claims_frame(REPORT, m, n_boot=50) for m in ("accuracy", "balanced_accuracy")}
    df = frames["accuracy"]
    assert len(df) == 12 and df["t p (Holm)"].notna().all()
    for mode in ("none", "recalibrate", "finetune_epoch"):
        lines = headline(REPORT, "accuracy", mode).splitlines()[1:]
        rows = {m: f[f["restore"] == mode] for m, f in frames.items()}
        assert len(lines) == len(rows["accuracy"]) == len(rows["balanced_accuracy"]) == 4
        for i, line in enumerate(lines):
            acc, bal = line.split("; ")
            for clause, (metric, f) in zip((acc, bal), rows.items()):
                r = f.iloc[i]
                assert f"Holm p={r['t p (Holm)']:.2g}: {verdict(r)})" in clause, (clause, r.to_dict())
                assert f"[{r['holm low']:+.1f}, {r['holm high']:+.1f}]" in clause
            assert acc.split(": ", 1)[1].startswith("accuracy ") and bal.startswith("balanced accuracy ")
