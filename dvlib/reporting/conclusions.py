""""What this shows" for notebooks 01-06: Markdown sentences written from a run's result files alone,
so they are true for whatever run they are executed on (smoke or real, 1 or many replicates).

Numbers are means over replicates with a 95 % t-interval (:func:`dvlib.reporting.tables.cell`); on
one replicate there is no interval and no test, and the text says so. 06 ends on the headline: the
paired tests of :mod:`dvlib.reporting.claims`, in accuracy and in balanced accuracy.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from dvlib import methods
from dvlib.io import DvlibError
from dvlib.reporting.claims import claims_frame, headline
from dvlib.reporting.tables import BN_LABELS, REPLICATE, RESTORE_LABELS, cell, load_results, results_dir

NO_TEST = "on 1 replicate: no test possible"
# the result files the sentences are written from
SOURCES = ("shards", "finetune_eval", "finetune_history", "merge_eval", "lambda_eval", "bn_policy_eval",
           "restore_eval", "layer_cosine")
DV = methods.label("data_vector")


def _replicates(df: pd.DataFrame) -> int:
    return int(df[REPLICATE].drop_duplicates().shape[0])


def _scope(n: int, interval: str = " with a 95 % t-interval") -> str:
    """How the numbers are summarised, for the opening sentence."""
    if n == 1:
        return f"Numbers come from 1 replicate, so they carry no interval ({NO_TEST})."
    return f"Numbers are means over {n} replicates (split seed × training seed){interval}."


def _both(rows: pd.DataFrame) -> str:
    """``"62.8 [60.1, 65.4] % accuracy and 51.0 [...] % balanced accuracy"`` over replicates."""
    return f"{cell(rows['accuracy'])} % accuracy and {cell(rows['balanced_accuracy'])} % balanced accuracy"


def _span(low, high, fmt: str = "{}") -> str:
    """``"246–247"``, or one value where both ends agree."""
    a, b = fmt.format(low), fmt.format(high)
    return a if a == b else f"{a}–{b}"


def _run_settings(results) -> dict:
    """``run.json``: beside the results in a published report, in the run folder above them in a run."""
    res = results_dir(results)
    for path in (res / "run.json", res.parent / "run.json"):
        if path.exists():
            return json.loads(path.read_text())
    return {}


def what_this_shows_01(results) -> str:
    """The split: hospitals, sizes, class balance (``shards.csv``)."""
    t = load_results(results, "shards")
    seeds = sorted(t["split_seed"].unique())
    first = t[t["split_seed"] == seeds[0]]
    classes = [c for c in t.columns if c not in ("hospital", "subset", "patients", "split_seed")]
    train, test = (first[first["subset"] == s].set_index("hospital") for s in ("train", "test"))
    n_train, n_test = train[classes].sum(axis=1), test[classes].sum(axis=1)
    per_class = train[classes].min()
    rare = str(per_class.idxmin())
    share = train[classes].div(n_train, axis=0) * 100
    spread = (share.max() - share.min())
    scheme = _run_settings(results).get("scheme")
    how = {"iid": "independently of their diagnosis (IID)"}.get(scheme, f"by a {scheme} scheme" if scheme else "")
    out = [f"The patients are split into {len(train)} simulated hospitals{' ' + how if how else ''}, under "
           f"{len(seeds)} split seed{'s' if len(seeds) != 1 else ''}.",
           f"With split seed {seeds[0]}, each hospital trains on {_span(n_train.min(), n_train.max())} images and is "
           f"tested on {_span(n_test.min(), n_test.max())} images of its own patients.",
           f"A class's share of a hospital's training images differs between hospitals by at most "
           f"{spread.max():.1f} percentage points ({spread.idxmax()}).",
           f"The rarest class, {rare}, has {_span(per_class[rare], train[rare].max())} training images per hospital: balanced "
           "accuracy, which weighs every class equally, is reported beside accuracy for that reason."]
    return "\n\n".join(out)


def what_this_shows_02(results) -> str:
    """The hospitals' own models and Full Training (``finetune_eval.csv``, ``finetune_history.csv``)."""
    ft = load_results(results, "finetune_eval")
    n = _replicates(ft)
    pooled = ft[ft["eval_on"] == "pooled"]
    base = pooled[pooled["method"] == "base_model"].groupby(REPLICATE)[["accuracy", "balanced_accuracy"]].mean()
    own = ft[(ft["method"] == "base_model") & (ft["model"] == ft["eval_on"])]
    out = [_scope(n),
           f"On all test images, a hospital's own model reaches {_both(base)} (mean of the hospitals' models); on its "
           f"own hospital's test split, {cell(own.groupby(REPLICATE)['accuracy'].mean())} % accuracy."]
    full = pooled[pooled["method"] == "full_training"]
    if not full.empty:
        out.append(f"{methods.label('full_training')}, one model trained on every hospital's images, reaches "
                   f"{_both(full)}: the reference a merge of the hospitals' models is measured against.")
    try:
        h = load_results(results, "finetune_history")
    except DvlibError:  # a run made before the history was recorded
        h = None
    if h is not None and not h.empty:
        ends = h.groupby(REPLICATE + ["model"])["loss"].agg(["first", "last"])
        fell = int((ends["last"] < ends["first"]).sum())
        out.append(f"Training loss fell from the first to the last epoch for {fell} of {len(ends)} fine-tuned models.")
    return "\n\n".join(out)


def what_this_shows_03(results) -> str:
    """The merges before any restore, lambda, and the BN statistics (``merge_eval``, ``lambda_eval``,
    ``bn_policy_eval``)."""
    ev = load_results(results, "merge_eval")
    ev = ev[ev["eval_on"] == "pooled"]
    n = _replicates(ev)
    means = ev.groupby("method")["accuracy"].mean().sort_values(ascending=False)
    dv = ev[ev["method"] == "data_vector"]
    out = [_scope(n), f"Merged with no restore (the hospitals' BatchNorm statistics averaged), the {DV} merge "
           f"reaches {_both(dv)} on all test images."]
    if len(means) > 1:
        order = ", ".join(f"{methods.label(m)} {v * 100:.1f} %" for m, v in means.items())
        out.append(f"Mean accuracy of every merge method, best first: {order}.")
    try:
        lam = load_results(results, "lambda_eval")
    except DvlibError:
        lam = None
    if lam is not None and not lam.empty:
        curve = lam[lam["eval_on"] == "pooled"].groupby("lam")["accuracy"].mean() * 100
        fixed = _run_settings(results).get("lam")
        at = f"; at the run's lambda {fixed:g}, {curve.loc[fixed]:.1f} %" if fixed in curve.index else ""
        out.append(f"Against lambda, mean accuracy peaks at {curve.max():.1f} % (lambda {curve.idxmax():g}){at}. The "
                   "curve is descriptive: lambda was fixed before the run, not chosen on these test images.")
    try:
        bn = load_results(results, "bn_policy_eval")
    except DvlibError:
        bn = None
    if bn is not None and not bn.empty:
        bn = bn[bn["eval_on"] == "pooled"]
        pol = bn.groupby("bn_buffers").agg(acc=("accuracy", "mean"), neg=("negative_var_layers", "max"))
        bad = pol[pol["neg"] > 0]
        text = ", ".join(f"{BN_LABELS.get(k, k)} {v * 100:.1f} %" for k, v in pol["acc"].items())
        out.append(f"BatchNorm statistics when merging (mean accuracy): {text}." + (
            f" Merging them as if they were weights leaves up to {int(bad['neg'].max())} "
            "layers with a negative variance." if len(bad) else ""))
    return "\n\n".join(out)


def what_this_shows_04(results) -> str:
    """What each BatchNorm restore does to each merge (``restore_eval.csv``)."""
    rs = load_results(results, "restore_eval")
    rs = rs[rs["eval_on"] == "pooled"]
    n = _replicates(rs)
    modes = [m for m in RESTORE_LABELS if m in set(rs["restore"])]
    dv = rs[rs["method"] == "data_vector"]
    out = [_scope(n)]
    if not dv.empty:
        parts = "; ".join(f"{'no restore' if m == 'none' else RESTORE_LABELS[m]}: {_both(dv[dv['restore'] == m])}"
                          for m in modes
                          if (dv["restore"] == m).any())
        out.append(f"The {DV} merge after each restore, on all test images: {parts}.")
    means = rs.groupby(["method", "restore"])["accuracy"].mean().unstack("restore")
    if "none" in means and len(modes) > 1:
        merged = [m for m in means.index if m != "pretrained"]
        best = means.loc[merged, [m for m in modes if m != "none"]].max(axis=1)
        helped = int((best > means.loc[merged, "none"]).sum())
        out.append(f"A restore raised mean accuracy over no restore for {helped} of {len(merged)} merge methods.")
    if "pretrained" in means.index:
        top = means.loc["pretrained"].max() * 100
        out.append(f"The pretrained model restored the same way, with no merge, reaches at most {top:.1f} % accuracy: "
                   "what the restore alone does.")
    return "\n\n".join(out)


def what_this_shows_05(results) -> str:
    """Figure 2 in words (``layer_cosine.csv``)."""
    cos = load_results(results, "layer_cosine")
    n = _replicates(cos)
    per_layer = cos.groupby(["model", "layer_index"])["cosine"].mean().unstack("model")
    hosp = per_layer[[c for c in per_layer if c.startswith("hospital_")]]
    out = [_scope(n, "")]
    out.append(f"Each hospital's data vector has a mean cosine of {_span(hosp.mean().min(), hosp.mean().max(), '{:.2f}')} to "
               f"the {methods.label('full_training')} vector over the {len(per_layer)} convolution layers.")
    if "merged_data_vector" in per_layer:
        m = per_layer["merged_data_vector"]
        closer = int((m > hosp.max(axis=1)).sum())
        out.append(f"The {DV} merge (before restore) has a mean cosine of {m.mean():.2f} and points closer to "
                   f"{methods.label('full_training')} than every hospital's vector in {closer} of {len(m)} layers.")
        if "merged_params_mean" in per_layer:
            gap = float((per_layer["merged_params_mean"] - m).abs().max())
            out.append(f"The {methods.label('params_mean')} merge's curve coincides with it (largest gap {gap:.1g}): "
                       "the mean of the models is theta_pre + (1/N) sum tau_i, the same direction as lam * sum tau_i, so "
                       "a cosine cannot tell the two apart; their accuracy differs (notebooks 03 and 04).")
    return "\n\n".join(out)


def what_this_shows_06(results, restore_mode: str = "finetune_epoch") -> str:
    """The paper's comparison, ending on the headline (the paired tests, both metrics)."""
    df = {m: claims_frame(results, m, n_boot=0) for m in ("accuracy", "balanced_accuracy")}
    rows = {m: f[f["restore"] == restore_mode] for m, f in df.items()}
    n = int(rows["accuracy"]["replicates"].max()) if len(rows["accuracy"]) else 0
    out = [_scope(n)]
    if n >= 2:
        for metric, name in (("accuracy", "In accuracy"), ("balanced_accuracy", "In balanced accuracy")):
            out.append(f"{name}, {DV} (restored with {RESTORE_LABELS[restore_mode]}) is " + _verdicts(rows[metric]) + ".")
    out.append("**Headline.** " + headline(results, "accuracy", restore_mode).replace(":\n", ":\n\n", 1))
    return "\n\n".join(out)


def _verdicts(rows: pd.DataFrame) -> str:
    """``"better than Base Model; no different from Params Mean, Full Training"``, from Holm p."""
    from dvlib.reporting.tables import PAPER_COLUMNS

    groups: dict[str, list[str]] = {"better than": [], "worse than": [], "not significantly different from": []}
    for _, r in rows.iterrows():
        p = r["t p (Holm)"]
        key = ("better than" if r["pooled diff (pp)"] > 0 else "worse than") if np.isfinite(p) and p < 0.05 else \
            "not significantly different from"
        groups[key].append(PAPER_COLUMNS[r["rival"]])
    return "; ".join(f"{k} {', '.join(v)}" for k, v in groups.items() if v)


STEPS = {"01": what_this_shows_01, "02": what_this_shows_02, "03": what_this_shows_03,
         "04": what_this_shows_04, "05": what_this_shows_05, "06": what_this_shows_06}


def what_this_shows(results, step: str, **options) -> str:
    """``step``: the notebook's number (``"03"`` or ``"03_merge"``); ``options`` go to its function
    (06: ``restore_mode``)."""
    key = str(step)[:2]
    if key not in STEPS:
        raise DvlibError(f"no 'what this shows' for notebook {step!r}; valid: {', '.join(STEPS)}")
    return "### What this shows\n\n" + STEPS[key](results, **options)
