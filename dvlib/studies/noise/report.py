"""Training noise on a fixed split, and the IID/Dirichlet comparison measured against it (issue 18).

A replicate is (split seed, training seed). Holding the split fixed and changing only the training
seed (the new head's initialisation, shuffling, augmentation) shows how far a model's test score
moves by chance; a difference between schemes, or between two splits, means something only if it is
larger than that. :func:`noise_table` gives, per run and split, each model's mean over training seeds
with a 95 % t-interval and its standard deviation; :func:`scheme_gap` sets two runs side by side,
paired by training seed on the same test images (both runs on the ``shared`` test design of
:func:`dvlib.split.make_split`, which gives every scheme the same test patients and the same pooled
training images).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dvlib import stats
from dvlib.io import DvlibError
from dvlib.reporting.tables import model_rows, results_dir


def scores(results, metric: str = "accuracy", eval_on: str = "pooled") -> pd.DataFrame:
    """One row per (model, split seed, training seed): the pooled score (the hospitals' own models
    averaged, as the paper's Base Model column)."""
    rows = []
    for model, (_, df) in model_rows(results).items():
        df = df[df["eval_on"] == eval_on]
        for (s, t), g in df.groupby(["split_seed", "train_seed"]):
            rows.append({"model": model, "split_seed": int(s), "train_seed": int(t), metric: float(g[metric].mean())})
    return pd.DataFrame(rows, columns=["model", "split_seed", "train_seed", metric])


def noise_table(runs: dict, metric: str = "accuracy") -> pd.DataFrame:
    """Per run (label -> results folder), split seed and model: the training seeds, the mean with its
    95 % t-interval, and the standard deviation and range over the training seeds (percentage points)."""
    rows = []
    for label, results in runs.items():
        sc = scores(results, metric)
        for (model, s), g in sc.groupby(["model", "split_seed"], sort=False):
            v = g[metric].to_numpy()
            iv = stats.mean_interval(v)
            rows.append({"run": label, "split seed": s, "model": model, "training seeds": len(v),
                         f"mean {metric} (%) [95 % t]": iv.fmt(),
                         "sd over training seeds (pp)": round(float(v.std(ddof=1)) * 100, 2) if len(v) > 1 else np.nan,
                         "min-max (%)": f"{v.min() * 100:.1f}-{v.max() * 100:.1f}"})
    return pd.DataFrame(rows)


def _pooled_preds(results, model: str) -> pd.DataFrame:
    """Per-image predictions of one :func:`scores` model over the pooled test set (all hospitals'
    test splits together), one row per (split seed, training seed, image)."""
    source, rows = model_rows(results)[model]
    preds = pd.read_csv(results_dir(results) / f"{source}_predictions.csv.gz")
    keys = rows[["model", "method", "restore"]].drop_duplicates()
    preds = preds.merge(keys, on=["model", "method", "restore"])
    return preds.sort_values(["split_seed", "train_seed", "model", "image"])


def scheme_gap(a, b, metric: str = "accuracy", n_boot: int = 2000) -> pd.DataFrame:
    """Run ``a`` minus run ``b`` for every model both have, paired by (split seed, training seed) on
    the same test images: a paired t over the training seeds (training noise and test-set noise in
    it) and a paired patient bootstrap (test-set noise only). Refused if the two runs were not
    evaluated on the same test images (e.g. not both on the ``shared`` test design)."""
    sa, sb = scores(a, metric), scores(b, metric)
    rows = []
    for model in [m for m in sa["model"].unique() if m in set(sb["model"])]:
        m = sa[sa["model"] == model].merge(sb[sb["model"] == model], on=["split_seed", "train_seed"], suffixes=("_a", "_b"))
        if m.empty:
            continue
        t = stats.paired_t((m[f"{metric}_a"] - m[f"{metric}_b"]).to_numpy())
        pa, pb = _pooled_preds(a, model), _pooled_preds(b, model)
        sets = []
        for s, tr in zip(m["split_seed"], m["train_seed"]):
            ga = pa[(pa["split_seed"] == s) & (pa["train_seed"] == tr)]
            gb = pb[(pb["split_seed"] == s) & (pb["train_seed"] == tr)]
            ids_a, ids_b = sorted(set(ga["image"])), sorted(set(gb["image"]))
            if ids_a != ids_b:
                raise DvlibError(f"{results_dir(a)} and {results_dir(b)}: split {s}, training seed {tr}: the test images "
                                 f"differ ({len(ids_a)} against {len(ids_b)}); compare runs made with --test-design shared")
            ma, mb = ([g[g["model"] == k].set_index("image").loc[ids_a] for k in sorted(g["model"].unique())] for g in (ga, gb))
            sets.append((ma[0]["label"].to_numpy(), [x["pred"].to_numpy() for x in ma], [x["pred"].to_numpy() for x in mb],
                         ma[0]["patient"].to_numpy()))
        boot = _boot(sets, metric, n_boot) if sets else None
        rows.append({"model": model, "pairs (split, training seed)": t.n,
                     "difference (pp) [95 % paired t]": f"{t.diff * 100:+.1f} [{t.low * 100:+.1f}, {t.high * 100:+.1f}]",
                     "p (paired t)": float(t.pvalue),
                     "test-set noise only (pp) [95 % bootstrap]": "–" if boot is None else
                     f"[{boot.low * 100:+.1f}, {boot.high * 100:+.1f}]",
                     "p (bootstrap)": np.nan if boot is None else float(boot.pvalue)})
    return pd.DataFrame(rows)


def _boot(sets, metric: str, n_boot: int):
    """:func:`dvlib.stats.paired_bootstrap_replicates` where each side is one model (None for the
    hospitals' own models, several per side: the bootstrap there would have to pair hospitals that
    are different hospitals under the two schemes)."""
    if any(len(pa) != 1 or len(pb) != 1 for _, pa, pb, _ in sets):
        return None
    n_classes = int(max(max(int(y.max()), int(pa[0].max()), int(pb[0].max())) for y, pa, pb, _ in sets) + 1)
    return stats.paired_bootstrap_replicates([(y, pa[0], pb, g) for y, pa, pb, g in sets], n_classes, metric,
                                             n_boot=n_boot)


def against(runs: dict, reference, ref_model: str = "Full Training", metric: str = "accuracy") -> pd.DataFrame:
    """Each model of each run (label -> results folder) minus ``ref_model`` of the ``reference`` run,
    paired by (split seed, training seed), with a paired t over the pairs. Under the ``shared`` test
    design Full Training sees the same images whatever the scheme, so one run's Full Training is the
    reference for both."""
    ref = scores(reference, metric).query("model == @ref_model")
    if ref.empty:
        raise DvlibError(f"{results_dir(reference)}: no {ref_model!r} rows")
    rows = []
    for label, results in runs.items():
        sc = scores(results, metric)
        for model in [m for m in sc["model"].unique() if m != ref_model]:
            m = sc[sc["model"] == model].merge(ref, on=["split_seed", "train_seed"], suffixes=("", "_ref"))
            if m.empty:
                continue
            t = stats.paired_t((m[metric] - m[f"{metric}_ref"]).to_numpy())
            rows.append({"run": label, "model": model, f"minus {ref_model} (pp) [95 % paired t]":
                         f"{t.diff * 100:+.1f} [{t.low * 100:+.1f}, {t.high * 100:+.1f}]", "p (paired t)": float(t.pvalue),
                         "pairs": t.n})
    return pd.DataFrame(rows)
