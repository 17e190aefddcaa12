"""The privacy audit in plain words: what a hospital should conclude, written from the result files
(:mod:`dvlib.studies.privacy.report` makes the tables and figures from the same files)."""
from __future__ import annotations

import pandas as pd

from dvlib import stats
from dvlib.studies.privacy.report import (mean_cell, model_label, _n_replicates, _nonprivate, _order, primary)
from dvlib.reporting.tables import REPLICATE, load_results, results_dir


def _verdicts(a: pd.DataFrame) -> dict[str, str]:
    """Per model: 'leak' (bootstrap interval above 0.5 in every replicate), 'chance' (contains 0.5
    in every replicate) or 'mixed'."""
    out = {}
    for tag, g in a.groupby("model"):
        above = (g["auc_low"] > 0.5).sum()
        inside = ((g["auc_low"] <= 0.5) & (g["auc_high"] >= 0.5)).sum()
        out[tag] = "leak" if above == len(g) else "chance" if inside == len(g) else "mixed"
    return out


def _auc_text(g: pd.DataFrame) -> str:
    if len(g) == 1:
        r = g.iloc[0]
        return f"{r['auc']:.3f} [{r['auc_low']:.3f}, {r['auc_high']:.3f}]"
    return mean_cell(g["auc"])


def _names(tags) -> str:
    names = [model_label(t) for t in tags]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def privacy_summary(results) -> str:
    """What a hospital should conclude, in plain sentences from the numbers (honest where the
    intervals include 0.5 or overlap each other)."""
    audit = load_results(results, "privacy_audit")
    prim = primary(audit)
    k = _n_replicates(prim)
    reps = f"{k} replicate{'s' if k > 1 else ''}"
    out = []
    pre = prim[prim["model"] == "pretrained"]
    if len(pre):
        lo = pre[pre["attack"] == "loss"]
        ref = pre[pre["attack"] == "reference"]
        inside = int(((lo["auc_low"] <= 0.5) & (lo["auc_high"] >= 0.5)).sum())
        exact = bool(len(ref)) and bool((ref["auc"] == 0.5).all())
        s = (f"**Sanity check.** The pretrained model saw none of these images; the loss attack gives it an AUC of "
             f"{_auc_text(lo)}, its bootstrap interval containing 0.5 in {inside} of {len(lo)} replicate(s)")
        s += ", and the reference attack (the model as its own reference) exactly 0.5." if exact else "."
        if inside < len(lo):
            s += (" An interval that excludes 0.5 here is a false alarm of the attack itself (expected in about 1 "
                  "replicate in 20); read the other models' borderline results with that in mind.")
        else:
            s += " The attacks do not find members where there are none."
        out.append(s)
    released = prim[prim["model"] != "pretrained"]
    # the stronger attack per model: the larger mean AUC
    best = {}
    for tag, g in released.groupby("model"):
        means = g.groupby("attack")["auc"].mean()
        best[tag] = means.idxmax()
    strong = pd.concat([released[(released["model"] == t) & (released["attack"] == a)] for t, a in best.items()]) \
        if best else released
    verdict = _verdicts(strong)
    groups = {v: [t for t in _order(verdict) if verdict[t] == v] for v in ("leak", "mixed", "chance")}
    detail = "; ".join(f"{model_label(t)} {_auc_text(strong[strong['model'] == t])} ({best[t]} attack)"
                       for t in _order(verdict))
    s = f"**The released models** (stronger of the two attacks per model, AUC over {reps}): {detail}. "
    if groups["leak"]:
        s += f"Membership is detectable, the interval above 0.5 in every replicate, for {_names(groups['leak'])}. "
    if groups["mixed"]:
        s += f"For {_names(groups['mixed'])} it is detectable in some replicates only. "
    if groups["chance"]:
        s += (f"For {_names(groups['chance'])} the attacks are not distinguishable from chance at this sample size: "
              "an interval containing 0.5 is not evidence that nothing leaks. ")
    tpr = strong.groupby("model")["tpr@1%"].mean()
    if len(tpr):
        top = tpr.idxmax()
        n_non = int(strong.loc[strong["model"] == top, "n_nonmembers"].mean())
        allowed = int(0.01 * n_non)
        fp = (f"at most {allowed} of {n_non} held-out images wrongly flagged" if allowed else
              f"with {n_non} held-out images: no false positive at all")
        s += (f"At 1 % FPR ({fp}) the attack finds {tpr[top] * 100:.1f} % of {model_label(top)}'s training images "
              "on average, the most of any released model (chance: 1 %).")
    out.append(s.strip())
    out += _own_vs_merged(audit)
    out += _dp_sentences(results)
    out.append(_conclusion(groups, results))
    return "\n\n".join(out)


def _own_vs_merged(audit: pd.DataFrame) -> list[str]:
    a = audit[(audit["attack"] == "reference") & audit["scope"].str.startswith("hospital_")]
    own = a[a["model"] == a["scope"]].set_index([*REPLICATE, "scope"])["auc"]
    out = []
    for tag in ("restored_data_vector_finetune_epoch", "merged_data_vector"):
        other = a[a["model"] == tag].set_index([*REPLICATE, "scope"])["auc"]
        both = pd.concat([own, other], axis=1, keys=["own", "merged"]).dropna()
        if len(both) < 2:
            continue
        c = stats.paired_t((both["own"] - both["merged"]).to_numpy())
        overlap = c.low <= 0 <= c.high
        word = "more" if c.diff > 0 else "less"
        s = (f"**Own model or merged model?** On the same patients (each hospital's training against its test images, "
             f"reference attack, {len(both)} hospital × replicate cells) a hospital's own model has AUC "
             f"{both['own'].mean():.3f} and the {model_label(tag)} model {both['merged'].mean():.3f}: the own model "
             f"leaks {word} by {abs(c.diff):.3f} [{c.low:+.3f}, {c.high:+.3f}] (paired t over cells).")
        s += (" The interval includes 0: no difference can be claimed." if overlap else
              " The interval excludes 0.")
        out.append(s)
        break
    return out


def _dp_sentences(results) -> list[str]:
    d = results_dir(results)
    if not (d / "dp_eval.csv").exists() or not (d / "dp_audit.csv").exists():
        return []
    ev, au = load_results(results, "dp_eval"), load_results(results, "dp_audit")
    ref = _nonprivate(results, "accuracy", "reference")
    pooled = ev[ev["eval_on"] == "pooled"]
    merged = pooled[pooled["model"] == "merged_data_vector"].groupby("epsilon")["accuracy"].mean()
    auc = au[(au["model"] == "merged_data_vector") & (au["scope"] == "pooled") & (au["attack"] == "reference")]
    trainable = ", ".join(sorted(ev["trainable"].astype(str).unique()))
    parts = []
    for eps, acc in merged.items():
        g = auc[auc["epsilon"] == eps]
        parts.append(f"ε = {eps:g}: {acc * 100:.1f} % accuracy, attack AUC {_auc_text(g) if len(g) else '–'}")
    s = (f"**With differential privacy** (DP-SGD at each hospital, trainable: {trainable}, BatchNorm frozen at the "
         f"pretrained statistics, δ = 1/n), the merged model before any restore, the one the guarantee covers, "
         f"reaches {'; '.join(parts)} (pooled test, mean over replicates).")
    if "none" in ref and "metric" in ref["none"]:
        s += f" Without DP the same merge (no restore) reaches {ref['none']['metric'].mean() * 100:.1f} %"
        if "finetune_epoch" in ref and "metric" in ref["finetune_epoch"]:
            s += f", and {ref['finetune_epoch']['metric'].mean() * 100:.1f} % after the paper's restore epoch"
        s += "."
    rest = pooled[pooled["model"] != "merged_data_vector"]
    rest = rest[~rest["model"].str.startswith("hospital_")]
    if len(rest):
        best = rest.groupby(["model", "epsilon"])["accuracy"].mean()
        (tag, eps), val = best.idxmax(), best.max()
        s += (f" The restores recover accuracy ({model_label(tag)} at ε = {eps:g}: {val * 100:.1f} %) but use the "
              "hospitals' images outside DP-SGD, so the guarantee no longer covers that model.")
    s += " The guarantee is per image: a patient with k images in the training split is protected at k × ε"
    if "max_images_per_patient" in ev:
        s += f" (here up to {int(ev['max_images_per_patient'].max())} images per patient)"
    s += "."
    return [s]


def _conclusion(groups: dict, results) -> str:
    dp = (results_dir(results) / "dp_eval.csv").exists()
    if groups.get("leak") or groups.get("mixed"):
        s = ("**What a hospital should conclude.** The released models carry measurable information about which "
             "patients they were trained on. A data vector, like any model trained on patients, is therefore "
             "personal-data-derived and should be shared under the same agreements as the images' derived data, "
             "not as an anonymous aggregate; these are weak attacks (per-image losses, no shadow models), so a "
             "determined attacker can be expected to do better, not worse.")
    else:
        s = ("**What a hospital should conclude.** These attacks found no membership signal distinguishable from "
             "chance at this sample size. That is not a guarantee: they are weak attacks (per-image losses, no "
             "shadow models), the intervals are wide with a few hundred patients, and stronger attacks usually "
             "find more. A data vector is derived from patients' images and should be shared as such.")
    if dp:
        s += (" If a formal bound is required, DP fine-tuning gives one, at the accuracy cost shown above; it holds "
              "only for the merged model without recalibration or restore epoch, per image (k images of one "
              "patient: k × ε), and not for the label counts and local test metrics in the vector file's metadata.")
    else:
        s += " Only differential privacy bounds what any attack can learn; see the DP section when it has run."
    return s
