"""Notebook 07 (federated learning on Flower): its cells, for tools/make_notebooks.py to register.

In make_notebooks.py, after ``md``, ``code`` and ``header`` are defined::

    from nb_07_federated import CELLS as NB07   # noqa: E402
    NOTEBOOKS["07_federated"] = NB07

``CELLS`` is built on first use with make_notebooks' own helpers (those of the running script when it
is ``python tools/make_notebooks.py``, so that it is not imported a second time). The cells call dvlib only.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _helpers():
    main = sys.modules.get("__main__")
    if Path(getattr(main, "__file__", "") or "").name == "make_notebooks.py":
        return main.md, main.code, main.header
    from make_notebooks import code, header, md

    return md, code, header


def __getattr__(name: str):
    if name == "CELLS":
        return build(*_helpers())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(md, code, header) -> list:
    """The notebook's cells, made with make_notebooks' ``md``, ``code`` and ``header``."""
    return header(
        "07 · Federated learning on Flower: one exchange against FedAvg and FedBN",
        "The paper argues that a data vector needs one exchange where federated learning needs many rounds, "
        "but never measures it. Here every hospital is a Flower `ClientApp` running dvlib's own fine-tuning "
        "stage on its own images, and the coordinator a `ServerApp` using dvlib's merge and restore stages, in "
        "Flower's simulation runtime. **Data vector**: each hospital fine-tunes for its full local epochs and "
        "sends its vector once; the server merges ($\\lambda = 0.5$, heads averaged), then the merged model "
        "visits the hospitals in turn to restore BatchNorm (a second, sequential round). **FedAvg** "
        "(sample-weighted) and **FedBN** (BatchNorm statistics never leave a hospital; each is scored with its "
        "own) at R rounds, with the same total local epochs per hospital (epochs / R per round). Bytes each "
        "hospital sends and receives, and synchronous rounds, are recorded for every method. The data vector's "
        "accuracy is the run's own restore result (notebook 04); its Flower exchange is checked against the "
        "run's model files.",
        "the vector files and restore results of notebooks 02-04 (`pip install -e '.[fl]'` for Flower).",
        "`results/federated_eval.csv`, `results/federated_log.csv`, `results/federated_checks.csv`, "
        "`results/federated_predictions.csv.gz`, `figures/<run>/federated_rounds.{png,pdf}`, "
        "`figures/<run>/federated_bytes.{png,pdf}`.",
        extra_params='fl_methods: list = ["fedavg", "fedbn"]  # federated baselines: fedavg | fedbn\n'
                     'fl_rounds: list = []  # rounds R, each dividing the epochs; empty: [1, 2, 4, 8] ([1, 2] for smoke)',
    ) + [
        md("## What runs where\nOne Flower simulation per replicate holds every exchange: the data vector first, "
           "then FedAvg and FedBN at each R. A hospital reuses a result only where it is the computation's own "
           "(its step-02 vector file for the data vector and for R = 1; FedBN's first round, which is FedAvg's): "
           "see `dvlib.studies.federated.hospital`. Seeds: round k at hospital L trains with `derive(seed, L)` for k = 1 "
           "(step 02's) and `derive(seed, L, \"round\", k)` after."),
        code("from dvlib.studies import federated as fl\n"
             "from dvlib.studies.federated import report as fedrep\n\n"
             "fed = fl.step_federated(R, methods=fl_methods, rounds=fl_rounds or None)"),
        md("The data vector through Flower against the run's own files (`dvlib merge`, `dvlib site restore`), "
           "and FedAvg with one round against the run's sample-weighted merge (equal within 1e-6; the largest "
           "difference and whether it is bit for bit below):"),
        code("# NBVAL_CHECK_OUTPUT\nfrom dvlib.studies.federated.steps import checks_text\n\nprint(checks_text(R))"),
        code("display(R.read(\"federated_checks\"))"),
        md("## Accuracy against synchronous rounds\nTop: all test images pooled; bottom: the mean over "
           "hospitals of each one's own test split. The data vector sits at one round (no restore) or two (a "
           "restore pass, whose visits are sequential)."),
        code("fedrep.plot_rounds(R.dir, FIG / \"federated_rounds\");"),
        md("## Accuracy against bytes each hospital sends"),
        code("fedrep.plot_bytes(R.dir, FIG / \"federated_bytes\");"),
        md("## The numbers\nMean [95 % interval] over replicates; MB per hospital over the whole exchange "
           "(received includes the final model)."),
        code("display(fedrep.federated_table(R.dir, \"pooled\"))\ndisplay(fedrep.federated_table(R.dir, \"hospitals\"))"),
        md("## Where each wins"),
        code("display(Markdown(fedrep.federated_summary(R.dir, \"accuracy\")))\n"
             "display(Markdown(fedrep.federated_summary(R.dir, \"balanced_accuracy\")))"),
    ]
