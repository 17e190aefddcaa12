"""Figures made from a run's result files alone; each titled, saved as PNG and PDF, and returned
(a notebook shows it inline whatever the matplotlib backend: the notebooks run ``%matplotlib inline``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dvlib.io import atomic_path
from dvlib.methods import label
from dvlib.reporting.tables import REPLICATE, load_results
from dvlib.restore import MODES


def _finish(fig, out, title: str):
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if out is not None:
        for ext in (".png", ".pdf"):
            with atomic_path(Path(out).with_suffix(ext), suffix=ext) as tmp:
                fig.savefig(tmp, dpi=150, bbox_inches="tight", format=ext[1:])
    return fig


def plot_layer_cosine(results, out: str | os.PathLike | None = None):
    """Figure 2: cosine similarity to the Full Training vector per convolution layer (network order):
    each hospital's (blue) and the merged vectors' (red: before restore; dashed: after), mean over
    replicates with a band of +-1 sd over replicates (said in the legend). The legend sits outside the
    axes, so it covers no layer."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    df = load_results(results, "layer_cosine")
    fig, ax = plt.subplots(figsize=(10, 4.2))
    merge = f"{label('data_vector')} merge"
    styles = {"merged_data_vector": dict(color="tab:red", lw=2.0, label=f"{merge} (before restore)"),
              "restored_data_vector_finetune_epoch": dict(color="darkred", lw=1.6, ls="--",
                                                          label=f"{merge} + {MODES['finetune_epoch'].label}"),
              "restored_data_vector_recalibrate": dict(color="salmon", lw=1.2, ls=":",
                                                       label=f"{merge} + {MODES['recalibrate'].label}")}
    top = 0.0
    for model, g in df.groupby("model"):
        agg = g.groupby("layer_index")["cosine"].agg(["mean", "std"]).fillna(0)
        if model.startswith("hospital_"):
            st = dict(color="tab:blue", lw=0.9, alpha=0.8, label="each hospital's data vector" if model == "hospital_1" else None)
        elif model in styles:
            st = styles[model]
        else:
            continue
        ax.plot(agg.index, agg["mean"], **st)
        ax.fill_between(agg.index, agg["mean"] - agg["std"], agg["mean"] + agg["std"], color=st["color"], alpha=0.08)
        top = max(top, float((agg["mean"] + agg["std"]).max()))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("convolution layer (network order)")
    ax.set_ylabel(f"cosine similarity to the {label('full_training')} vector")
    ax.set_ylim(min(-0.02, float(df["cosine"].min()) - 0.02), min(1.0, top * 1.15 + 0.02))
    ax.grid(alpha=0.3)
    n = df[REPLICATE].drop_duplicates().shape[0]
    handles, _ = ax.get_legend_handles_labels()
    band = "shaded: ±1 sd over replicates" if n > 1 else "1 replicate: no band"
    handles.append(Patch(color="grey", alpha=0.25, label=band))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _finish(fig, out, f"Figure 2: direction of the data vectors, layer by layer (mean of {n} replicate(s))")


def plot_lambda_curve(results, metric: str = "accuracy", out: str | os.PathLike | None = None):
    """Pooled test metric of theta_pre + lam * sum(tau_i) (no restore) against lam, mean over
    replicates with error bars of +-1 sd (said in the legend), with the hospitals' own models and
    Full Training as reference lines; the legend sits outside the axes."""
    import matplotlib.pyplot as plt

    lam = load_results(results, "lambda_eval")
    agg = lam[lam["eval_on"] == "pooled"].groupby("lam")[metric].agg(["mean", "std"]).fillna(0) * 100
    ft = load_results(results, "finetune_eval")
    ft = ft[ft["eval_on"] == "pooled"]
    n = lam[REPLICATE].drop_duplicates().shape[0]
    fig, ax = plt.subplots(figsize=(8.4, 3.8))
    bars = f"mean ± 1 sd over {n} replicates" if n > 1 else "1 replicate: no error bar"
    ax.errorbar(agg.index, agg["mean"], yerr=agg["std"], marker="o", color="tab:red", capsize=3,
                label=f"{label('data_vector')} merge (BN mean, no restore),\n{bars}")
    ax.axhline(ft[ft["method"] == "base_model"][metric].mean() * 100, color="tab:blue", ls="--",
               label="hospitals' own models (mean)")
    ax.axhline(ft[ft["method"] == "full_training"][metric].mean() * 100, color="black", ls=":",
               label=label("full_training"))
    n_hosp = ft["model"].str.startswith("hospital_").groupby([ft[c] for c in REPLICATE]).sum().max()
    if n_hosp:
        ax.axvline(1 / n_hosp, color="grey", lw=0.8, alpha=0.6)
        ax.text(1 / n_hosp, ax.get_ylim()[0], f" 1/N: plain average of the {n_hosp} models", fontsize=7,
                color="grey", va="bottom")
    ax.set_xlabel("lambda")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%), pooled test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _finish(fig, out, "Data-vector merge against lambda (descriptive; lambda fixed at 0.5 beforehand)")


def plot_shards(results, out: str | os.PathLike | None = None):
    """Images per class in each hospital's train and test split (first split seed)."""
    import matplotlib.pyplot as plt

    t = load_results(results, "shards")
    t = t[t["split_seed"] == t["split_seed"].min()]
    classes = [c for c in t.columns if c not in ("hospital", "subset", "patients", "split_seed")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, subset in zip(axes, ("train", "test")):
        part = t[t["subset"] == subset].set_index("hospital")[classes]
        part.index = [f"Part {h}" for h in part.index]
        part.plot.bar(stacked=True, ax=ax, legend=subset == "test", colormap="tab10", rot=0)
        ax.set_title(f"{subset} images per hospital", fontsize=9)
        ax.set_ylabel("images")
    axes[1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _finish(fig, out, f"Simulated hospitals (split seed {int(t['split_seed'].min())})")


def plot_training(results, out: str | os.PathLike | None = None):
    """Training loss per epoch of every fine-tuned model (mean over replicates)."""
    import matplotlib.pyplot as plt

    h = load_results(results, "finetune_history")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for model, g in h.groupby("model"):
        agg = g.groupby("epoch")["loss"].mean()
        name = label("full_training") if model == "full" else f"hospital {model.split('_')[1]}"
        ax.plot(agg.index, agg.values, marker=".", label=name, lw=2 if model == "full" else 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted cross-entropy (train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(fig, out, "Fine-tuning: training loss per epoch")


def plot_confusion(confusion, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """A confusion-matrix PNG (rows: true class, columns: predicted), written atomically (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(confusion, dtype=float)
    k = len(classes)
    fig = Figure(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
