"""The privacy audit's tables, from the result files alone
(``privacy_audit.csv``, ``privacy_roc.csv.gz``, ``dp_eval.csv``, ``dp_audit.csv``; the non-private
references from ``restore_eval.csv``).

AUCs are shown as fractions (0.5 = chance), TPRs in percent. A cell is, with one replicate, the
estimate and its 95 % patient-bootstrap interval; with several, the mean over replicates (split seed
x training seed) and its 95 % t-interval, beside how many replicates' bootstrap intervals contain
0.5. Numbers are never shown without an interval. The plain-language summary:
:mod:`dvlib.studies.privacy.summary`; the figures: :mod:`dvlib.studies.privacy.figures`.
"""
from __future__ import annotations


import numpy as np
import pandas as pd

from dvlib import stats
from dvlib.io import DvlibError
from dvlib.reporting.tables import REPLICATE, load_results

ATTACK_LABELS = {"loss": "loss attack (score = -loss)",
                 "reference": "reference attack (score = loss under the pretrained model - loss)"}
MODEL_LABELS = {
    "pretrained": "Pretrained (sanity check: saw none of these images)",
    "full": "Full Training",
    "merged_params_mean": "Params Mean",
    "merged_data_vector": "Data Vector, before restore",
    "restored_data_vector_recalibrate": "Data Vector + BN recalibrate",
    "restored_data_vector_finetune_epoch": "Data Vector + 1 epoch per hospital (paper)",
}
RELEASED_ORDER = ("full", "merged_params_mean", "merged_data_vector", "restored_data_vector_recalibrate",
                  "restored_data_vector_finetune_epoch")
DP_MODEL_LABELS = {"hospital": "each hospital's own model (mean)", "merged_data_vector": "merged, no restore",
                   "restored_data_vector_recalibrate": "merged + BN recalibrate",
                   "restored_data_vector_finetune_epoch": "merged + 1 epoch per hospital"}
COLORS = {"none": "tab:red", "recalibrate": "tab:orange", "finetune_epoch": "tab:purple"}


def model_label(tag: str) -> str:
    if tag.startswith("hospital_"):
        return f"hospital {tag.split('_')[1]}'s own model"
    if tag.startswith("fedavg"):
        rounds = tag.removeprefix("fedavg").strip("-_")
        return f"FedAvg (Flower{', ' + rounds + ' rounds' if rounds else ''})"
    return MODEL_LABELS.get(tag, tag)


def _order(tags) -> list[str]:
    tags = list(dict.fromkeys(tags))
    hosp = sorted((t for t in tags if t.startswith("hospital_")), key=lambda t: int(t.split("_")[1]))
    known = ["pretrained", *hosp, *RELEASED_ORDER]
    return [t for t in known if t in tags] + sorted(t for t in tags if t not in known)


def primary(audit: pd.DataFrame) -> pd.DataFrame:
    """Each model in its own scope: pooled, or a hospital's own model on its own patients."""
    own = audit["model"].str.startswith("hospital_") & (audit["scope"] == audit["model"])
    return audit[(audit["scope"] == "pooled") | own]


def _n_replicates(df: pd.DataFrame) -> int:
    return int(df[REPLICATE].drop_duplicates().shape[0])


def mean_cell(values, scale: float = 1.0, digits: int = 3, bounds=(0.0, 1.0)) -> str:
    """Mean with its 95 % t-interval, clipped to ``bounds`` (an AUC or a rate cannot leave [0, 1], and
    a t-interval over 2-3 replicates easily does; clipping keeps its coverage); one value: itself."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "–"
    iv = stats.mean_interval(v)
    if v.size == 1:
        return f"{iv.estimate * scale:.{digits}f}"
    lo, hi = max(iv.low, bounds[0]), min(iv.high, bounds[1])
    return f"{iv.estimate * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def interval_cell(g: pd.DataFrame, col: str, scale: float = 1.0, digits: int = 3) -> str:
    """One row (replicate): ``est [bootstrap low, high]``; several: :func:`mean_cell` over them."""
    if g.empty:
        return "–"
    if len(g) == 1:
        r = g.iloc[0]
        return f"{r[col] * scale:.{digits}f} [{r[col + '_low'] * scale:.{digits}f}, {r[col + '_high'] * scale:.{digits}f}]"
    return mean_cell(g[col].to_numpy(), scale, digits)


def _contains(g: pd.DataFrame, value: float = 0.5) -> str:
    inside = int(((g["auc_low"] <= value) & (value <= g["auc_high"])).sum())
    return f"{inside}/{len(g)}"


def privacy_table(results, attack: str = "reference", step: str = "privacy_audit") -> pd.DataFrame:
    """Per model (its own scope): AUC, replicates whose bootstrap interval contains 0.5, TPR at 1 %
    and 0.1 % FPR (%), train / test accuracy (%), members / non-members."""
    audit = load_results(results, step)
    if attack not in set(audit["attack"]):
        raise DvlibError(f"{step}: no rows for attack {attack!r} (has {sorted(set(audit['attack']))})")
    a = primary(audit[audit["attack"] == attack])
    rows = []
    for tag in _order(a["model"]):
        g = a[a["model"] == tag]
        rows.append({"model": model_label(tag), "scope": g["scope"].iloc[0], "AUC": interval_cell(g, "auc"),
                     "bootstrap CI contains 0.5": _contains(g),
                     "TPR @ 1% FPR (%)": interval_cell(g, "tpr@1%", 100, 1),
                     "TPR @ 0.1% FPR (%)": interval_cell(g, "tpr@0.1%", 100, 1),
                     "train / test accuracy (%)": f"{g['train_accuracy'].mean() * 100:.1f} / "
                                                  f"{g['test_accuracy'].mean() * 100:.1f}",
                     "members / non-members": f"{g['n_members'].mean():.0f} / {g['n_nonmembers'].mean():.0f}"})
    return pd.DataFrame(rows).set_index("model")


def privacy_caption(results, attack: str = "reference", step: str = "privacy_audit") -> str:
    audit = load_results(results, step)
    a = primary(audit[audit["attack"] == attack])
    k = _n_replicates(a)
    pooled = a[a["scope"] == "pooled"]
    n_non = int(pooled["n_nonmembers"].min()) if len(pooled) else int(a["n_nonmembers"].min())
    cell = ("the estimate [95 % patient-bootstrap interval]" if k == 1 else
            f"the mean over {k} replicates (split seed × training seed) [95 % t-interval, clipped to the possible "
            "range]; each replicate's own bootstrap intervals are in the detail table")
    return (f"**Membership inference, {ATTACK_LABELS.get(attack, attack)}.** Members: the images a model was trained "
            "on; non-members: test images of held-out patients of the same distribution. Scope: *pooled* (every "
            "hospital's training images against all test images) for the models trained on every hospital; a "
            f"hospital's own model on its own patients. AUC 0.5 = chance. Cells: {cell}; *bootstrap CI contains 0.5*: "
            f"replicates whose interval includes chance. With {n_non} pooled non-members the lowest FPR that can be "
            f"observed is {100 / max(n_non, 1):.2g} %: the TPR at 0.1 % FPR is the TPR at zero false positives. The "
            "pretrained model's new head is random (the same at every hospital).")


def privacy_detail_table(results, attack: str = "reference", step: str = "privacy_audit",
                         models=None) -> pd.DataFrame:
    """Every replicate's numbers, each with its 95 % patient-bootstrap interval (each model in its own
    scope; ``models``: the tags to show, default all): rows model x (split seed, training seed)."""
    audit = load_results(results, step)
    a = primary(audit[audit["attack"] == attack])
    rows = []
    for tag in _order(a["model"]):
        if models is not None and tag not in models:
            continue
        for _, r in a[a["model"] == tag].sort_values(REPLICATE).iterrows():
            one = r.to_frame().T
            rows.append({"model": model_label(tag), "split seed": int(r["split_seed"]), "training seed": int(r["train_seed"]),
                         "AUC": interval_cell(one, "auc"), "TPR @ 1% FPR (%)": interval_cell(one, "tpr@1%", 100, 1),
                         "TPR @ 0.1% FPR (%)": interval_cell(one, "tpr@0.1%", 100, 1),
                         "members / non-members (patients)": f"{int(r['n_members'])} / {int(r['n_nonmembers'])} "
                                                             f"({int(r['member_groups'])} / {int(r['nonmember_groups'])})"})
    return pd.DataFrame(rows).set_index(["model", "split seed", "training seed"])


def per_hospital_table(results, attack: str = "reference", step: str = "privacy_audit") -> pd.DataFrame:
    """AUC of every model on each hospital's patients (hospital i's training images against its
    test images): a hospital's own model beside the models released to everyone, on the same patients."""
    audit = load_results(results, step)
    a = audit[(audit["attack"] == attack) & audit["scope"].str.startswith("hospital_")]
    parts = sorted(a["scope"].unique(), key=lambda s: int(s.split("_")[1]))
    rows = []
    own = a[a["model"] == a["scope"]]
    if len(own):
        rows.append({"model": "the hospital's own model",
                     **{f"Part {p.split('_')[1]}": interval_cell(own[own["scope"] == p], "auc") for p in parts}})
    for tag in _order(a["model"]):
        if tag.startswith("hospital_"):
            continue
        g = a[a["model"] == tag]
        rows.append({"model": model_label(tag),
                     **{f"Part {p.split('_')[1]}": interval_cell(g[g["scope"] == p], "auc") for p in parts}})
    t = pd.DataFrame(rows).set_index("model")
    t.index.name = f"AUC ({attack} attack) on the patients of"
    return t


# --- DP --------------------------------------------------------------------------------------------------

def _nonprivate(results, metric: str, attack: str) -> dict:
    """Non-private references, per restore: pooled ``metric`` of the data-vector merge
    (restore_eval) and its pooled attack AUCs (privacy_audit)."""
    out: dict = {}
    try:
        ft = load_results(results, "finetune_eval")
        own = ft[(ft["method"] == "base_model") & (ft["eval_on"] == ft["model"])]
        if len(own):  # mean over the hospitals of a replicate
            out["hospital"] = {"metric": own.groupby(REPLICATE)[metric].mean().to_numpy()}
    except DvlibError:
        pass
    try:
        rs = load_results(results, "restore_eval")
        rs = rs[(rs["method"] == "data_vector") & (rs["eval_on"] == "pooled")]
        for mode, g in rs.groupby("restore"):
            out.setdefault(mode, {})["metric"] = g[metric].to_numpy()
    except DvlibError:
        pass
    try:
        au = load_results(results, "privacy_audit")
        au = au[(au["attack"] == attack) & (au["scope"] == "pooled")]
        for mode, tag in (("none", "merged_data_vector"), ("recalibrate", "restored_data_vector_recalibrate"),
                          ("finetune_epoch", "restored_data_vector_finetune_epoch")):
            g = au[au["model"] == tag]
            if len(g):
                out.setdefault(mode, {}).update(auc=g["auc"].to_numpy(), tpr=g["tpr@1%"].to_numpy())
        own = primary(load_results(results, "privacy_audit"))
        own = own[(own["attack"] == attack) & own["model"].str.startswith("hospital_")]
        if len(own):  # hospital x replicate cells
            out.setdefault("hospital", {}).update(auc=own["auc"].to_numpy(), tpr=own["tpr@1%"].to_numpy())
    except DvlibError:
        pass
    return out


def dp_table(results, metric: str = "accuracy", attack: str = "reference") -> pd.DataFrame:
    """Per epsilon and model (DP hospitals' own models; the merge with each restore), and the
    non-private references: pooled test ``metric`` (%), the attack's AUC and TPR at 1 % FPR, the
    epsilon the accountant spent, and whether the (epsilon, delta) guarantee covers the model."""
    ev, au = load_results(results, "dp_eval"), load_results(results, "dp_audit")
    au = au[au["attack"] == attack]
    rows = []
    for eps in sorted(ev["epsilon"].unique()):
        e, a = ev[ev["epsilon"] == eps], au[au["epsilon"] == eps]
        hosp_e = e[e["model"].str.startswith("hospital_") & (e["eval_on"] == e["model"])]
        hosp_a = primary(a[a["model"].str.startswith("hospital_")])
        groups = [("hospital", hosp_e, hosp_a)]
        for tag in ("merged_data_vector", "restored_data_vector_recalibrate", "restored_data_vector_finetune_epoch"):
            groups.append((tag, e[(e["model"] == tag) & (e["eval_on"] == "pooled")],
                           a[(a["model"] == tag) & (a["scope"] == "pooled")]))
        for tag, ge, ga in groups:
            if ge.empty:
                continue
            if tag == "hospital":  # mean over the hospitals of a replicate, then over replicates
                ge = ge.groupby(REPLICATE, as_index=False)[[metric, "epsilon_spent"]].mean()
            rows.append({"epsilon (target)": f"{eps:g}", "model": DP_MODEL_LABELS[tag],
                         "DP guarantee": "yes" if bool(ga["dp_guarantee"].all()) else "no",
                         "epsilon spent": f"{ge['epsilon_spent'].max():.2f}",
                         f"{metric.replace('_', ' ')} (%)": mean_cell(ge[metric], 100, 1),
                         # the hospitals' models: mean [t-interval] over hospital x replicate cells
                         "attack AUC": mean_cell(ga["auc"]) if tag == "hospital" else interval_cell(ga, "auc"),
                         "TPR @ 1% FPR (%)": mean_cell(ga["tpr@1%"], 100, 1) if tag == "hospital"
                         else interval_cell(ga, "tpr@1%", 100, 1)})
    ref = _nonprivate(results, metric, attack)
    for mode in ("hospital", "none", "recalibrate", "finetune_epoch"):
        if mode not in ref:
            continue
        v = ref[mode]
        tag = {"hospital": "hospital", "none": "merged_data_vector"}.get(mode, f"restored_data_vector_{mode}")
        rows.append({"epsilon (target)": "∞ (no DP)", "model": DP_MODEL_LABELS[tag], "DP guarantee": "no",
                     "epsilon spent": "–", f"{metric.replace('_', ' ')} (%)": mean_cell(v.get("metric", []), 100, 1),
                     "attack AUC": mean_cell(v.get("auc", [])), "TPR @ 1% FPR (%)": mean_cell(v.get("tpr", []), 100, 1)})
    return pd.DataFrame(rows).set_index(["epsilon (target)", "model"])


def dp_caption(results) -> str:
    ev = load_results(results, "dp_eval")
    k = _n_replicates(ev)
    trainable = ", ".join(sorted(ev["trainable"].astype(str).unique()))
    return (f"**DP-SGD fine-tuning** at each hospital (trainable: {trainable}; pretrained BatchNorm frozen; delta = 1/n "
            f"with n the hospital's training images), then the same merge. Pooled test split; mean over {k} "
            "replicate(s) with a 95 % t-interval (one replicate: attack AUC with its bootstrap interval). *DP "
            "guarantee*: whether the (epsilon, delta) guarantee covers the model: BN recalibration and the restore "
            "epoch use the hospitals' images outside DP-SGD. The guarantee is per image: a patient with k images "
            "is protected at k × epsilon.")


__all__ = ["ATTACK_LABELS", "MODEL_LABELS", "model_label", "primary", "mean_cell", "interval_cell", "privacy_table",
           "privacy_caption", "privacy_detail_table", "per_hospital_table", "dp_table", "dp_caption"]
