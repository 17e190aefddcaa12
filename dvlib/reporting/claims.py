"""Every "Data Vector beats B" claim with its paired test, from the result files alone.

Pairing: the same split, training seed and test images. Three views of one claim:
- *replicates*: (split seed, training seed) replicates won/tied/lost on all test images, exact sign
  test; the replicate is the independent unit (its hospitals' cells share one merged model);
- *pooled, over replicates*: the difference on all test images, mean over replicates with a paired
  t-test (training and split randomness both in it). Its p-value is Holm-adjusted over the family of
  claims, and its interval is the t-interval at the level Holm judged that claim at
  (:func:`holm_interval`), so the interval excludes 0 exactly when the Holm verdict is a difference;
- *pooled, patient bootstrap*: the same mean difference with only the test-set sampling noise
  (patients resampled within each replicate; :func:`dvlib.stats.paired_bootstrap_replicates`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dvlib import methods, stats
from dvlib.reporting.tables import (BASE_MODEL, METRIC_LABELS, NONE, PAPER_COLUMNS, REPLICATE, RESTORE_LABELS, load_results,
                                    model_rows, paper_rows, results_dir)

RIVALS = ("base_model", "params_mean", "full_training", "random_vector")
ALPHA = 0.05
HOLM_INTERVAL = "95 % Holm-adjusted t-interval"


def holm_interval(diffs, p: float, p_holm: float, alpha: float = ALPHA) -> tuple[float, float]:
    """The t-interval of ``diffs`` at level 1 - alpha * p / p_holm: the level at which Holm's step-down
    judged this claim (between the unadjusted 95 % and the Bonferroni level 1 - alpha / m). By the
    t-test's duality it excludes 0 exactly when ``p_holm < alpha``. (nan, nan) where untestable."""
    if not (np.isfinite(p) and np.isfinite(p_holm)) or len(diffs) < 2:
        return np.nan, np.nan
    if p <= 0 or p_holm <= 0:  # identical non-zero differences: a zero-width interval at any level
        iv = stats.mean_interval(diffs)
        return iv.low, iv.high
    iv = stats.mean_interval(diffs, 1 - alpha * p / p_holm)
    return iv.low, iv.high


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
    d_pooled = (wide.xs("pooled", level="part")["data_vector"] - wide.xs("pooled", level="part")[rival]).dropna()
    sign, t = stats.sign_test(d_pooled.to_numpy()), stats.paired_t(d_pooled.to_numpy())
    out = {"claim": f"{methods.label('data_vector')} ({RESTORE_LABELS[restore_mode]}) vs {PAPER_COLUMNS[rival]}",
           "rival": rival, "restore": restore_mode, "metric": metric,
           "replicates W/T/L": f"{sign.wins}/{sign.ties}/{sign.losses}", "sign p": sign.pvalue,
           "pooled diff (pp)": t.diff * 100, "t low": t.low * 100, "t high": t.high * 100, "t p": t.pvalue,
           "replicates": t.n, "diffs": d_pooled.to_numpy()}
    if metric in stats.METRICS and preds is not None and n_boot:
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
        preds = _predictions(results) if n_boot else None  # n_boot=0: the t-tests alone (the headline's)
    except FileNotFoundError:
        preds = None
    rs = load_results(results, "restore_eval")
    present = {(m, r) for m, r in zip(rs["method"], rs["restore"])}
    rows = [claim(results, metric, rival, r, n_boot, preds) for r in restores if ("data_vector", r) in present
            for rival in RIVALS if rival in ("base_model", "full_training") or (rival, r) in present]
    return with_holm(pd.DataFrame(rows))


def with_holm(df: pd.DataFrame) -> pd.DataFrame:
    """``t p (Holm)`` over the testable claims and each claim's Holm-adjusted interval (``holm low``,
    ``holm high``, pp) from its per-replicate differences (``diffs``, a fraction; dropped here)."""
    df = df.copy()
    ok = df["t p"].notna()
    df["t p (Holm)"] = np.nan
    if ok.any():
        df.loc[ok, "t p (Holm)"] = stats.holm(df.loc[ok, "t p"].to_numpy())
    bounds = [holm_interval(d, p, ph) for d, p, ph in zip(df["diffs"], df["t p"], df["t p (Holm)"])]
    df["holm low"] = [lo * 100 for lo, _ in bounds]
    df["holm high"] = [hi * 100 for _, hi in bounds]
    return df.drop(columns="diffs")


def verdict(row) -> str:
    p = row.get("t p (Holm)", np.nan)
    if not np.isfinite(p):
        return "on 1 replicate: no test possible" if row.get("replicates", 0) < 2 else "too few replicates to test"
    if p >= 0.05:
        return "no significant difference"
    return f"{methods.label('data_vector')} {'better' if row['pooled diff (pp)'] > 0 else 'worse'}"


def _interval(r) -> str:
    """``"+6.8 [-1.0, +14.6]"``: pooled difference with its Holm-adjusted interval (pp)."""
    ci = f" [{r['holm low']:+.1f}, {r['holm high']:+.1f}]" if np.isfinite(r["holm low"]) else ""
    return f"{r['pooled diff (pp)']:+.1f}{ci}"


def claims_table(results, metric: str = "accuracy", restore_mode: str = "finetune_epoch") -> pd.DataFrame:
    """:func:`claims_frame` for reading: one line per claim; interval and verdict both from Holm."""
    df = claims_frame(results, metric)
    out = pd.DataFrame({
        "replicates won/tied/lost (sign p)": df["replicates W/T/L"] + " (p=" + df["sign p"].map("{:.2g}".format) + ")",
        f"pooled difference, pp [{HOLM_INTERVAL}]": df.apply(_interval, axis=1),
        "p (t, Holm)": df["t p (Holm)"].map(lambda p: f"{p:.2g}" if np.isfinite(p) else NONE),
        "test-set noise only, pp [95 % bootstrap]": df.apply(
            lambda r: f"[{r['boot low']:+.1f}, {r['boot high']:+.1f}]" if np.isfinite(r.get("boot low", np.nan)) else NONE,
            axis=1),
        "verdict": df.apply(verdict, axis=1),
    })
    out.index = df["claim"]
    out.index.name = METRIC_LABELS[metric]
    return out


def _clause(r, metric: str) -> str:
    name = METRIC_LABELS[metric].replace(" (%)", "").lower()
    p = r["t p (Holm)"]
    test = f"Holm p={p:.2g}: {verdict(r)}" if np.isfinite(p) else verdict(r)
    return f"{name} {_interval(r)} points ({test})"


def headline(results, metric: str = "accuracy", restore_mode: str = "finetune_epoch",
             other: str | None = "balanced_accuracy", n_boot: int = 0) -> str:
    """A sentence per rival, in ``metric`` and in ``other`` (both by default: accuracy alone can hide a
    loss on rare classes): the pooled difference with its Holm-adjusted interval and the Holm verdict.
    Each metric's Holm family is every claim of :func:`claims_table` (all restores), so both agree."""
    metrics = [metric] + ([other] if other and other != metric else [])
    frames = [claims_frame(results, m, n_boot=n_boot) for m in metrics]
    frames = [f[f["restore"] == restore_mode].set_index("rival") for f in frames]
    first = frames[0]
    n = int(first["replicates"].max()) if len(first) else 0
    lines = [f"Merged models restored with {RESTORE_LABELS[restore_mode]}, {methods.label('data_vector')} minus each "
             f"rival on all test images over {n} replicate(s)" + (f", [{HOLM_INTERVAL}]:" if n > 1 else ":")]
    for rival in first.index:
        clauses = [_clause(f.loc[rival], m) for f, m in zip(frames, metrics) if rival in f.index]
        lines.append(f"- vs {PAPER_COLUMNS[rival]}: " + "; ".join(clauses) + ".")
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
    return pd.DataFrame(rows).set_index(["run", "model"]) if rows else pd.DataFrame(rows)
