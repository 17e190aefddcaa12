"""Metrics of models scored at the hospitals: each hospital's own row, and all test images pooled.

Under FedBN every hospital has its own model (shared weights, its own BatchNorm statistics), so the
pooled row pools each hospital's predictions by its own model. Rows and per-image predictions have
the columns :func:`dvlib.stages.evaluate` gives (which scores one model on every shard); with the
same model everywhere the two agree (tests/test_federated.py).
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dvlib.metrics import compute_metrics


def rows_from_parts(parts: Sequence[dict], classes: Sequence[str]) -> tuple[list[dict], pd.DataFrame]:
    """``parts``: per hospital, in order, ``site``, ``labels``, ``probs`` [n, C], ``images``; returns
    (metric rows: each hospital, then ``pooled`` when there are several; per-image predictions)."""
    names = [str(c) for c in range(len(classes))]
    groups = [(p["site"], np.asarray(p["labels"]), np.asarray(p["probs"])) for p in parts]
    if len(groups) > 1:
        groups.append(("pooled", np.concatenate([y for _, y, _ in groups]), np.concatenate([q for _, _, q in groups])))
    rows = []
    for name, y, q in groups:
        met = compute_metrics(y, q, names)
        rows.append({"eval_on": name, **{k: v for k, v in met.items() if k != "confusion"},
                     "confusion": json.dumps(met["confusion"])})
    preds = pd.concat([pd.DataFrame({"eval_on": p["site"], "image": list(p["images"]), "label": np.asarray(p["labels"]),
                                     "pred": np.asarray(p["probs"]).argmax(1),
                                     "p_true": np.asarray(p["probs"])[np.arange(len(p["labels"])), np.asarray(p["labels"])]})
                       for p in parts], ignore_index=True)
    return rows, preds
