"""Write the README's results block from a report's files alone: `make readme-results`.

Reads ``reports/<run>/results/`` (the tables and claims 06 wrote), ``reports/<run>/steps.json`` (run
times) and ``figures/<run>/fig2_layerwise_cosine.png``, and replaces what lies between
``<!-- RESULTS -->`` and ``<!-- /RESULTS -->`` in README.md. Nothing here is typed by hand, so the
README says what the committed report says.

    python tools/readme_results.py [RUN ...]   # default: every committed report with a results table
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvlib.io import DvlibError, read_csv  # noqa: E402
from dvlib.pipeline import CHAIN  # noqa: E402
from dvlib.reporting.claims import headline  # noqa: E402

START, END = "<!-- RESULTS -->", "<!-- /RESULTS -->"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def block(run: str) -> str:
    reports = ROOT / "reports" / run
    results = reports / "results"
    if not (results / "table_accuracy.md").exists():
        raise DvlibError(f"{results}: no table_accuracy.md; run `dvlib run --run {run}` (notebook 06) first")
    settings = json.loads((results / "run.json").read_text())
    steps = json.loads((reports / "steps.json").read_text())
    ran = [s for s in steps if s["status"] == "ran" and s["step"] in CHAIN]  # the main chain's times
    prov = json.loads((results / "provenance.json").read_text()) if (results / "provenance.json").exists() else {}
    reps = read_csv(results / "restore_eval.csv")[["split_seed", "train_seed"]].drop_duplicates()
    split_seeds, train_seeds = sorted(reps["split_seed"].unique().tolist()), sorted(reps["train_seed"].unique().tolist())
    scheme = settings.get("scheme", "iid")
    where = "IID hospitals" if scheme == "iid" else f"non-IID hospitals (Dirichlet alpha {settings.get('alpha')})"
    device = next((v for v in prov.get("steps", {}).values() if "device" in v), {})
    lines = [f"### `{run}`: {settings.get('dataset')}, {where}, preset `{settings.get('preset')}`, "
             f"{len(reps)} replicates (split seeds {split_seeds} x training seeds {train_seeds})", "",
             f"Pooled and per-hospital accuracy (%, mean [95 % t-interval] over replicates; merged models "
             f"after the paper's restore epoch), from [`reports/{run}/results/table_accuracy.md`]"
             f"(reports/{run}/results/table_accuracy.md):", "",
             (results / "table_accuracy.md").read_text().strip(), "",
             f"What the paired tests say, in accuracy and in balanced accuracy (06_results; every claim, with "
             f"and without each restore: [`claims_accuracy.md`](reports/{run}/results/claims_accuracy.md), "
             f"[`claims_balanced_accuracy.md`](reports/{run}/results/claims_balanced_accuracy.md)). A difference is "
             f"called only where the paired t-test over replicates survives Holm's correction, and each interval "
             f"is taken at the level Holm judged its claim at, so it excludes 0 exactly then:", "",
             headline(results, restore_mode="finetune_epoch"), "", headline(results, restore_mode="recalibrate"), ""]
    fig = ROOT / "figures" / run / "fig2_layerwise_cosine.png"
    if fig.exists():
        lines += [f"![Figure 2: layer-wise cosine similarity of each data vector to Full Training's]"
                  f"(figures/{run}/fig2_layerwise_cosine.png)", ""]
    if ran:
        total = sum(s["seconds"] for s in ran)
        per = ", ".join(f"{s['step']} {minutes(s['seconds'])}" for s in ran)
        cpu = f"{device.get('name', '?')}, {device.get('threads', '?')} threads" if device.get("device") == "cpu" \
            else device.get("name", "?")
        # steps.json's notes stay in the report: they tell how a run went, not what a reader needs here
        lines += [f"Run time: {minutes(total)} in all on {cpu} ({per}), pauses included. Executed notebooks: "
                  f"[`reports/{run}/`](reports/{run}/).", ""]
    return "\n".join(lines)


def noise_block(folder: Path) -> str:
    """The training-noise tables of ``tools/training_noise.py`` (``make report-seeds``), as written."""
    rel = folder.relative_to(ROOT)
    text = (folder / "README.md").read_text().split("\n", 1)[1].strip()  # its own title dropped
    text = text.replace("\n## ", "\n#### ")
    return "\n".join([f"### Training noise on a fixed split: [`{rel}/`]({rel}/README.md)", "", text, ""])


def federated_block(folder: Path) -> str:
    """Notebook 07 under both split schemes (``tools/federated_schemes.py``, ``make report-federated``):
    the pooled-accuracy table and each run's accuracy paragraph, as written; the rest is linked."""
    rel = folder.relative_to(ROOT)
    text = (folder / "README.md").read_text().replace("](../", "](reports/").split("\n## ")
    keep = [text[0].split("\n", 1)[1].strip()]
    keep += [f"#### {t.strip()}" for t in text[1:] if t.startswith("Accuracy: all test images")]
    for t in text[1:]:
        if t.startswith("Where each wins"):  # the heading and its first paragraph, the accuracy one
            heading, first = t.split("\n\n")[:2]
            keep.append(f"#### {heading}\n\n{first.strip()}")
    return "\n".join([f"### Federated learning on Flower against one data-vector exchange: [`{rel}/`]({rel}/README.md)",
                      "", "\n\n".join(keep), "", f"Balanced accuracy and the per-hospital tables: [`{rel}/README.md`]"
                      f"({rel}/README.md).", ""])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", metavar="RUN",
                    help="committed reports to write (default: every one under reports/ with a results table)")
    argv = ap.parse_args(argv).runs
    # the training-noise runs (make report-seeds) get their own block, not the main report's
    noise = sorted(p.parent for p in (ROOT / "reports").glob("*/scheme_gap.md"))
    skip = {"smoke"} | {f"{d.name}-" for d in noise}
    runs = argv or sorted(p.parent.parent.name for p in (ROOT / "reports").glob("*/results/table_accuracy.md")
                          if not any(p.parent.parent.name.startswith(k) for k in skip))
    if not runs:
        print("readme_results: error: no report under reports/ has results/table_accuracy.md; run `make report`",
              file=sys.stderr)
        return 2
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text:
        print(f"{readme}: no {START} marker", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1] if END in rest else rest
    try:
        federated = sorted(p.parent for p in (ROOT / "reports").glob("*/federated_accuracy_pooled.md"))
        body = "\n".join([block(r) for r in runs] + [noise_block(d) for d in noise] + [federated_block(d) for d in federated])
    except DvlibError as e:
        print(f"readme_results: error: {e}", file=sys.stderr)
        return 2
    readme.write_text(f"{head}{START}\n## Results\n\n{body}{END}{tail}")
    print(f"wrote the results of {', '.join(runs)} into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
