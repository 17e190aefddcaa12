"""The report's claims across datasets: one table from several runs' result files alone (issue 26).

A claim is "Data Vector (after a restore) beats B" for B in Base Model, Params Mean, Full Training,
Random Vector (:func:`dvlib.reporting.claims.claim`). On each run it is the pooled paired difference
over replicates (split seed x training seed) with its t-test p-value; the p-values of every run,
both metrics and every claim form one family, Holm-adjusted together, and each interval is the
t-interval at the level Holm judged that claim at in this family
(:func:`dvlib.reporting.claims.holm_interval`), so it excludes 0 exactly when the family's Holm
p < 0.05. A claim *holds* on a run when its Holm p < 0.05 and Data Vector is the better. The
paper's numbers (its Tables 1-3, accuracy only, after its restore epoch) stand beside the claims
they speak to.

Only ``run.json``, ``finetune_eval.csv`` and ``restore_eval.csv`` of each run are read: no model
files, no data, no cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dvlib import methods, stats
from dvlib.data.paper import PAPER_RESULTS, paper_results
from dvlib.io import DvlibError, all_or_nothing, read_csv, read_json, write_csv, write_text
from dvlib.reporting.claims import HOLM_INTERVAL, RIVALS, claim, holm_interval
from dvlib.reporting.tables import METRIC_LABELS, PAPER_COLUMNS, REPLICATE, RESTORE_LABELS, RESTORES, results_dir

NEEDS = ("run.json", "finetune_eval.csv", "restore_eval.csv")
DESIGN_FIELDS = ("test_design", "scheme", "preset")  # runs differing in one of these test different things
METRICS = ("accuracy", "balanced_accuracy")
ALPHA = 0.05
PAPER_RESTORE = "finetune_epoch"  # the paper's restore (its section 4.1): its numbers sit beside these claims only
# our dataset -> the paper's table that speaks to it; the ODIR-2019 fundus set stands in for the paper's Retina
PAPER_TABLE_OF = {"pad_ufes_20": "pad_ufes_20", "retina": "retina", "bladder": "bladder", "odir_fundus": "retina"}


@dataclass(frozen=True)
class Run:
    label: str          # the run folder's name: a column of the table
    results: Path
    settings: dict      # run.json
    replicates: int


def load_run(path: str | os.PathLike) -> Run:
    """A run (or its results folder) with every file the table needs, at least 2 replicates."""
    res = results_dir(path)
    for name in NEEDS:
        if not (res / name).is_file():
            raise DvlibError(f"{res / name}: result file not found; the cross-dataset table needs "
                             f"{', '.join(NEEDS)} of every run")
    settings = read_json(res / "run.json")
    if not isinstance(settings, dict):
        raise DvlibError(f"{res / 'run.json'}: expected a JSON object of run settings")
    for field in DESIGN_FIELDS:
        if field not in settings:
            raise DvlibError(f"{res / 'run.json'}: no {field!r}; cannot tell the run's test design")
    label = res.parent.name if res.name == "results" else res.name
    ft = read_csv(res / "finetune_eval.csv")
    rs = read_csv(res / "restore_eval.csv")
    for name, df, cols in (("finetune_eval.csv", ft, REPLICATE + ["method", "eval_on", *METRICS]),
                           ("restore_eval.csv", rs, REPLICATE + ["method", "restore", "eval_on", *METRICS])):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise DvlibError(f"{res / name}: no column(s) {', '.join(missing)}")
    reps = ft[REPLICATE].drop_duplicates().merge(rs.loc[rs["method"] == "data_vector", REPLICATE].drop_duplicates())
    if len(reps) < 2:
        raise DvlibError(f"{label} ({res}): {len(reps)} replicate(s) with both the fine-tuned and the merged models; "
                         "a paired test over replicates needs at least 2, so no claim can be tested")
    return Run(label, res, settings, len(reps))


def check_designs(runs: list[Run]) -> None:
    """Refuse runs whose claims test different things, naming both runs and the field."""
    labels = [r.label for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise DvlibError(f"run {dup[0]!r} given twice (runs are told apart by their folder names)")
    first = runs[0]
    for r in runs[1:]:
        for field in DESIGN_FIELDS:
            if r.settings[field] != first.settings[field]:
                raise DvlibError(f"runs of different test designs: {first.label} has {field}="
                                 f"{first.settings[field]!r}, {r.label} has {field}={r.settings[field]!r}; "
                                 "their claims cannot share one table")


def _claims_of(run: Run) -> list[tuple[str, str]]:
    """(restore, rival) pairs the run can test, in the per-run claims tables' order."""
    rs = read_csv(run.results / "restore_eval.csv")
    present = set(zip(rs["method"], rs["restore"]))
    return [(r, rival) for r in RESTORES if ("data_vector", r) in present for rival in RIVALS
            if rival in ("base_model", "full_training") or (rival, r) in present]


def paper_difference(dataset: str, rival: str) -> float:
    """The paper's Data Vector minus ``rival``, accuracy in points: the mean over its Part rows
    (its Full Training is one number per table)."""
    t = paper_results(PAPER_TABLE_OF[dataset])
    dv = t.loc[t["method"] == "data_vector", "accuracy"].mean()
    return float(dv - t.loc[t["method"] == rival, "accuracy"].mean())


def dataset_of(run: Run) -> str:
    return Path(str(run.settings.get("dataset", ""))).name  # a folder given as --dataset: its name


def shared_claims(runs: list[Run]) -> tuple[list, list]:
    """(restore, rival) pairs every run can test, and those only some can (left out: no verdict across runs)."""
    each = [_claims_of(run) for run in runs]
    shared = [x for x in each[0] if all(x in c for c in each)]
    return shared, sorted({x for c in each for x in c} - set(shared))


def claims_long(runs: list[Run]) -> pd.DataFrame:
    """One row per run x metric x claim, with the Holm adjustment over all of them and each claim's
    interval at the level that family's Holm judged it at (``holm_low_pp``, ``holm_high_pp``)."""
    shared, _ = shared_claims(runs)
    rows, diffs = [], []
    for run in runs:
        dataset = dataset_of(run)
        for metric in METRICS:
            for restore_mode, rival in shared:
                c = claim(run.results, metric, rival, restore_mode, preds=None)
                paper = (paper_difference(dataset, rival) if metric == "accuracy" and restore_mode == PAPER_RESTORE
                         and dataset in PAPER_TABLE_OF else np.nan)
                rows.append({"run": run.label, "dataset": dataset, "metric": metric, "claim": c["claim"],
                             "restore": restore_mode, "rival": rival, "diff_pp": c["pooled diff (pp)"],
                             "p": c["t p"], "replicates": c["replicates"], "paper_diff_pp": paper})
                diffs.append(c["diffs"])
    df = pd.DataFrame(rows)
    ok = df["p"].notna()
    df["p_holm"] = np.nan
    df.loc[ok, "p_holm"] = stats.holm(df.loc[ok, "p"].to_numpy())
    # the interval from the same (whole-family) correction as the verdict beside it, never the unadjusted one
    bounds = [holm_interval(d, p, ph) for d, p, ph in zip(diffs, df["p"], df["p_holm"])]
    df["holm_low_pp"] = [lo * 100 for lo, _ in bounds]
    df["holm_high_pp"] = [hi * 100 for _, hi in bounds]
    df["holds"] = ok & (df["p_holm"] < ALPHA) & (df["diff_pp"] > 0)
    df["worse"] = ok & (df["p_holm"] < ALPHA) & (df["diff_pp"] < 0)
    return df


def verdict(group: pd.DataFrame, labels: list[str]) -> str:
    """Holds on both / on one (which) / on neither, for one claim on one metric across runs."""
    g = group.set_index("run").reindex(labels)
    held = [r for r in labels if bool(g.at[r, "holds"])]
    untested = [r for r in labels if not np.isfinite(g.at[r, "p_holm"])]
    if len(held) == len(labels):
        out = "holds on both" if len(labels) == 2 else f"holds on all {len(labels)}"
    elif not held:
        out = "holds on neither" if len(labels) == 2 else "holds on none"
    else:
        out = f"holds on {', '.join(held)} only"
    worse = [r for r in labels if bool(g.at[r, "worse"])]
    notes = ([f"{methods.label('data_vector')} worse on {', '.join(worse)}"] if worse else []) + \
            ([f"not testable on {', '.join(untested)}"] if untested else [])
    return out + (f" ({'; '.join(notes)})" if notes else "")


def across_table(long: pd.DataFrame, runs: list[Run]) -> pd.DataFrame:
    """Wide and numeric: one row per metric x claim, each run's columns side by side, the verdict."""
    labels = [r.label for r in runs]
    rows = []
    for (metric, claim_name), g in long.groupby(["metric", "claim"], sort=False):
        row = {"metric": metric, "claim": claim_name}
        for r in labels:
            x = g[g["run"] == r].iloc[0]
            row.update({f"{r} diff_pp": x["diff_pp"], f"{r} holm_low_pp": x["holm_low_pp"],
                        f"{r} holm_high_pp": x["holm_high_pp"],
                        f"{r} p": x["p"], f"{r} p_holm": x["p_holm"], f"{r} replicates": int(x["replicates"]),
                        f"{r} paper_diff_pp": x["paper_diff_pp"]})
        row["verdict"] = verdict(g, labels)
        rows.append(row)
    return pd.DataFrame(rows)


def _paper_header(run: Run) -> str | None:
    key = PAPER_TABLE_OF.get(dataset_of(run))
    return None if key is None else f"paper, Table {PAPER_RESULTS[key]['table']} ({PAPER_RESULTS[key]['title']}), pp"


def family_label(n: int) -> str:
    """The interval's name, saying which Holm family it was adjusted in."""
    return f"{HOLM_INTERVAL} (family: {n} tests, every run x {' and '.join(METRICS).replace('_', ' ')} x every claim)"


def markdown_table(table: pd.DataFrame, runs: list[Run], n: int) -> pd.DataFrame:
    """:func:`across_table` for reading: difference [Holm-adjusted interval] (Holm p) per run, the paper
    beside; ``n``: the size of the Holm family."""
    out = pd.DataFrame({"metric": table["metric"].map(METRIC_LABELS).str.replace(" (%)", "", regex=False),
                        "claim": table["claim"]})
    for run in runs:
        r = run.label
        out[f"{r}: difference, pp [{family_label(n)}] (Holm p)"] = [
            f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}] (p={p:.2g})" if np.isfinite(p) else f"{d:+.1f} (not testable)"
            for d, lo, hi, p in zip(table[f"{r} diff_pp"], table[f"{r} holm_low_pp"], table[f"{r} holm_high_pp"],
                                    table[f"{r} p_holm"])]
        header = _paper_header(run)
        if header is not None:
            out[f"{r}: {header}"] = table[f"{r} paper_diff_pp"].map(lambda v: f"{v:+.1f}" if np.isfinite(v) else "–")
    out["verdict"] = table["verdict"]
    return out


def _describe(run: Run) -> str:
    s = run.settings
    return (f"`{run.label}`: dataset {dataset_of(run) or '?'}, preset {s['preset']}, test design {s['test_design']}, "
            f"scheme {s['scheme']}, {run.replicates} replicates (split seeds x training seeds)")


def write_across(paths, out: str | os.PathLike, command: str | None = None) -> tuple[Path, Path]:
    """``<out>/claims_across.csv`` (numbers) and ``.md`` (for reading), or a DvlibError and nothing written."""
    runs = [load_run(p) for p in paths]
    if len(runs) < 2:
        raise DvlibError(f"the claims across datasets need at least 2 runs, got {len(runs)}")
    check_designs(runs)
    long = claims_long(runs)
    _, skipped = shared_claims(runs)
    table = across_table(long, runs)
    n = int(long["p"].notna().sum())
    dv = methods.label("data_vector")
    text = ["# The claims across datasets", "",
            *([f"Made by `{command}` from the runs' result files alone.", ""] if command else []),
            "Runs: " + "; ".join(_describe(r) for r in runs) + ".", "",
            f"Each cell: {dv} minus the rival on all test images pooled, mean over replicates in percentage "
            f"points with its {HOLM_INTERVAL}; p from the paired t-test, Holm-adjusted over the whole family of {n} "
            f"tests (every run x {' and '.join(METRICS).replace('_', ' ')} x every claim). Each interval is the "
            "t-interval at the level Holm judged that claim at in this family, so it excludes 0 exactly when the "
            f"Holm p < {ALPHA}. A claim holds on a run when its Holm p < {ALPHA} and {dv} is the better.", "",
            markdown_table(table, runs, n).to_markdown(index=False), "",
            f"The paper's column: its {dv} minus the rival in accuracy, the mean over its four Part rows "
            f"({methods.label('full_training')}: one number per table), after its restore epoch (our "
            f"'{RESTORE_LABELS[PAPER_RESTORE]}'); a single run with no interval, beside our claims only where it has "
            "the number." + (" The ODIR-2019 fundus set stands in for the paper's Retina set (Table 1), with three of "
                             "its four classes." if any(dataset_of(r) == "odir_fundus" for r in runs) else "")]
    if skipped:
        text += ["", "Left out (not run in every run): " + "; ".join(
            f"{RESTORE_LABELS[r]} vs {PAPER_COLUMNS[x]}" for r, x in skipped) + "."]
    out = Path(out)
    with all_or_nothing():
        csv_path = write_csv(out / "claims_across.csv", table)
        md_path = write_text(out / "claims_across.md", "\n".join(text) + "\n")
    return csv_path, md_path
