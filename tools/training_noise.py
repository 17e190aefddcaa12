"""Training noise on a fixed split against the IID/Dirichlet difference (issue 18): `make report-seeds`.

Reads the result files of two committed runs on the ``shared`` test design (the same test patients
under both schemes; split seed fixed, several training seeds) and, optionally, the main report's
split-vs-training decomposition; writes ``<out>/noise_table.{csv,md}``, ``<out>/scheme_gap.{csv,md}``,
``<out>/split_variance.{csv,md}`` and ``<out>/README.md`` (the three tables, with how they were made).

    python tools/training_noise.py seeds-pad_ufes_20-iid seeds-pad_ufes_20-dirichlet0.5 \\
        --split-run quick-pad_ufes_20 --out reports/seeds-pad_ufes_20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvlib.io import DvlibError, write_text  # noqa: E402
from dvlib.reporting.claims import variance_table  # noqa: E402
from dvlib.studies.noise.report import against, noise_table, scheme_gap, scores  # noqa: E402
from dvlib.reporting.tables import committed_results, write_tables  # noqa: E402


def results(run: str) -> Path:
    return committed_results(run, "finetune_eval.csv", "make report-seeds")


def describe(run: str) -> str:
    f = results(run) / "run.json"
    if not f.exists():
        return f"`{run}`"
    s = json.loads(f.read_text())
    scheme = "IID" if s.get("scheme") == "iid" else f"Dirichlet alpha {s.get('alpha')}"
    return f"`{run}` ({scheme}, test design {s.get('test_design')}, preset {s.get('preset')})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="first run (e.g. the IID one)")
    ap.add_argument("b", help="second run (e.g. the Dirichlet one), on the same test patients")
    ap.add_argument("--split-run", help="a run with several split seeds, for the split-vs-training decomposition")
    ap.add_argument("--metric", default="accuracy", choices=("accuracy", "balanced_accuracy"))
    ap.add_argument("--out", required=True, help="folder for the tables")
    a = ap.parse_args(argv)
    try:
        runs = {a.a: results(a.a), a.b: results(a.b)}
        tables = {"noise_table": noise_table(runs, a.metric), "scheme_gap": scheme_gap(runs[a.a], runs[a.b], a.metric)}
        # Full Training of the first run that has it is the reference for every model of both runs
        ref = next((r for r in runs if "Full Training" in set(scores(runs[r], a.metric)["model"])), None)
        if ref is not None:
            tables["against_full_training"] = against(runs, runs[ref], metric=a.metric)
        if a.split_run:
            tables["split_variance"] = variance_table({a.split_run: results(a.split_run)}, a.metric).reset_index()
        out = write_tables(a.out, tables, floatfmt=".3g")  # only once every table is computed: a refused input leaves nothing
        text = [f"# Training noise on a fixed split ({a.metric}, pooled test set)", "",
                f"Made by `python tools/training_noise.py {a.a} {a.b}"
                f"{f' --split-run {a.split_run}' if a.split_run else ''} --out {a.out}` from the runs' result files.",
                f"Runs: {describe(a.a)} and {describe(a.b)}.", "",
                "## Each model over the training seeds, split fixed", "", tables["noise_table"].to_markdown(index=False), "",
                f"## `{a.a}` minus `{a.b}`, paired by training seed on the same test images", "",
                tables["scheme_gap"].to_markdown(index=False, floatfmt=".3g"), ""]
        if ref is not None:
            text += [f"## Against Full Training (of `{ref}`: under the shared test design it trains on the same images "
                     "for either scheme), paired by training seed", "",
                     tables["against_full_training"].to_markdown(index=False, floatfmt=".3g"), ""]
        if a.split_run:
            text += [f"## Split against training in `{a.split_run}` (several split seeds)", "",
                     tables["split_variance"].to_markdown(index=False), ""]
        write_text(out / "README.md", "\n".join(text))
    except DvlibError as e:
        print(f"training_noise: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f'{n}.md' for n in tables)} and README.md to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
