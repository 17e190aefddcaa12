"""Notebook 07 under two split schemes side by side (issue 14): `make report-federated`.

Reads ``results/federated_eval.csv`` of two committed runs (IID and Dirichlet hospitals; on the
``shared`` test design their test patients are the same) and writes, into ``--out``,
``federated_<metric>_<scope>.{csv,md}`` for accuracy and balanced accuracy on all test images pooled
and averaged over the hospitals, and ``README.md``: the tables, each run's "where each wins"
paragraph (``dvlib.studies.federated.report.federated_summary``) and how they were made.

    python tools/federated_schemes.py seeds-pad_ufes_20-iid seeds-pad_ufes_20-dirichlet0.5 \\
        --out reports/federated-pad_ufes_20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvlib.io import DvlibError, read_csv, write_text  # noqa: E402
from dvlib.studies.federated.report import SCOPES, federated_summary, scheme_table  # noqa: E402
from dvlib.reporting.tables import committed_results, write_tables  # noqa: E402

METRICS = ("accuracy", "balanced_accuracy")


def results(run: str) -> Path:
    return committed_results(run, "federated_eval.csv", "make report-federated")


def describe(run: str, p: Path) -> str:
    s = json.loads((p / "run.json").read_text()) if (p / "run.json").exists() else {}
    scheme = "IID" if s.get("scheme", "iid") == "iid" else f"Dirichlet alpha {s.get('alpha')}"
    ev = read_csv(p / "federated_eval.csv")
    reps = ev[["split_seed", "train_seed"]].drop_duplicates()
    rounds = sorted(ev.loc[ev["method"] != "data_vector", "rounds"].astype(int).unique().tolist())
    return (f"[`{run}`](../{run}/07_federated.ipynb) ({scheme} hospitals, test design {s.get('test_design', '?')}, "
            f"preset {s.get('preset', '?')}; split seeds {sorted(reps['split_seed'].unique().tolist())}, "
            f"training seeds {sorted(reps['train_seed'].unique().tolist())}; FedAvg/FedBN at R = "
            f"{', '.join(map(str, rounds))})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="runs whose notebook 07 has run (e.g. the IID and the Dirichlet one)")
    ap.add_argument("--out", required=True, help="folder for the tables")
    a = ap.parse_args(argv)
    try:
        runs = {r: results(r) for r in a.runs}
        labels = {r: r.rsplit("-", 1)[-1] if len(runs) > 1 else r for r in runs}  # column names: iid, dirichlet0.5
        if len(set(labels.values())) < len(labels):
            labels = {r: r for r in runs}
        named = {labels[r]: p for r, p in runs.items()}
        tables = {f"federated_{m}_{s}": scheme_table(named, m, s) for m in METRICS for s in SCOPES}
        summaries = {r: [federated_summary(p, m) for m in METRICS] for r, p in runs.items()}
        out = write_tables(a.out, tables)  # only once every table is computed: a refused input leaves nothing
        text = ["# The data vector against FedAvg and FedBN under two split schemes (notebook 07)", "",
                f"Made by `python tools/federated_schemes.py {' '.join(a.runs)} --out {a.out}` from the runs' "
                "`federated_eval.csv`.", "", "Runs: " + "; ".join(describe(r, p) for r, p in runs.items()) + ".", "",
                "Each cell: mean ± sd over replicates (%); the difference from the data vector with BatchNorm "
                "recalibration in the same run is paired by replicate (mean [95 % t-interval], p). FedAvg and FedBN "
                "spend the same local epochs per hospital as the data vector (epochs / R per round). Synchronous "
                "rounds: rounds every hospital takes part in; the data vector's restore visits are sequential.", ""]
        for m in METRICS:
            for s, scope_text in SCOPES.items():
                text += [f"## {m.replace('_', ' ').capitalize()}: {scope_text}", "",
                         tables[f"federated_{m}_{s}"].to_markdown(index=False), ""]
        for r, paras in summaries.items():
            text += [f"## Where each wins: `{r}`", "", *[p + "\n" for p in paras]]
        text += ["## The Flower exchange against the runs' own files (`federated_checks.csv`)", "",
                 "Largest absolute difference over replicates and tensors; bit-identical in how many replicates:", ""]
        for r, p in runs.items():
            if not (p / "federated_checks.csv").exists():  # written by notebook 07; absent in results made by hand
                text += [f"`{r}`: no `federated_checks.csv`.", ""]
                continue
            c = read_csv(p / "federated_checks.csv").groupby("check", sort=False).agg(
                max_abs_diff=("max_abs_diff", "max"), bit_identical=("bit_identical", "sum"), replicates=("check", "size"))
            text += [f"`{r}`:", "", c.reset_index().to_markdown(index=False, floatfmt=".3g"), ""]
        write_text(out / "README.md", "\n".join(text).rstrip() + "\n")
    except DvlibError as e:
        print(f"federated_schemes: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f'{n}.md' for n in tables)} and README.md to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
