"""What each step of :mod:`dvlib.experiment` writes: one tidy results file, per-image predictions for
paired statistics, and (with ``DVLIB_WORK_LOG=FILE``) one JSON line of work.

The work log line holds the step's wall time, the images this process trained on and ran forward
during it (:func:`dvlib.device.work`), and the evaluations computed and reused
(:func:`dvlib.experiment.cache.evaluation_counts`); ``benchmarks/bench_train.py`` turns them into
compute floors.
"""
from __future__ import annotations

import functools
import json
import os
import time

import pandas as pd

from dvlib import device as hw  # the work counters
from dvlib.experiment.cache import evaluation_counts
from dvlib.io import atomic_path, write_csv
from dvlib.runs import Run


def write_predictions(path, frames: list[pd.DataFrame]) -> None:
    """Per-image predictions, gzipped CSV (byte-stable: no time stamp)."""
    with atomic_path(path, suffix=".csv.gz") as tmp:
        pd.concat(frames, ignore_index=True).round({"p_true": 5}).to_csv(
            tmp, index=False, compression={"method": "gzip", "mtime": 0})


def save_results(run: Run, step: str, rows: list[dict], preds: list[pd.DataFrame] | None = None) -> pd.DataFrame:
    """``results/<step>.csv`` from ``rows``, and ``results/<step without _eval>_predictions.csv.gz``."""
    table = pd.DataFrame(rows)
    write_csv(run.result(step), table)
    if preds:
        write_predictions(run.dir / "results" / f"{step.removesuffix('_eval')}_predictions.csv.gz", preds)
    return table


def work_logged(step):
    """Append the step's work to ``$DVLIB_WORK_LOG`` (see the module docstring), if set."""
    @functools.wraps(step)
    def wrapper(run: Run, *args, **kwargs):
        path = os.environ.get("DVLIB_WORK_LOG")
        if not path:
            return step(run, *args, **kwargs)
        w0, e0, t0 = hw.work(), evaluation_counts(), time.perf_counter()
        out = step(run, *args, **kwargs)
        w1, e1 = hw.work(), evaluation_counts()
        record = {"step": step.__name__, "run": run.name, "pid": os.getpid(), "seconds": time.perf_counter() - t0,
                  **{k: w1[k] - w0[k] for k in w1}, **{f"evaluations_{k}": e1[k] - e0[k] for k in e1}}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return out
    return wrapper
