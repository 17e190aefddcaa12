"""Tables made from a run's result files alone, in percent, labelled as the paper labels them.

Rows of the paper's Tables 1-3 are Part Index i (hospital i, evaluated on its own test split), columns
Params Mean, Data Vector, Random Vector, Base Model (hospital i's own model), Full Training. A cell is
the mean over replicates (split seed x training seed) with its 95 % t-interval.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from dvlib import methods, restore
from dvlib.data.paper import COLUMNS
from dvlib.io import DvlibError, read_csv, write_csv, write_text
from dvlib.stats import mean_interval

REPLICATE = ["split_seed", "train_seed"]
# every label from the registries (dvlib.methods, dvlib.restore): renaming a method is one line there
METHOD_LABELS = {m: methods.label(m) for m in (*methods.METHODS, *methods.BASELINES)}
PAPER_COLUMNS = {m: methods.label(m) for m in COLUMNS}
RESTORE_LABELS = {m.name: m.label for m in restore.MODES.values()}
# what a merge did with the BatchNorm statistics (dvlib.merging's bn_buffers)
BN_LABELS = {"mean": "mean of the hospitals' statistics", "pretrained": "the pretrained model's statistics",
             "arithmetic": "merged as if they were weights"}
NONE = "–"  # an empty cell: no value for this row and column
METRIC_LABELS = {"accuracy": "Accuracy (%)", "balanced_accuracy": "Balanced accuracy (%)",
                 "macro_f1": "Macro-F1 (%)", "auc_ovr": "AUC, one vs rest (%)"}


def model_label(model: str) -> str:
    """A reader's name for a result file's model id: ``restored_data_vector_finetune_epoch`` ->
    "Data Vector merge + 1 epoch per hospital", ``hospital_2`` -> "hospital 2", ``full`` -> Full Training."""
    if model == "full":
        return methods.label("full_training")
    if model.startswith("hospital_"):
        return f"hospital {model.split('_', 1)[1]}"
    for prefix in ("merged_", "restored_"):
        if model.startswith(prefix):
            rest = model[len(prefix):]
            mode = next((m for m in RESTORE_LABELS if prefix == "restored_" and rest.endswith(f"_{m}")), None)
            method = rest[:-len(mode) - 1] if mode else rest
            if method in METHOD_LABELS:
                name = METHOD_LABELS[method] + ("" if method == "pretrained" else " merge")
                return f"{name} + {RESTORE_LABELS[mode]}" if mode else name
    return model


def results_dir(results: str | os.PathLike) -> Path:
    p = Path(results)
    return p / "results" if (p / "results").is_dir() else p


def committed_results(run: str, needs: str, make: str) -> Path:
    """A committed report's results folder, ``reports/<run>/results`` of the project, or a run or
    results folder given as a path, holding ``needs`` (e.g. ``finetune_eval.csv``); ``make`` names
    what writes it, for the error."""
    from dvlib.runs import project_root

    p = project_root() / "reports" / run / "results"
    p = p if p.is_dir() or not Path(run).is_dir() else results_dir(run)
    if not (p / needs).exists():
        raise DvlibError(f"{p}: no {needs}; run `dvlib run --run {run}` first ({make})")
    return p


def write_tables(out: str | os.PathLike, tables: dict, **markdown) -> Path:
    """Each table as ``<out>/<name>.csv`` and ``<out>/<name>.md`` (``markdown``: ``to_markdown`` options)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df = df.reset_index() if any(df.index.names) else df  # a named index is a column for machines
        write_csv(out / f"{name}.csv", df)
        write_text(out / f"{name}.md", df.to_markdown(index=False, **markdown) + "\n")
    return out


def load_results(results: str | os.PathLike, step: str) -> pd.DataFrame:
    """``<run>/results/<step>.csv`` (``results``: the run folder or its results folder)."""
    path = results_dir(results) / f"{step}.csv"
    if not path.exists():
        raise DvlibError(f"{path}: result file not found; run the step that writes it first")
    return read_csv(path)


def cell(values: pd.Series, scale: float = 100.0) -> str:
    """``"62.8 [60.1, 65.4]"``: mean over replicates with a 95 % t-interval ("62.8" for one)."""
    v = values.dropna()
    return NONE if v.empty else mean_interval(v.to_numpy()).fmt(scale=scale, digits=1)


def part_label(eval_on: str) -> str:
    return eval_on.split("_")[1] if eval_on.startswith("hospital_") else "pooled"


def _part_order(parts) -> list[str]:
    return sorted((p for p in parts if p != "pooled"), key=int) + (["pooled"] if "pooled" in parts else [])


def shard_table(results) -> pd.DataFrame:
    """Images per class in each hospital's train and test split, first split seed."""
    t = load_results(results, "shards")
    t = t[t["split_seed"] == t["split_seed"].min()].drop(columns="split_seed")
    t["hospital"] = "Part " + t["hospital"].astype(str)
    return t.set_index(["hospital", "subset"])


def finetune_table(results, metric: str = "accuracy") -> pd.DataFrame:
    """Each fine-tuned model (rows) on each hospital's test split and pooled (columns), %."""
    ft = load_results(results, "finetune_eval")
    ft = ft.assign(part=ft["eval_on"].map(part_label))
    t = ft.groupby(["model", "part"])[metric].apply(cell).unstack("part")
    t = t[_part_order(t.columns)].rename(columns=lambda p: p if p == "pooled" else f"Part {p}").fillna(NONE)
    t.index = [(methods.label("full_training") if m == "full" else f"hospital {m.split('_')[1]}'s model") for m in t.index]
    t.index.name = f"{METRIC_LABELS[metric]} on the test split of"
    return t


def method_table(results, step: str = "merge_eval", eval_on: str = "pooled") -> pd.DataFrame:
    """Every method's metrics on ``eval_on`` (%, mean [95 % interval] over replicates)."""
    ev = load_results(results, step)
    ev = ev[ev["eval_on"] == eval_on]
    t = ev.groupby("method")[list(METRIC_LABELS)].agg(cell)
    t = t.reindex([m for m in METHOD_LABELS if m in t.index]).rename(index=METHOD_LABELS, columns=METRIC_LABELS)
    t.index.name = "method"
    return t


def bn_policy_table(results) -> pd.DataFrame:
    bn = load_results(results, "bn_policy_eval")
    bn = bn[bn["eval_on"] == "pooled"]
    t = bn.groupby("bn_buffers").agg(**{METRIC_LABELS["accuracy"]: ("accuracy", cell),
                                        METRIC_LABELS["balanced_accuracy"]: ("balanced_accuracy", cell),
                                        "layers with negative variance": ("negative_var_layers", "max"),
                                        "non-finite outputs": ("nonfinite_outputs", "max")})
    t = t.rename(index=BN_LABELS)
    t.index.name = "BN statistics when merging"
    return t


def ablation_table(results, metric: str = "accuracy", eval_on: str = "pooled") -> pd.DataFrame:
    """Merge method x restore mode on ``eval_on`` (%, mean [95 % interval] over replicates)."""
    rs = load_results(results, "restore_eval")
    rs = rs[rs["eval_on"] == eval_on]
    t = rs.groupby(["method", "restore"])[metric].apply(cell).unstack("restore")
    t = t.reindex(columns=[c for c in RESTORE_LABELS if c in t.columns]).rename(columns=RESTORE_LABELS)
    t = t.reindex([m for m in METHOD_LABELS if m in t.index]).rename(index=METHOD_LABELS).fillna(NONE)
    t.index.name = f"{METRIC_LABELS[metric]}, method"
    return t


def paper_rows(results, restore_mode: str = "finetune_epoch") -> pd.DataFrame:
    """Tidy rows (replicate, part, column, metrics) in the paper's layout. A Part Index row's Base
    Model is hospital i's own model; the pooled row's is the mean over the hospitals' models."""
    ft = load_results(results, "finetune_eval")
    rs = load_results(results, "restore_eval")
    merged = rs[(rs["restore"] == restore_mode) & rs["method"].isin(["params_mean", "data_vector", "random_vector"])]
    if merged.empty:
        raise DvlibError(f"no merged models restored with {restore_mode!r} in {results}")
    base = ft[(ft["method"] == "base_model") & ((ft["model"] == ft["eval_on"]) | (ft["eval_on"] == "pooled"))]
    pooled_base = base[base["eval_on"] == "pooled"].groupby(REPLICATE + ["eval_on"], as_index=False)[list(METRIC_LABELS)].mean()
    parts = [base[base["eval_on"] != "pooled"].assign(column="base_model"), pooled_base.assign(column="base_model"),
             ft[ft["method"] == "full_training"].assign(column="full_training"), merged.assign(column=merged["method"])]
    out = pd.concat(parts, ignore_index=True)
    return out.assign(part=out["eval_on"].map(part_label))


def paper_table(results, metric: str = "accuracy", restore_mode: str = "finetune_epoch") -> pd.DataFrame:
    """The paper's Table layout: Part Index x column, mean [95 % interval] over replicates, %."""
    rows = paper_rows(results, restore_mode)
    t = rows.groupby(["part", "column"])[metric].apply(cell).unstack("column")
    t = t.reindex(columns=list(PAPER_COLUMNS)).rename(columns=PAPER_COLUMNS).reindex(_part_order(t.index)).fillna(NONE)
    t.index.name = "Part Index"
    return t


def caption(results, metric: str, restore_mode: str) -> str:
    ft = load_results(results, "finetune_eval")
    n = ft[REPLICATE].drop_duplicates().shape[0]
    return (f"**{METRIC_LABELS[metric]}**, merged models restored with *{RESTORE_LABELS[restore_mode]}*. Part "
            f"Index i: hospital i's own test split; pooled: all test images. Mean over {n} replicate(s) "
            "(split seed × training seed) with a 95 % t-interval.")


def paper_table_numeric(results, metric: str = "accuracy", restore_mode: str = "finetune_epoch") -> pd.DataFrame:
    """Tidy numbers behind :func:`paper_table`: part, column, mean, low, high, n (percent)."""
    rows = paper_rows(results, restore_mode)
    out = []
    for (part, col), g in rows.groupby(["part", "column"]):
        iv = mean_interval(g[metric].to_numpy())
        out.append({"part": part, "column": col, "mean": iv.estimate * 100, "low": iv.low * 100,
                    "high": iv.high * 100, "n_replicates": iv.n})
    return pd.DataFrame(out)


def paper_datasets() -> list[str]:
    from dvlib.data.paper import PAPER_RESULTS

    return sorted(PAPER_RESULTS)


COMPARISON_LABELS = {"part": "Part Index", "column": "model", "mean": "ours, mean (%)", "low": "ours, 95 % low",
                     "high": "ours, 95 % high", "n_replicates": "replicates", "paper": "paper (%)",
                     "difference_pp": "ours − paper (pp)"}


def paper_comparison(results, dataset: str, restore_mode: str = "finetune_epoch") -> pd.DataFrame:
    """Our accuracy beside the paper's for the same dataset, per cell (percentage points), indexed by
    part and column. The paper reports no pooled row, so ours is left out here (it is in :func:`paper_table`)."""
    from dvlib.data.paper import paper_results

    ours = paper_table_numeric(results, "accuracy", restore_mode)
    theirs = paper_results(dataset)
    full = float(theirs.loc[theirs["method"] == "full_training", "accuracy"].iloc[0])
    per_part = theirs[theirs["method"] != "full_training"]
    per_part = pd.DataFrame({"part": per_part["part"].astype(int).astype(str), "column": per_part["method"],
                             "paper": per_part["accuracy"]})
    full_rows = pd.DataFrame({"part": sorted(per_part["part"].unique()), "column": "full_training", "paper": full})
    out = ours.merge(pd.concat([per_part, full_rows]), on=["part", "column"], how="inner")
    out["difference_pp"] = out["mean"] - out["paper"]
    out["column"] = out["column"].map(PAPER_COLUMNS)
    out = out.rename(columns=COMPARISON_LABELS).round(2)
    return out.set_index(["Part Index", "model"])


def figure2_summary(results) -> pd.DataFrame:
    """Per model: mean cosine to Full Training over layers and replicates; for merged models, the
    layers (mean over replicates) where they are closer than every hospital's vector."""
    cos = load_results(results, "layer_cosine")
    per_layer = cos.groupby(["model", "layer_index"])["cosine"].mean().unstack("model")
    hosp = per_layer[[c for c in per_layer if c.startswith("hospital_")]].max(axis=1)
    rows = []
    for m in per_layer:
        rows.append({"model": model_label(m), "mean cosine": f"{per_layer[m].mean():.3f}", "median": f"{per_layer[m].median():.3f}",
                     "layers closer than every hospital": NONE if m.startswith("hospital_") else
                     f"{int((per_layer[m] > hosp).sum())} of {len(per_layer)}"})
    return pd.DataFrame(rows).set_index("model")


def save_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """CSV (for machines) and Markdown (for reviewers) side by side."""
    path = Path(path)
    named = any(table.index.names)  # a named index (one level or several) is a column for machines
    flat = table.reset_index() if named else table
    write_csv(path.with_suffix(".csv"), flat)
    shown = flat.astype(object).where(flat.notna(), NONE)  # an empty cell reads as a dash, never "nan"
    write_text(path.with_suffix(".md"), shown.to_markdown(index=False) + "\n")
    return path


def provenance_text(results) -> str:
    """The run's provenance (versions, commit, device, data fingerprints), as written by the steps."""
    path = results_dir(results) / "provenance.json"
    if not path.exists():
        return f"{path}: no provenance recorded"
    return json.dumps(json.loads(path.read_text()), indent=2)


RESTORES = ("none", "recalibrate", "finetune_epoch")
# several models per replicate: averaged in scores()
BASE_MODEL = f"{methods.label('base_model')} (mean of the hospitals)"


def model_rows(results) -> dict[str, tuple[str, pd.DataFrame]]:
    """Model label -> (the file its rows come from, its rows): Full Training, the hospitals' own
    models, and the data-vector merge after each restore (where the run has it)."""
    ft = load_results(results, "finetune_eval")
    out = {methods.label("full_training"): ("finetune", ft[ft["method"] == "full_training"]),
           BASE_MODEL: ("finetune", ft[ft["method"] == "base_model"])}
    try:
        rs = load_results(results, "restore_eval")
    except DvlibError:  # a run without the merge: its fine-tuned models only
        rs = None
    for r in RESTORES if rs is not None else ():
        out[f"{methods.label('data_vector')} ({RESTORE_LABELS[r]})"] = \
            ("restore", rs[(rs["method"] == "data_vector") & (rs["restore"] == r)])
    return {k: v for k, v in out.items() if not v[1].empty}
