"""The privacy audit's figures (ROC curves, privacy against utility), from the result files alone
(:mod:`dvlib.studies.privacy.report` makes the tables from the same files)."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from dvlib.reporting.figures import _finish
from dvlib.studies.privacy.report import model_label, _order, _n_replicates, _nonprivate, ATTACK_LABELS, COLORS
from dvlib.reporting.tables import REPLICATE, RESTORE_LABELS, load_results, results_dir


def _envelope(fpr: np.ndarray, tpr: np.ndarray):
    last = np.r_[fpr[1:] != fpr[:-1], True]  # the highest TPR at each distinct FPR
    return fpr[last], tpr[last]


def plot_roc(results, attacks=("loss", "reference"), out: str | os.PathLike | None = None):
    """Membership-inference ROC curves on log-log axes (the low-FPR corner is what matters): each
    model in its own scope, mean TPR over replicates; the hospitals' own models as one line (their
    mean); the diagonal is chance; shaded: FPRs below the lowest observable one (1/pooled non-members),
    where a curve shows the TPR at zero false positives."""
    import matplotlib.pyplot as plt

    roc = pd.read_csv(results_dir(results) / "privacy_roc.csv.gz")
    audit = load_results(results, "privacy_audit")
    grid = np.logspace(-3, 0, 200)
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.2 * len(attacks), 4.4), squeeze=False)
    tags = _order(roc["model"])
    cmap = plt.get_cmap("tab10")
    for ax, attack in zip(axes[0], attacks):
        part = roc[roc["attack"] == attack]
        lines: dict[str, list[np.ndarray]] = {}
        for (tag, *_), g in part.groupby(["model", *REPLICATE], sort=False):
            f, t = _envelope(g["fpr"].to_numpy(), g["tpr"].to_numpy())
            key = "hospital" if tag.startswith("hospital_") else tag
            lines.setdefault(key, []).append(np.interp(grid, f, t))
        keys = [k for k in ["pretrained", "hospital", *[t for t in tags if not t.startswith("hospital_")]]
                if k in lines]
        for i, key in enumerate(dict.fromkeys(keys)):
            label = "hospitals' own models (mean)" if key == "hospital" else model_label(key)
            style = dict(color="grey", ls="--") if key == "pretrained" else dict(color=cmap(i % 10))
            ax.plot(grid, np.mean(lines[key], axis=0), lw=1.4, label=label, **style)
        ax.plot(grid, grid, color="black", lw=0.8, ls=":", label="chance")
        pooled = audit[(audit["attack"] == attack) & (audit["scope"] == "pooled")]
        if len(pooled):  # below 1/non-members no FPR is observed: the curve there is the TPR at 0 FP
            ax.axvspan(1e-3, float(pooled["min_fpr"].max()), color="grey", alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(1e-3, 1)
        ax.set_ylim(1e-3, 1)
        ax.set_xlabel("false positive rate (non-members called members)")
        ax.set_ylabel("true positive rate (members found)")
        ax.set_title(ATTACK_LABELS.get(attack, attack), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    k = _n_replicates(roc)
    return _finish(fig, out, f"Membership inference ROC, each model on its own training vs held-out patients "
                             f"(mean of {k} replicate(s); shaded: below the lowest observable FPR)")


def plot_privacy_utility(results, metric: str = "accuracy", attack: str = "reference",
                         out: str | os.PathLike | None = None):
    """Pooled test ``metric`` and the attack's pooled AUC against epsilon, for the DP merge with each
    restore (solid: covered by the guarantee; dashed: not), mean over replicates with +-1 sd; the
    non-private data-vector merge with the same restore as a dotted reference line. A setting with no
    finite point gets no legend entry; the hospitals' own models are hollow diamonds drawn on top, so
    they stay visible where a merge's point lies at the same place."""
    import matplotlib.pyplot as plt

    ev, au = load_results(results, "dp_eval"), load_results(results, "dp_audit")
    au = au[(au["attack"] == attack) & (au["scope"] == "pooled")]
    ref = _nonprivate(results, metric, attack)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    eps = sorted(ev["epsilon"].unique())
    for mode in ev["restore"].unique():
        tag = "merged_data_vector" if mode == "none" else f"restored_data_vector_{mode.replace('+', '_')}"
        e = ev[(ev["model"] == tag) & (ev["eval_on"] == "pooled")].groupby("epsilon")[metric].agg(["mean", "std"])
        a = au[au["model"] == tag].groupby("epsilon")["auc"].agg(["mean", "std"])
        guaranteed = bool(ev.loc[ev["model"] == tag, "dp_guarantee"].all())
        color, ls = COLORS.get(mode, "tab:blue"), "-" if guaranteed else "--"
        name = "no restore" if mode == "none" else RESTORE_LABELS.get(mode, mode)
        label = f"DP merge, {name}" + ("" if guaranteed else " (outside the guarantee)")
        if e["mean"].notna().any():
            ax1.errorbar(e.index, e["mean"] * 100, yerr=e["std"].fillna(0) * 100, color=color, ls=ls, marker="o",
                         capsize=3, label=label)
        if a["mean"].notna().any():
            ax2.errorbar(a.index, a["mean"], yerr=a["std"].fillna(0), color=color, ls=ls, marker="o", capsize=3,
                         label=label)
        if mode in ref and "metric" in ref[mode]:
            ax1.axhline(ref[mode]["metric"].mean() * 100, color=color, ls=":", lw=1.2, label=f"no DP, {name}")
        if mode in ref and "auc" in ref[mode]:
            ax2.axhline(ref[mode]["auc"].mean(), color=color, ls=":", lw=1.2, label=f"no DP, {name}")
    hosp = ev[ev["model"].str.startswith("hospital_") & (ev["eval_on"] == ev["model"])]
    h = hosp.groupby("epsilon")[metric].mean().dropna()
    if len(h):
        ax1.plot(h.index, h.to_numpy() * 100, color="dimgrey", marker="D", ms=9, mfc="none", mew=1.4, lw=1, zorder=5,
                 label="hospitals' own DP models (own test split, mean)")
    ax2.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks(eps, labels=[f"{x:g}" for x in eps])
        ax.minorticks_off()
        ax.set_xlabel("epsilon (delta = 1/n per hospital)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel(f"{metric.replace('_', ' ')} (%), pooled test")
    ax2.set_ylabel(f"membership AUC ({attack} attack), pooled")
    handles = {lab: h for ax in (ax1, ax2) for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.12))
    k = _n_replicates(ev)
    return _finish(fig, out, f"Privacy against utility: DP-SGD fine-tuning, then the data-vector merge "
                             f"(mean ± 1 sd over {k} replicate(s))")
