"""Notebook 07's tables from federated_eval.csv alone: the numbers, the verdicts, the two-scheme tool."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dvlib.io import DvlibError
from dvlib.studies.federated import report as fedrep

ROOT = Path(__file__).resolve().parents[1]
# (method, restore, rounds, sync rounds, MB up): the data vector's two restores, FedAvg at R = 1 and 4
SETTINGS = [("data_vector", "none", 1, 1, 19.0), ("data_vector", "recalibrate", 1, 2, 19.1),
            ("fedavg", "none", 1, 1, 19.0), ("fedavg", "none", 4, 4, 76.0)]


def _eval(folder: Path, acc: dict, hospitals: int = 2) -> Path:
    """A results folder whose federated_eval.csv has pooled accuracy ``acc[setting][replicate]``;
    each hospital's accuracy is the pooled one minus 0.01 * hospital; balanced accuracy = accuracy / 2."""
    rows = []
    for (method, restore, rounds, sync, mb), values in zip(SETTINGS, acc.values()):
        for t, a in enumerate(values):
            for part in ["pooled"] + [f"hospital_{h}" for h in range(1, hospitals + 1)]:
                v = a - (0.01 * int(part.split("_")[1]) if part != "pooled" else 0.0)
                rows.append({"split_seed": 0, "train_seed": t, "method": method, "restore": restore, "rounds": rounds,
                             "sync_rounds": sync, "bytes_up_per_hospital": mb * 1e6, "bytes_down_per_hospital": 2 * mb * 1e6,
                             "eval_on": part, "n": 10, "accuracy": v, "balanced_accuracy": v / 2})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "federated_eval.csv", index=False)
    return folder


ACC = {"dv none": [0.50, 0.54, 0.52], "dv recal": [0.60, 0.64, 0.65],
       "fedavg 1": [0.55, 0.56, 0.60], "fedavg 4": [0.70, 0.75, 0.77]}


def test_scheme_table_mean_sd_and_paired_difference(tmp_path):
    a = _eval(tmp_path / "a", ACC)
    b = _eval(tmp_path / "b", {k: [v - 0.1 for v in vals] for k, vals in ACC.items()})
    t = fedrep.scheme_table({"iid": a, "dir": b}, "accuracy", "pooled").set_index("setting")
    assert list(t.index) == ["Data Vector (no restore)", "Data Vector + BN recalibrate", "FedAvg, R = 1", "FedAvg, R = 4"]
    assert t.loc["FedAvg, R = 4", "synchronous rounds"] == 4 and t.loc["FedAvg, R = 4", "MB sent per hospital"] == 76.0
    v = 100 * np.array(ACC["fedavg 4"])
    assert t.loc["FedAvg, R = 4", "iid: Accuracy (%)"] == f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"
    d = v - 100 * np.array(ACC["dv recal"])  # +10, +11, +12: mean +11.0
    col = "iid: minus DV + BN recalibrate (points)"
    assert t.loc["FedAvg, R = 4", col].startswith(f"{d.mean():+.1f} [")
    assert t.loc["Data Vector + BN recalibrate", col] == "reference"
    # the second scheme is 10 points lower everywhere: the same differences, lower values
    w = v - 10
    assert t.loc["FedAvg, R = 4", "dir: Accuracy (%)"] == f"{w.mean():.1f} ± {w.std(ddof=1):.1f}"
    assert t.loc["FedAvg, R = 4", "dir: minus DV + BN recalibrate (points)"] == t.loc["FedAvg, R = 4", col]
    # per hospital: the mean over hospitals (pooled - 0.015 here)
    h = fedrep.scheme_table({"iid": a}, "accuracy", "hospitals").set_index("setting")
    assert h.loc["FedAvg, R = 4", "iid: Accuracy (%)"].startswith(f"{(v - 1.5).mean():.1f} ±")


def test_scheme_table_refuses_a_run_without_the_reference(tmp_path):
    a = _eval(tmp_path / "a", ACC)
    ev = pd.read_csv(a / "federated_eval.csv")
    ev[ev["restore"] != "recalibrate"].to_csv(a / "federated_eval.csv", index=False)
    with pytest.raises(DvlibError, match="no data-vector rows with restore 'recalibrate'"):
        fedrep.scheme_table({"iid": a})


def test_comparison_and_summary_say_where_each_wins(tmp_path):
    a = _eval(tmp_path / "a", ACC)
    c = fedrep.comparison_frame(a, "accuracy", "pooled").set_index("rounds")
    assert c.loc[4, "diff"] == pytest.approx(0.11) and c.loc[4, "low"] > 0  # +10, +11, +12: a clear win
    assert c.loc[1, "diff"] == pytest.approx(-0.06) and c.loc[1, "high"] < 0  # -5, -8, -5: a clear loss
    text = fedrep.federated_summary(a, "accuracy")
    assert "FedAvg beats the data vector at R = 4, falls behind it at R = 1" in text
    assert "FedAvg does better than the data vector at R = 4 (4.0 times its upload)" in text


def test_tool_writes_both_schemes_and_refuses_a_missing_run(tmp_path):
    a = _eval(tmp_path / "runs" / "x-iid" / "results", ACC)
    b = _eval(tmp_path / "runs" / "x-dir" / "results", ACC)
    pd.DataFrame([{"split_seed": 0, "train_seed": t, "check": "fedavg-1 == run's merged_weighted", "max_abs_diff": d,
                   "bit_identical": d == 0} for t, d in enumerate([0.0, 2e-7, 0.0])]).to_csv(a / "federated_checks.csv",
                                                                                           index=False)
    out = tmp_path / "out"
    tool = [sys.executable, str(ROOT / "tools" / "federated_schemes.py")]
    r = subprocess.run(tool + [str(a.parent), str(b.parent), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (out / "README.md").read_text()
    assert "iid: Accuracy (%)" in md and "dir: Accuracy (%)" in md and "## Where each wins" in md
    assert len(list(out.glob("federated_*.csv"))) == 4
    assert "| fedavg-1 == run's merged_weighted |          2e-07 |               2 |            3 |" in md
    assert "x-dir`: no `federated_checks.csv`." in md
    r = subprocess.run(tool + [str(a.parent), str(tmp_path / "nope"), "--out", str(tmp_path / "out2")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no federated_eval.csv" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out2").exists()
