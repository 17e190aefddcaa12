"""Notebook 07's tables, figures and sentences, from ``results/federated_eval.csv`` alone.

Accuracy against what a consortium pays for it: synchronous rounds (rounds every hospital takes
part in) and bytes each hospital sends. The data vector is one exchange (plus one sequential round
per restore pass); FedAvg and FedBN spend the same local epochs over R rounds. ``pooled`` is every
test image together; ``hospitals`` the mean over hospitals of each one's own test split (the paper's
Part Index rows). Differences are paired by replicate (same split, training seed and test images).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from dvlib.io import DvlibError
from dvlib.reporting.figures import _finish
from dvlib.reporting.tables import (
    METRIC_LABELS,
    REPLICATE,
    RESTORE_LABELS,
    cell,
    load_results,
)
from dvlib.stats import paired_t

LABELS = {"data_vector": "Data Vector", "fedavg": "FedAvg", "fedbn": "FedBN"}
COLORS = {"fedavg": "tab:blue", "fedbn": "tab:green"}
DV_MARKERS = {"none": "x", "recalibrate": "o", "finetune_epoch": "s", "recalibrate+finetune_epoch": "D"}
SCOPES = {"pooled": "all test images (pooled)", "hospitals": "mean over hospitals, each on its own test split"}


def federated_rows(results) -> pd.DataFrame:
    """Per replicate and setting: metrics pooled and averaged over the hospitals (``scope``)."""
    ev = load_results(results, "federated_eval")
    keys = [*REPLICATE, "method", "restore", "rounds", "sync_rounds", "bytes_up_per_hospital", "bytes_down_per_hospital"]
    metrics = ["accuracy", "balanced_accuracy"]
    pooled = ev[ev["eval_on"] == "pooled"][keys + metrics].assign(scope="pooled")
    hosp = ev[ev["eval_on"].str.startswith("hospital_")].groupby(keys, as_index=False)[metrics].mean().assign(scope="hospitals")
    return pd.concat([pooled, hosp], ignore_index=True)


def setting_label(method: str, restore: str, rounds: int) -> str:
    if method == "data_vector":
        return f"Data Vector + {RESTORE_LABELS.get(restore, restore)}" if restore != "none" else "Data Vector (no restore)"
    return f"{LABELS[method]}, R = {int(rounds)}"


def _order(df: pd.DataFrame) -> pd.DataFrame:
    rank = {"data_vector": 0, "fedavg": 1, "fedbn": 2}
    modes = list(DV_MARKERS)
    return df.assign(_m=df["method"].map(rank), _r=df["restore"].map(lambda r: modes.index(r) if r in modes else 9)
                     ).sort_values(["_m", "_r", "rounds"]).drop(columns=["_m", "_r"])


def federated_table(results, scope: str = "pooled") -> pd.DataFrame:
    """Each setting: synchronous rounds, MB up/down per hospital, accuracy and balanced accuracy
    (%, mean [95 % interval] over replicates) on ``scope`` (``pooled`` or ``hospitals``)."""
    df = federated_rows(results)
    df = df[df["scope"] == scope]
    g = _order(df).groupby(["method", "restore", "rounds"], sort=False)
    t = g.agg(**{"synchronous rounds": ("sync_rounds", "first"),
                 "MB sent per hospital": ("bytes_up_per_hospital", lambda v: round(float(v.mean()) / 1e6, 2)),
                 "MB received per hospital": ("bytes_down_per_hospital", lambda v: round(float(v.mean()) / 1e6, 2)),
                 METRIC_LABELS["accuracy"]: ("accuracy", cell),
                 METRIC_LABELS["balanced_accuracy"]: ("balanced_accuracy", cell),
                 "replicates": ("accuracy", "size")})
    t.index = [setting_label(m, r, n) for m, r, n in t.index]
    t.index.name = f"on {SCOPES[scope]}"
    return t


def _spread_ticks(values, ratio: float = 1.25) -> list[float]:
    """The distinct values, dropping any within ``ratio`` of the last kept one (labels would overlap)."""
    kept: list[float] = []
    for v in sorted(set(float(v) for v in values if v > 0)):
        if not kept or v / kept[-1] >= ratio:
            kept.append(v)
    return kept


def _plot(results, x: str, xlabel: str, out, title: str):
    import matplotlib.pyplot as plt

    df = federated_rows(results)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for i, scope in enumerate(SCOPES):
        for j, metric in enumerate(("accuracy", "balanced_accuracy")):
            ax = axes[i, j]
            d = df[df["scope"] == scope]
            for method, color in COLORS.items():
                g = d[d["method"] == method].groupby(x)[metric].agg(["mean", "std"]).sort_index()
                if g.empty:
                    continue
                xs = g.index.to_numpy(dtype=float) / (1e6 if x.startswith("bytes") else 1)
                ax.errorbar(xs, 100 * g["mean"], yerr=100 * g["std"].fillna(0), color=color, marker=".", capsize=3,
                            label=f"{LABELS[method]} (R rounds, epochs/R each)")
            dv = d[d["method"] == "data_vector"]
            for mode, g in dv.groupby("restore"):
                xs = float(g[x].mean()) / (1e6 if x.startswith("bytes") else 1)
                ax.errorbar([xs], [100 * g[metric].mean()], yerr=[100 * (g[metric].std() if len(g) > 1 else 0)],
                            color="tab:red", marker=DV_MARKERS.get(mode, "^"), ms=8, capsize=3, ls="none",
                            label=setting_label("data_vector", mode, 1))
            ax.set_xscale("log", base=2 if not x.startswith("bytes") else 10)
            ax.set_title(f"{METRIC_LABELS[metric]}: {SCOPES[scope]}", fontsize=9)
            ax.set_ylabel(METRIC_LABELS[metric])
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel(xlabel)
            from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator, ScalarFormatter

            if not x.startswith("bytes"):
                ax.xaxis.set_major_locator(FixedLocator(sorted(set(df[x].astype(int)))))
                ax.xaxis.set_major_formatter(ScalarFormatter())
            else:  # a log axis labelled at the megabytes the settings send, not at powers of ten
                ax.xaxis.set_major_locator(FixedLocator(_spread_ticks(df[x].unique() / 1e6)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    n = df[REPLICATE].drop_duplicates().shape[0]
    return _finish(fig, out, f"{title} (mean ± sd over {n} replicate{'s' if n != 1 else ''})")


def plot_rounds(results, out: str | os.PathLike | None = None):
    """Accuracy and balanced accuracy (pooled; mean over hospitals) against synchronous rounds."""
    return _plot(results, "sync_rounds", "synchronous rounds (every hospital takes part)", out,
                 "The data vector's one exchange against FedAvg and FedBN at R rounds")


def plot_bytes(results, out: str | os.PathLike | None = None):
    """The same against megabytes each hospital sends."""
    return _plot(results, "bytes_up_per_hospital", "MB sent by each hospital", out,
                 "Accuracy against bytes each hospital sends")


def comparison_frame(results, metric: str = "accuracy", scope: str = "pooled",
                     reference: str = "recalibrate") -> pd.DataFrame:
    """Each FedAvg/FedBN setting minus the data vector with restore ``reference``, paired by replicate."""
    df = federated_rows(results)
    df = df[df["scope"] == scope]
    ref = df[(df["method"] == "data_vector") & (df["restore"] == reference)].set_index(REPLICATE)[metric]
    out = []
    for (method, rounds), g in df[df["method"] != "data_vector"].groupby(["method", "rounds"]):
        g = g.set_index(REPLICATE)
        both = g.index.intersection(ref.index)
        if both.empty:
            continue
        c = paired_t((g.loc[both, metric] - ref.loc[both]).to_numpy())
        out.append({"method": method, "rounds": int(rounds), "sync_rounds": int(g["sync_rounds"].iloc[0]),
                    "mb_up": float(g["bytes_up_per_hospital"].mean()) / 1e6, "value": float(g[metric].mean()),
                    "diff": c.diff, "low": c.low, "high": c.high, "p": c.pvalue, "n": c.n})
    return pd.DataFrame(out)


def mean_sd(values: pd.Series, scale: float = 100.0) -> str:
    """``"62.8 ± 1.9"``: mean and sample standard deviation over replicates (``"62.8"`` for one)."""
    v = values.dropna().to_numpy(dtype=float) * scale
    return "–" if not v.size else f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if v.size > 1 else "")


def scheme_table(runs, metric: str = "accuracy", scope: str = "pooled", reference: str = "recalibrate") -> pd.DataFrame:
    """Each setting (rows) in each run (``runs``: {name: results}, e.g. IID and Dirichlet hospitals):
    ``metric`` in % as mean ± sd over replicates, and its difference from the data vector with restore
    ``reference`` in the same run, paired by replicate (mean [95 % t-interval]). Synchronous rounds
    and MB sent per hospital, which do not depend on the split, from the first run."""
    rows: dict[tuple, dict] = {}  # (method, restore, rounds) -> the table's row, in the first run's order
    for name, results in runs.items():
        df = federated_rows(results)
        df = _order(df[df["scope"] == scope])
        ref = df[(df["method"] == "data_vector") & (df["restore"] == reference)].set_index(REPLICATE)[metric]
        if ref.empty:
            raise DvlibError(f"{name}: no data-vector rows with restore {reference!r} in federated_eval.csv")
        for key, g in df.groupby(["method", "restore", "rounds"], sort=False):
            row = rows.setdefault(key, {"setting": setting_label(*key), "synchronous rounds": int(g["sync_rounds"].iloc[0]),
                                        "MB sent per hospital": round(float(g["bytes_up_per_hospital"].mean()) / 1e6, 1)})
            g = g.set_index(REPLICATE)
            both = g.index.intersection(ref.index)
            diff = paired_t((g.loc[both, metric] - ref.loc[both]).to_numpy()) if len(both) else None
            row[f"{name}: {METRIC_LABELS[metric]}"] = mean_sd(g[metric])
            row[f"{name}: minus DV + {RESTORE_LABELS[reference]} (points)"] = (
                "reference" if key == ("data_vector", reference, 1) else
                "–" if diff is None else diff.fmt() if diff.n > 1 else f"{100 * diff.diff:+.1f}")
    return pd.DataFrame(list(rows.values()))


def _verdict(r) -> str:
    """``wins``/``loses``/``ties`` for the federated setting against the data vector."""
    if not (np.isfinite(r["low"]) and np.isfinite(r["high"])):
        return "wins" if r["diff"] > 0 else "loses" if r["diff"] < 0 else "ties"
    return "wins" if r["low"] > 0 else "loses" if r["high"] < 0 else "ties"


def _rounds_list(rs) -> str:
    rs = [str(int(r)) for r in rs]
    return rs[0] if len(rs) == 1 else ", ".join(rs[:-1]) + " and " + rs[-1]


ORDER = ("wins", "ties", "loses")


def _where(c: pd.DataFrame, name: str) -> str:
    """``FedAvg beats the data vector at R = 4 and 8, is level with it at R = 2, falls behind it at R = 1``."""
    one = int(c["n"].max()) < 2
    words = ({"wins": "is above", "ties": "is level with", "loses": "is below"} if one else
             {"wins": "beats", "ties": "is level with", "loses": "falls behind"})
    v = c.assign(v=c.apply(_verdict, axis=1))
    bits = [f"{words[k]} {'the data vector' if i == 0 else 'it'} at R = {_rounds_list(v[v['v'] == k]['rounds'])}"
            for i, k in enumerate(k for k in ORDER if (v["v"] == k).any())]
    return f"{name} " + ", ".join(bits)


def _n(k: int, word: str) -> str:
    return f"{int(k)} {word}" + ("" if int(k) == 1 else "s")


def _plain(pooled: pd.DataFrame, sync: int, mb: float) -> str:
    """Where each wins, on all test images pooled, in a few sentences."""
    if pooled.empty:
        return ""
    better = "does better than" if int(pooled["n"].max()) >= 2 else "is above"
    v = pooled.assign(v=pooled.apply(_verdict, axis=1))
    out = []
    for method, g in v[v["v"] == "wins"].groupby("method"):
        ratio = g["mb_up"] / max(mb, 1e-12)
        cheap = g["sync_rounds"].min() <= sync
        out.append(f"{LABELS[method]} {better} the data vector at R = {_rounds_list(g['rounds'])} "
                   f"({ratio.min():.1f}{'' if len(g) == 1 else f'-{ratio.max():.1f}'} times its upload"
                   + ("; at R = " + _rounds_list(g[g["sync_rounds"] <= sync]["rounds"]) + " with no more synchronous "
                      "rounds than the data vector's exchange and restore" if cheap else "") + ").")
    lost = v[v["v"] == "loses"]
    if not lost.empty:
        out.append(f"The data vector {better} " + "; ".join(
            f"{LABELS[m]} at R = {_rounds_list(g['rounds'])}" for m, g in lost.groupby("method")) + ".")
    if not out:
        out.append("No FedAvg or FedBN setting run here differs clearly from the data vector.")
    out.append("What the data vector needs is one exchange that each hospital makes when it is ready (and, with a "
               "restore, one visit each in turn); FedAvg and FedBN need every hospital online for every round.")
    return "In plain terms: " + " ".join(out)


def federated_summary(results, metric: str = "accuracy", reference: str = "recalibrate") -> str:
    """A paragraph, from the numbers: what the data vector's exchange reaches, what FedAvg and FedBN
    reach at each R and what they cost, and where each wins (paired 95 % t-intervals over
    replicates; a difference whose interval holds zero is a tie)."""
    df = federated_rows(results)
    dv = df[(df["method"] == "data_vector") & (df["scope"] == "pooled")]
    if dv.empty:
        return "No data-vector results: run notebook 04, then notebook 07."
    if reference not in set(dv["restore"]):
        reference = "none" if "none" in set(dv["restore"]) else min(set(dv["restore"]))
    ref = dv[dv["restore"] == reference]
    n = ref[REPLICATE].drop_duplicates().shape[0]
    label = METRIC_LABELS[metric].replace(" (%)", "").lower()
    mb, sync = float(ref["bytes_up_per_hospital"].mean()) / 1e6, int(ref["sync_rounds"].iloc[0])
    how = "one exchange" if sync == 1 else f"one exchange, then {_n(sync - 1, 'sequential restore pass')}"
    restored = "no restore" if reference == "none" else RESTORE_LABELS[reference]
    parts = [(f"{label.capitalize()}, over {_n(n, 'replicate')}: the data vector with {restored} ({how}; "
              f"{mb:.1f} MB sent per hospital) reaches {100 * ref[metric].mean():.1f} % on all test images pooled.")]
    for scope, scope_text in SCOPES.items():
        comp = comparison_frame(results, metric, scope, reference)
        for method in ("fedavg", "fedbn"):
            c = comp[comp["method"] == method].sort_values("rounds")
            if c.empty:
                continue
            vals = "; ".join(f"R = {r['rounds']}: {100 * r['value']:.1f} % ({100 * r['diff']:+.1f} points, "
                             f"{r['mb_up']:.1f} MB sent)" for _, r in c.iterrows())
            parts.append(f"On {scope_text}, {_where(c, LABELS[method])} ({vals}).")
    parts.append(_plain(comparison_frame(results, metric, "pooled", reference), sync, mb))
    parts.append("(Differences are paired by replicate; a win or a loss is a 95 % t-interval that excludes zero"
                 + (", and with one replicate there is no interval: above and below are point estimates only)."
                    if n < 2 else "; with few replicates most differences are ties)."))
    return " ".join(p for p in parts if p)


__all__ = [
    "comparison_frame",
    "federated_rows",
    "federated_summary",
    "federated_table",
    "plot_bytes",
    "mean_sd",
    "plot_rounds",
    "scheme_table",
    "setting_label",
]
