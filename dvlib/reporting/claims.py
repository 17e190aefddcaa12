"""Every "Data Vector beats B" claim with its paired test, from the result files alone.

Pairing: the same split, training seed and test images. Three views of one claim:
- *cells*: seed x hospital cells (hospital i's own test split) won/tied/lost, exact sign test;
- *pooled, over replicates*: the difference on all test images, mean over replicates with a 95 %
  t-interval and p-value (training and split randomness both in it);
- *pooled, patient bootstrap*: the same mean difference with only the test-set sampling noise
  (patients resampled within each replicate; :func:`dvlib.stats.paired_bootstrap_replicates`).
p-values of the t-tests are Holm-adjusted over the family of claims.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dvlib import methods, stats
from dvlib.reporting.tables import (BASE_MODEL, METRIC_LABELS, PAPER_COLUMNS, REPLICATE, RESTORE_LABELS, load_results,
                                    model_rows, paper_rows, results_dir)

RIVALS = ("base_model", "params_mean", "full_training", "random_vector")


def _predictions(results) -> pd.DataFrame:
    frames = [pd.read_csv(results_dir(results) / f"{s}_predictions.csv.gz") for s in ("finetune", "restore")]
    return pd.concat(frames, ignore_index=True)


def _model_preds(preds: pd.DataFrame, rival: str, restore_mode: str, rep: tuple) -> list[pd.DataFrame]:
    """Per-image predictions of ``rival`` in one replicate (several models for the base model)."""
    p = preds[(preds["split_seed"] == rep[0]) & (preds["train_seed"] == rep[1])]
    if rival == "base_model":
        return [g.sort_values(["eval_on", "image"]) for _, g in p[p["method"] == "base_model"].groupby("model")]
    if rival == "full_training":
        return [p[p["method"] == "full_training"].sort_values(["eval_on", "image"])]
    return [p[(p["method"] == rival) & (p["restore"] == restore_mode)].sort_values(["eval_on", "image"])]


def claim(results, metric: str, rival: str, restore_mode: str, n_boot: int = 2000, preds=None) -> dict:
    """Data Vector (restored with ``restore_mode``) against ``rival``: the three views."""
    rows = paper_rows(results, restore_mode)
    wide = rows.pivot_table(index=REPLICATE + ["part"], columns="column", values=metric)
    cells = wide.drop(index="pooled", level="part")
    d_cells = (cells["data_vector"] - cells[rival]).dropna().to_numpy()
    d_pooled = (wide.xs("pooled", level="part")["data_vector"] - wide.xs("pooled", level="part")[rival]).dropna()
    sign, t = stats.sign_test(d_cells), stats.paired_t(d_pooled.to_numpy())
    out = {"claim": f"{methods.label('data_vector')} ({RESTORE_LABELS[restore_mode]}) vs {PAPER_COLUMNS[rival]}",
           "rival": rival, "restore": restore_mode, "metric": metric,
           "cells W/T/L": f"{sign.wins}/{sign.ties}/{sign.losses}", "sign p": sign.pvalue,
           "pooled diff (pp)": t.diff * 100, "t low": t.low * 100, "t high": t.high * 100, "t p": t.pvalue,
           "replicates": t.n}
    if metric in stats.METRICS and preds is not None:
        sets = []
        for rep in d_pooled.index:
            dv = _model_preds(preds, "data_vector", restore_mode, rep)[0]
            others = _model_preds(preds, rival, restore_mode, rep)
            if dv.empty or any(len(o) != len(dv) for o in others):
                continue
            sets.append((dv["label"].to_numpy(), dv["pred"].to_numpy(), [o["pred"].to_numpy() for o in others],
                         dv["patient"].to_numpy()))
        if sets:
            n_classes = int(max(preds["label"].max(), preds["pred"].max()) + 1)
            b = stats.paired_bootstrap_replicates(sets, n_classes, metric, n_boot=n_boot)
            out.update({"boot low": b.low * 100, "boot high": b.high * 100, "boot p": b.pvalue})
    return out


def claims_frame(results, metric: str = "accuracy", restore_mode: str = "finetune_epoch",
                 restores=("none", "recalibrate", "finetune_epoch"), n_boot: int = 2000) -> pd.DataFrame:
    """Every claim (each rival x each restore of the merged models), tidy, with Holm-adjusted t p-values."""
    try:
        preds = _predictions(results)
    except FileNotFoundError:
        preds = None
    rs = load_results(results, "restore_eval")
    present = {(m, r) for m, r in zip(rs["method"], rs["restore"])}
    rows = [claim(results, metric, rival, r, n_boot, preds) for r in restores if ("data_vector", r) in present
            for rival in RIVALS if rival in ("base_model", "full_training") or (rival, r) in present]
    df = pd.DataFrame(rows)
    ok = df["t p"].notna()
    df["t p (Holm)"] = np.nan
    if ok.any():
        df.loc[ok, "t p (Holm)"] = stats.holm(df.loc[ok, "t p"].to_numpy())
    return df


def verdict(row) -> str:
    p = row.get("t p (Holm)", np.nan)
    if not np.isfinite(p):
        return "too few replicates to test"
    if p >= 0.05:
        return "no significant difference"
    return f"{methods.label('data_vector')} {'better' if row['pooled diff (pp)'] > 0 else 'worse'}"


def claims_table(results, metric: str = "accuracy", restore_mode: str = "finetune_epoch") -> pd.DataFrame:
    """:func:`claims_frame` for reading: one line per claim."""
    df = claims_frame(results, metric)
    out = pd.DataFrame({
        "cells won/tied/lost (sign p)": df["cells W/T/L"] + " (p=" + df["sign p"].map("{:.2g}".format) + ")",
        "pooled difference, pp [95 % t-interval]": df.apply(
            lambda r: f"{r['pooled diff (pp)']:+.1f}" + (f" [{r['t low']:+.1f}, {r['t high']:+.1f}]"
                                                        if np.isfinite(r["t low"]) else ""), axis=1),
        "p (t, Holm)": df.get("t p (Holm)", pd.Series(np.nan, index=df.index)).map("{:.2g}".format),
        "test-set noise only, pp [95 % bootstrap]": df.apply(
            lambda r: f"[{r['boot low']:+.1f}, {r['boot high']:+.1f}]" if np.isfinite(r.get("boot low", np.nan)) else "–",
            axis=1),
        "verdict": df.apply(verdict, axis=1),
    })
    out.index = df["claim"]
    out.index.name = METRIC_LABELS[metric]
    return out


def headline(results, metric: str = "accuracy", restore_mode: str = "finetune_epoch") -> str:
    """A few plain sentences from the tests: where Data Vector wins and where it loses. The Holm
    correction runs over every claim of :func:`claims_table` (all restores), so both say the same."""
    df = claims_frame(results, metric)
    df = df[df["restore"] == restore_mode]
    lines = [f"{METRIC_LABELS[metric]}, merged models restored with {RESTORE_LABELS[restore_mode]}:"]
    for _, r in df.iterrows():
        ci = f" [{r['t low']:+.1f}, {r['t high']:+.1f}]" if np.isfinite(r["t low"]) else ""
        lines.append(f"- vs {PAPER_COLUMNS[r['rival']]}: {r['pooled diff (pp)']:+.1f} points pooled{ci} over "
                     f"{r['replicates']} replicate(s) (Holm p={r.get('t p (Holm)', float('nan')):.2g}); cells "
                     f"won/tied/lost {r['cells W/T/L']} (sign p={r['sign p']:.2g}): {verdict(r)}.")
    return "\n".join(lines)


def variance_table(runs: dict, metric: str = "accuracy", eval_on: str = "pooled") -> pd.DataFrame:
    """How much of a model's spread comes from the split and how much from training: for each run
    (label -> results folder) and model (Full Training; the data-vector merge after each restore), a
    one-way random-effects decomposition over replicates (:func:`dvlib.stats.variance_components`),
    in percentage points (standard deviations)."""
    rows = []
    for label, results in runs.items():
        frames = {m: df for m, (_, df) in model_rows(results).items() if m != BASE_MODEL}  # one row per cell
        for model, df in frames.items():
            df = df[df["eval_on"] == eval_on]
            if df.empty or df["train_seed"].nunique() < 2 or df["split_seed"].nunique() < 2:
                continue
            v = stats.variance_components(df, metric)
            rows.append({"run": label, "model": model, "replicates": len(df), "splits": v["n_splits"],
                         f"mean {metric} (%)": round(v["mean"] * 100, 1),
                         "sd from the split (pp)": round(np.sqrt(v["var_split"]) * 100, 2),
                         "sd from training (pp)": round(np.sqrt(v["var_train"]) * 100, 2),
                         "share of variance from the split": round(v["share_split"], 2)})
    return pd.DataFrame(rows)
