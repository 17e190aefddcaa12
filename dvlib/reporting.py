"""Tables and figures, made from a run's result CSVs alone (no checkpoints needed to redraw).

Table layout follows the paper's Tables 1-3: rows are hospitals ("Part Index" i, evaluated on
hospital i's own test split), columns Params Mean, Data Vector, Random Vector, Base Model (hospital
i's own model) and Full Training; cells are mean ± std over seeds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dvlib.io import DvlibError, atomic_path, write_csv, write_text

PAPER_COLUMNS = {"params_mean": "Params Mean", "data_vector": "Data Vector", "random_vector": "Random Vector",
                 "base_model": "Base Model", "full_training": "Full Training"}
METHOD_LABELS = {**PAPER_COLUMNS, "ties": "TIES", "dare": "DARE", "weighted": "Weighted Mean",
                 "pretrained": "Pretrained (no merge)"}
RESTORE_LABELS = {"none": "none", "recalibrate": "BN recalibrate", "finetune_epoch": "1 epoch per hospital",
                  "recalibrate+finetune_epoch": "recalibrate + epoch"}


def _results_dir(results: str | os.PathLike) -> Path:
    p = Path(results)
    return p / "results" if (p / "results").is_dir() else p


def load_results(results: str | os.PathLike, step: str) -> pd.DataFrame:
    """Read ``<run>/results/<step>.csv`` (``results`` may be the run folder or its results folder)."""
    path = _results_dir(results) / f"{step}.csv"
    if not path.exists():
        raise DvlibError(f"{path}: result file not found; run the step that writes it first")
    return pd.read_csv(path)


def mean_std(values: pd.Series, scale: float = 100.0) -> str:
    v = values.dropna().to_numpy() * scale
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def paper_rows(results, restore: str = "finetune_epoch") -> pd.DataFrame:
    """Tidy rows (seed, part, column, eval_on, metrics...) in the paper's layout."""
    ft = load_results(results, "finetune_eval")
    rs = load_results(results, "restore_eval")
    merged = rs[(rs["restore"] == restore) & rs["method"].isin(["params_mean", "data_vector", "random_vector"])]
    if merged.empty:
        raise DvlibError(f"no merged models restored with {restore!r} in {results}")
    parts = []
    for eval_on, g in ft.groupby("eval_on"):
        base = g[(g["method"] == "base_model") & (g["model"] == _hospital_model(eval_on))]
        full = g[g["method"] == "full_training"]
        parts += [base.assign(column="base_model"), full.assign(column="full_training")]
    parts.append(merged.assign(column=merged["method"]))
    out = pd.concat(parts, ignore_index=True)
    out["part"] = out["eval_on"].map(_part_label)
    return out


def _hospital_model(eval_on: str) -> str:
    return f"hospital_{eval_on[1:]}" if eval_on.startswith("h") else "(pooled: average of hospital models)"


def _part_label(eval_on: str) -> str:
    return f"{int(eval_on[1:]) + 1}" if eval_on.startswith("h") else "pooled"


def paper_table(results, metric: str = "accuracy", restore: str = "finetune_epoch") -> pd.DataFrame:
    """The paper's Table layout: Part Index x method, 'mean ± std' over seeds, in percent.

    The pooled row's Base Model cell is the mean over hospitals' own models on all test images.
    """
    rows = paper_rows(results, restore)
    ft = load_results(results, "finetune_eval")
    pooled_base = ft[(ft["eval_on"] == "pooled") & (ft["method"] == "base_model")]
    pooled_base = pooled_base.groupby("seed")[metric].mean().reset_index().assign(column="base_model", part="pooled")
    rows = pd.concat([rows[~((rows["part"] == "pooled") & (rows["column"] == "base_model"))], pooled_base])
    table = rows.groupby(["part", "column"])[metric].apply(mean_std).unstack("column")
    table = table.reindex(columns=list(PAPER_COLUMNS)).rename(columns=PAPER_COLUMNS)
    order = sorted([p for p in table.index if p != "pooled"], key=int) + ["pooled"]
    table = table.reindex(order)
    table.index.name = "Part Index"
    return table


def paper_table_numeric(results, metric: str = "accuracy", restore: str = "finetune_epoch") -> pd.DataFrame:
    """Tidy numbers behind :func:`paper_table`: part, column, mean, std, n_seeds (percent)."""
    rows = paper_rows(results, restore)
    g = rows.groupby(["part", "column"])[metric]
    return pd.DataFrame({"mean": g.mean() * 100, "std": g.std(ddof=1) * 100, "n_seeds": g.count()}).reset_index()


def ablation_table(results, metric: str = "accuracy", eval_on: str = "pooled") -> pd.DataFrame:
    """Merge method x restore mode (mean ± std over seeds), on pooled test images by default."""
    rs = load_results(results, "restore_eval")
    rs = rs[rs["eval_on"] == eval_on]
    t = rs.groupby(["method", "restore"])[metric].apply(mean_std).unstack("restore")
    t = t.reindex(columns=[c for c in RESTORE_LABELS if c in t.columns]).rename(columns=RESTORE_LABELS)
    t = t.reindex([m for m in METHOD_LABELS if m in t.index]).rename(index=METHOD_LABELS)
    t.index.name = "method"
    return t


def wins_summary(results, metric: str = "accuracy", restore: str = "finetune_epoch") -> pd.DataFrame:
    """Per seed and hospital: does Data Vector beat each baseline? (counts of wins / comparisons)."""
    rows = paper_rows(results, restore)
    rows = rows[rows["part"] != "pooled"]
    wide = rows.pivot_table(index=["seed", "part"], columns="column", values=metric)
    out = []
    for other in ["params_mean", "random_vector", "base_model", "full_training"]:
        if other in wide and "data_vector" in wide:
            diff = (wide["data_vector"] - wide[other]) * 100
            out.append({"versus": PAPER_COLUMNS[other], "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
                        "losses": int((diff < 0).sum()), "mean_difference_pp": float(diff.mean())})
    return pd.DataFrame(out)


def paper_datasets() -> list[str]:
    """Datasets for which the paper reports a table."""
    from dvlib.data.paper import PAPER_RESULTS

    return sorted(PAPER_RESULTS)


def paper_comparison(results, dataset: str, restore: str = "finetune_epoch") -> pd.DataFrame:
    """Our accuracy (mean over seeds) beside the paper's numbers for the same dataset, per cell."""
    from dvlib.data.paper import paper_results

    ours = paper_table_numeric(results, "accuracy", restore)
    theirs = paper_results(dataset)
    full = float(theirs.loc[theirs["method"] == "full_training", "accuracy"].iloc[0])
    per_part = theirs[theirs["method"] != "full_training"]
    per_part = pd.DataFrame({"part": per_part["part"].astype(int).astype(str), "column": per_part["method"],
                             "paper": per_part["accuracy"]})
    # the paper prints one Full Training number per table: put it beside every part
    full_rows = pd.DataFrame({"part": sorted(per_part["part"].unique()), "column": "full_training", "paper": full})
    merged = ours.merge(pd.concat([per_part, full_rows]), on=["part", "column"], how="left")
    merged["difference_pp"] = merged["mean"] - merged["paper"]
    merged["column"] = merged["column"].map(PAPER_COLUMNS)
    return merged.rename(columns={"mean": "ours_mean", "std": "ours_std"})


def save_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """CSV (for machines) and Markdown (for reviewers) side by side."""
    path = Path(path)
    write_csv(path.with_suffix(".csv"), table.reset_index() if table.index.name else table)
    write_text(path.with_suffix(".md"), table.to_markdown() + "\n")
    return path


# --- figures -----------------------------------------------------------------------------------

def _save_fig(fig, path: Path) -> list[Path]:
    out = []
    for ext in (".png", ".pdf"):
        target = path.with_suffix(ext)
        with atomic_path(target, suffix=ext) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=ext[1:])
        out.append(target)
    return out


def _finish(fig, out):
    fig.tight_layout()
    if out is not None:
        _save_fig(fig, Path(out))
    return fig


def plot_layer_cosine(results, out: str | os.PathLike | None = None):
    """Figure 2: cosine similarity to the Full Training vector per convolution layer (network order);
    one line per hospital (blue) and for the merged vectors (red: data vector before restore; dark
    red dashed: after restore). Mean over seeds with a band of ±1 std."""
    import matplotlib.pyplot as plt

    df = load_results(results, "layer_cosine")
    fig, ax = plt.subplots(figsize=(10, 4.2))
    styles = {"merged_data_vector": dict(color="tab:red", lw=2.0, label="Data Vector merge (before restore)"),
              "restored_data_vector_finetune_epoch": dict(color="darkred", lw=1.6, ls="--",
                                                          label="Data Vector merge + 1 epoch per hospital"),
              "restored_data_vector_recalibrate": dict(color="salmon", lw=1.2, ls=":",
                                                       label="Data Vector merge + BN recalibrate"),
              "merged_params_mean": dict(color="tab:green", lw=1.2, label="Params Mean")}
    for model, g in df.groupby("model"):
        agg = g.groupby("layer_index")["cosine"].agg(["mean", "std"]).fillna(0)
        if model.startswith("hospital_"):
            st = dict(color="tab:blue", lw=0.9, alpha=0.8,
                      label="hospital data vectors" if model == "hospital_0" else None)
        elif model in styles:
            st = styles[model]
        else:
            continue
        ax.plot(agg.index, agg["mean"], **st)
        ax.fill_between(agg.index, agg["mean"] - agg["std"], agg["mean"] + agg["std"], color=st["color"], alpha=0.08)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("convolution layer (network order)")
    ax.set_ylabel("cosine similarity to Full Training vector")
    ax.set_ylim(-0.05, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _finish(fig, out)


def plot_lambda_curve(results, metric: str = "accuracy", out: str | os.PathLike | None = None):
    """Accuracy of theta_pre + lam * sum(tau_i) (no restore) against lam, pooled test set, with the
    hospitals' own models and Full Training as reference lines."""
    import matplotlib.pyplot as plt

    lam = load_results(results, "lambda_eval")
    lam = lam[lam["eval_on"] == "pooled"]
    agg = lam.groupby("lam")[metric].agg(["mean", "std"]).fillna(0) * 100
    ft = load_results(results, "finetune_eval")
    ft = ft[ft["eval_on"] == "pooled"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.errorbar(agg.index, agg["mean"], yerr=agg["std"], marker="o", color="tab:red", capsize=3,
                label="data vector merge (BN mean, no restore)")
    base = ft[ft["method"] == "base_model"][metric].mean() * 100
    full = ft[ft["method"] == "full_training"][metric].mean() * 100
    ax.axhline(base, color="tab:blue", ls="--", label="hospital models (mean)")
    ax.axhline(full, color="black", ls=":", label="Full Training")
    n_hosp = int(ft["model"].str.startswith("hospital_").groupby(ft["seed"]).sum().max())
    if n_hosp:
        ax.axvline(1 / n_hosp, color="grey", lw=0.8, alpha=0.6)
        ax.text(1 / n_hosp, ax.get_ylim()[0], f" 1/N: plain average of the {n_hosp} models", fontsize=7,
                color="grey", va="bottom")
    ax.set_xlabel("lambda")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%) — pooled test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, out)


def plot_shards(results, out: str | os.PathLike | None = None):
    """Images per class in each hospital's train and test split (first seed)."""
    import matplotlib.pyplot as plt

    t = load_results(results, "shards")
    t = t[t["seed"] == t["seed"].min()]
    classes = [c for c in t.columns if c not in ("hospital", "subset", "patients", "seed")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=False)
    for ax, subset in zip(axes, ("train", "test")):
        part = t[t["subset"] == subset].set_index("hospital")[classes]
        part.plot.bar(stacked=True, ax=ax, legend=subset == "test", colormap="tab10")
        ax.set_title(f"{subset} images per hospital")
        ax.set_xlabel("hospital")
    axes[1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _finish(fig, out)


def plot_training(results, out: str | os.PathLike | None = None):
    """Training loss per epoch of every fine-tuned model (mean over seeds)."""
    import matplotlib.pyplot as plt

    h = load_results(results, "finetune_history")
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for model, g in h.groupby("model"):
        agg = g.groupby("epoch")["loss"].mean()
        ax.plot(agg.index, agg.values, marker=".", label=model, lw=2 if model == "full" else 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted cross-entropy (train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, out)


def results_frame(results, steps: Sequence[str] = ("finetune_eval", "merge_eval", "restore_eval")) -> pd.DataFrame:
    """All evaluation rows of a run in one tidy table."""
    return pd.concat([load_results(results, s).assign(step=s) for s in steps], ignore_index=True)


def headline(results, metric: str = "accuracy", restore: str = "finetune_epoch") -> str:
    """A few plain sentences: where Data Vector wins and where it loses (pooled test, mean over seeds)."""
    rows = paper_rows(results, restore)
    pooled = rows[rows["part"] == "pooled"].groupby("column")[metric].mean() * 100
    ft = load_results(results, "finetune_eval")
    base = ft[(ft["eval_on"] == "pooled") & (ft["method"] == "base_model")][metric].mean() * 100
    dv = pooled.get("data_vector", np.nan)
    lines = [f"Pooled test {metric.replace('_', ' ')}, mean over seeds (restore: {RESTORE_LABELS[restore]}):",
             f"- Data Vector {dv:.2f}",
             f"- Params Mean {pooled.get('params_mean', np.nan):.2f}",
             f"- Random Vector {pooled.get('random_vector', np.nan):.2f}",
             f"- hospital models (mean) {base:.2f}",
             f"- Full Training {pooled.get('full_training', np.nan):.2f}"]
    def verdict(diff: float) -> str:
        return "wins" if diff > 0 else ("ties" if diff == 0 else "loses")

    for other, label in [("params_mean", "Params Mean"), ("random_vector", "Random Vector"),
                         ("full_training", "Full Training")]:
        if other in pooled:
            diff = dv - pooled[other]
            lines.append(f"Data Vector vs {label}: {diff:+.2f} points ({verdict(diff)}).")
    lines.append(f"Data Vector vs the average hospital model: {dv - base:+.2f} points ({verdict(dv - base)}).")
    return "\n".join(lines)
