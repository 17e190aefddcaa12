"""dvlib.studies.noise.report: training noise on a fixed split, and two schemes compared on the same test images."""
import numpy as np
import pandas as pd
import pytest

from dvlib.io import DvlibError
from dvlib.studies.noise.report import noise_table, scheme_gap, scores

N_IMAGES, N_PATIENTS, TRAIN_SEEDS = 120, 40, (0, 1, 2, 3, 4)


def _run(folder, acc_full, acc_dv, seed, images=None):
    """A results folder: Full Training and the data-vector merge (restore none) with per-image
    predictions of known accuracy per training seed, plus two hospitals' own models."""
    rng = np.random.default_rng(seed)
    images = images if images is not None else [f"img_{i:03d}" for i in range(N_IMAGES)]
    labels = np.arange(len(images)) % 3
    patients = [f"p{i % N_PATIENTS}" for i in range(len(images))]
    ev_ft, ev_rs, pr_ft, pr_rs = [], [], [], []

    def preds(acc, model, method, restore, t):
        right = np.zeros(len(images), bool)
        right[rng.choice(len(images), int(round(acc * len(images))), replace=False)] = True
        pred = np.where(right, labels, (labels + 1) % 3)
        rows = [{"eval_on": f"hospital_{1 + i % 2}", "image": im, "label": int(lab), "pred": int(p), "p_true": 0.5,
                 "split_seed": 0, "train_seed": t, "model": model, "method": method, "restore": restore, "lam": np.nan,
                 "patient": pa} for i, (im, lab, p, pa) in enumerate(zip(images, labels, pred, patients))]
        ev = {"split_seed": 0, "train_seed": t, "model": model, "method": method, "restore": restore, "lam": np.nan,
              "eval_on": "pooled", "n": len(images), "accuracy": float(right.mean()), "balanced_accuracy": float(right.mean())}
        return ev, rows

    for t in TRAIN_SEEDS:
        for model, method, acc in (("full", "full_training", acc_full[t]), ("hospital_1", "base_model", 0.4),
                                   ("hospital_2", "base_model", 0.5)):
            ev, rows = preds(acc, model, method, "none", t)
            ev_ft.append(ev)
            pr_ft += rows
        ev, rows = preds(acc_dv[t], "merged_data_vector", "data_vector", "none", t)
        ev_rs.append(ev)
        pr_rs += rows
    folder.mkdir(parents=True)
    pd.DataFrame(ev_ft).to_csv(folder / "finetune_eval.csv", index=False)
    pd.DataFrame(ev_rs).to_csv(folder / "restore_eval.csv", index=False)
    pd.DataFrame(pr_ft).to_csv(folder / "finetune_predictions.csv.gz", index=False)
    pd.DataFrame(pr_rs).to_csv(folder / "restore_predictions.csv.gz", index=False)
    return folder


def test_noise_table_gives_mean_and_sd_over_training_seeds(tmp_path):
    full = [0.60, 0.65, 0.70, 0.55, 0.50]
    r = _run(tmp_path / "a", full, [0.6] * 5, seed=1)
    t = noise_table({"a": r}).set_index("model")
    row = t.loc["Full Training"]
    got = scores(r).query("model == 'Full Training'").sort_values("train_seed")["accuracy"].to_numpy()
    assert got == pytest.approx(full, abs=1e-9)  # 120 images: each accuracy exactly representable
    assert row["training seeds"] == 5
    assert row["sd over training seeds (pp)"] == pytest.approx(round(np.std(full, ddof=1) * 100, 2))
    assert row["min-max (%)"] == "50.0-70.0"
    assert row["mean accuracy (%) [95 % t]"].startswith("60.0 [")
    assert t.loc["Base Model (mean of the hospitals)", "sd over training seeds (pp)"] == 0.0
    assert t.loc["Data Vector (none)", "training seeds"] == 5


def test_scheme_gap_finds_a_known_difference_and_none_where_none(tmp_path):
    full = [0.6] * 5
    a = _run(tmp_path / "a", full, [0.80, 0.75, 0.80, 0.85, 0.80], seed=2)
    b = _run(tmp_path / "b", full, [0.60, 0.55, 0.60, 0.65, 0.60], seed=3)
    g = scheme_gap(a, b, n_boot=500).set_index("model")
    dv = g.loc["Data Vector (none)"]
    assert dv["pairs (split, training seed)"] == 5
    assert dv["difference (pp) [95 % paired t]"].startswith("+20.0 [+20.0, +20.0]")  # the same +20 in every pair
    assert dv["p (bootstrap)"] < 0.01
    lo, hi = (float(x) for x in dv["test-set noise only (pp) [95 % bootstrap]"].strip("[]").split(","))
    assert lo < 20 < hi and lo > 5
    ft = g.loc["Full Training"]
    assert ft["difference (pp) [95 % paired t]"].startswith("+0.0")
    assert ft["p (bootstrap)"] > 0.05
    assert g.loc["Base Model (mean of the hospitals)", "test-set noise only (pp) [95 % bootstrap]"] == "–"


def test_scheme_gap_refuses_runs_on_different_test_images(tmp_path):
    a = _run(tmp_path / "a", [0.6] * 5, [0.6] * 5, seed=4)
    b = _run(tmp_path / "b", [0.6] * 5, [0.6] * 5, seed=5, images=[f"other_{i:03d}" for i in range(N_IMAGES)])
    with pytest.raises(DvlibError, match="test images differ.*--test-design shared"):
        scheme_gap(a, b, n_boot=100)


def _tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "training_noise.py"
    spec = importlib.util.spec_from_file_location("training_noise", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_noise_tool_writes_its_tables_and_refuses_a_missing_run(tmp_path, capsys):
    a = _run(tmp_path / "a", [0.6, 0.62, 0.58, 0.6, 0.6], [0.7] * 5, seed=6)
    b = _run(tmp_path / "b", [0.6, 0.62, 0.58, 0.6, 0.6], [0.6] * 5, seed=7)
    out = tmp_path / "out"
    assert _tool().main([str(a), str(b), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {f"{t}.{ext}" for t in ("noise_table", "scheme_gap", "against_full_training")
                                              for ext in ("csv", "md")} | {"README.md"}
    ag = pd.read_csv(out / "against_full_training.csv").set_index(["run", "model"])
    assert ag.loc[(str(a), "Data Vector (none)"), "minus Full Training (pp) [95 % paired t]"].startswith("+10.0")
    gap = pd.read_csv(out / "scheme_gap.csv").set_index("model")
    assert gap.loc["Data Vector (none)", "difference (pp) [95 % paired t]"].startswith("+10.0")
    assert "minus" in (out / "README.md").read_text()
    assert _tool().main([str(a), str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2")]) == 2
    assert "no finetune_eval.csv" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
