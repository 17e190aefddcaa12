"""Notebook 07's step: the data vector against FedAvg and FedBN on the run's hospitals, through Flower.

:func:`step_federated` runs, for every replicate, one Flower simulation holding every job: the
data-vector exchange (checked against the run's own merged and restored models), then FedAvg and
FedBN at each R (the same total local epochs per hospital, epochs/R per round; FedAvg before FedBN
at each R, so that FedBN's first round, identical to FedAvg's, is reused). It writes:

- ``results/federated_eval.csv``: per replicate, method (``data_vector``, ``fedavg``, ``fedbn``),
  restore, rounds, ``sync_rounds`` (rounds every hospital takes part in: R; the data vector's one
  exchange plus one per restore pass, whose visits are sequential), ``sequential_visits``, bytes up
  and down per hospital, and the metrics on each hospital's test split and pooled. The data-vector
  rows are the run's own restore results (``restore_eval.csv``, every restore mode the run has), with
  the bytes that exchange sends (:func:`data_vector_bytes`), so that all share the axes;
- ``results/federated_predictions.csv.gz``: per-image predictions of the FedAvg/FedBN models;
- ``results/federated_log.csv``: bytes and seconds per job, round and hospital (the Flower ledger);
- ``results/federated_checks.csv``: the Flower exchange against the run's files (max |difference|).

Hospitals reuse identical results where :mod:`dvlib.studies.federated.hospital` says so (``reuse``).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict

import pandas as pd
import torch

from dvlib import restore
from dvlib.io import DvlibError, write_csv
from dvlib.progress import note
from dvlib.runs import Run

FED_METHODS = ("fedavg", "fedbn")
ROUNDS = (1, 2, 4, 8)
ROUNDS_BY_PRESET = {"smoke": (1, 2)}  # the smoke preset (CI) keeps to two; quick and paper take ROUNDS


def default_rounds(run: Run) -> tuple[int, ...]:
    """The R values a run compares when none are given: 1, 2, 4, 8 (1, 2 for the smoke preset)."""
    return ROUNDS_BY_PRESET.get(run.settings["preset"], ROUNDS)


def federated_jobs(methods: Sequence[str], rounds: Sequence[int], data_vector: bool = True) -> list[str]:
    """Job names in the order they run: the data vector, then FedAvg before FedBN at each R."""
    return (["data_vector"] if data_vector else []) + [f"{m}-{r}" for r in rounds for m in FED_METHODS if m in methods]


def federation_config(r, jobs: Sequence[str], restore_mode: str = "recalibrate", reuse: bool = True,
                      threads: int | None = None) -> dict:
    """The ServerApp's run config for replicate ``r`` (a :class:`dvlib.experiment.Replicate`)."""
    return {"jobs": " ".join(jobs), "restore": restore_mode, "settings": json.dumps(asdict(r.settings)),
            "classes": json.dumps(r.classes), "preset": r.run.settings["preset"], "train-seed": r.train_seed,
            "split-seed": r.split_seed, "lam": float(r.p.lam), "run-dir": str(r.run.dir.resolve()),
            "reuse": bool(reuse), "threads": int(threads or torch.get_num_threads()), "device": str(r.device),
            "warmup": True}


def data_vector_bytes(tau, state: dict, mode: str) -> dict:
    """What one hospital sends and receives in the data-vector exchange with restore ``mode``: its
    vector once; per restore pass the current model down and what the visit changed up (BatchNorm
    statistics for ``recalibrate``, everything for a training visit); the final model down."""
    from dvlib.studies.federated.records import state_bytes, vector_bytes
    from dvlib.vectors import BN_STAT, COUNTER, key_kinds

    kinds = key_kinds(state)
    full, bn = state_bytes(state), state_bytes(state, [k for k, kd in kinds.items() if kd in (BN_STAT, COUNTER)])
    visits = restore.get(mode).visits
    return {"sync_rounds": 1 + len(visits), "bytes_up_per_hospital": vector_bytes(tau) + sum(
        bn if v == "recalibrate" else full for v in visits), "bytes_down_per_hospital": full * (len(visits) + 1)}


def ledger_costs(ledger: pd.DataFrame) -> dict:
    """Bytes per hospital (mean over hospitals; they are equal for equal models) from a job's ledger."""
    per = ledger.groupby("site")[["up_bytes", "down_bytes"]].sum()
    return {"bytes_up_per_hospital": float(per["up_bytes"].mean()), "bytes_down_per_hospital": float(per["down_bytes"].mean())}


def _reused(ledger: pd.DataFrame) -> str:
    vals = set(ledger.get("reused", pd.Series(dtype=str)).fillna("").astype(str))
    kinds = sorted({"step 02 vector files" if v.endswith(".safetensors") else v for v in vals if v})
    return "; ".join(kinds)


def _max_diff(a: dict, b: dict) -> tuple[float, bool]:
    if list(a) != list(b):
        return math.inf, False
    d = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
    return d, all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _checks(r, res: dict, restore_mode: str) -> list[dict]:
    """The Flower data-vector exchange against the run's own merged (and restored) model files, and
    FedAvg R = 1 against the run's sample-weighted merge, when those files exist."""
    from dvlib.experiment.restoring import restored_tag
    from dvlib.files import load_model

    out = []
    pairs = [("data_vector merged == run's merged_data_vector", "data_vector", "merged", "merged_data_vector")]
    if restore.get(restore_mode).visits:
        pairs.append((f"data_vector restored == run's {restored_tag('data_vector', restore_mode)}", "data_vector",
                      "state", restored_tag("data_vector", restore_mode)))
    pairs.append(("fedavg-1 == run's merged_weighted (sample-weighted mean)", "fedavg-1", "state", "merged_weighted"))
    for name, job, key, tag in pairs:
        if job in res and r.path(tag).exists():
            diff, same = _max_diff(res[job][key], dict(load_model(r.path(tag)).state))
            out.append({**r.tags, "check": name, "max_abs_diff": diff, "bit_identical": same})
    return out


def _data_vector_rows(run: Run) -> list[dict]:
    """The run's own data-vector results (every restore mode it has), on the federated axes."""
    from dvlib.files import load_vector

    rs = run.read("restore_eval")
    rs = rs[rs["method"] == "data_vector"]
    if rs.empty:
        raise DvlibError(f"{run.result('restore_eval')}: no data-vector rows; run the restore step (notebook 04) first")
    rows = []
    for (s, t), g in rs.groupby(["split_seed", "train_seed"]):
        from dvlib.experiment import replicate

        r = replicate(run, int(s), int(t))
        tau = load_vector(r.path(f"hospital_{r.hospitals[0]}")).tau
        for mode, gm in g.groupby("restore"):
            cost = data_vector_bytes(tau, r.pretrained()[0], mode)
            visits = len(restore.get(mode).visits)
            for row in gm.to_dict("records"):
                rows.append({"split_seed": int(s), "train_seed": int(t), "method": "data_vector", "restore": mode,
                             "rounds": 1, **cost, "sequential_visits": visits * len(r.hospitals),
                             "source": "run's restore step (dvlib site restore)", "reused": "",
                             **{k: row[k] for k in ("eval_on", "n", "accuracy", "balanced_accuracy", "macro_f1",
                                                    "auc_ovr", "nonfinite_outputs", "confusion")}})
    return rows


def step_federated(run: Run, methods: Sequence[str] = FED_METHODS, rounds: Sequence[int] | None = None,
                   restore_mode: str = "recalibrate", reuse: bool = True, actors: int = 1,
                   log=note, raw: dict | None = None) -> pd.DataFrame:
    """FedAvg and FedBN at each R in ``rounds`` and the data-vector exchange, through Flower's
    simulation runtime, for every replicate; writes the four result files (module docstring).
    ``rounds``: the R values (each must divide the preset's epochs; default :func:`default_rounds`);
    ``restore_mode``: the data vector's restore in the Flower exchange (checked against the run's);
    ``actors``: hospitals training at once; ``raw`` receives {(split seed, training seed): {job:
    result}}, the ServerApp's results with the final weights (tests)."""
    from dvlib.experiment import replicate
    from dvlib.experiment.records import write_predictions
    from dvlib.studies.federated.evaluation import rows_from_parts
    from dvlib.studies.federated.simulation import simulate

    bad = [m for m in methods if m not in FED_METHODS]
    if bad:
        raise DvlibError(f"unknown federated methods {bad}; valid: {', '.join(FED_METHODS)}")
    rounds = [int(x) for x in (rounds or default_rounds(run))]
    epochs = run.preset.epochs
    if any(x < 1 or epochs % x for x in rounds):
        raise DvlibError(f"rounds {rounds}: each must divide the {epochs} local epochs (the same total per hospital)")
    restore.get(restore_mode)
    rows, preds, logs, checks = [], [], [], []
    with run.lock():
        dv_rows = _data_vector_rows(run)
        for s, t in run.replicates:
            r = replicate(run, s, t)
            jobs = federated_jobs(methods, rounds)
            log(f"federated (split {s}, train {t}): {' '.join(jobs)} over {len(r.hospitals)} hospitals")
            res = simulate(federation_config(r, jobs, restore_mode, reuse), len(r.hospitals), actors=actors,
                           gpus=1.0 / actors if r.device.type == "cuda" else 0.0)
            if raw is not None:
                raw[(s, t)] = res
            patient = r.manifest.set_index("image")["patient"]
            for job in jobs:
                out = res[job]
                ledger = pd.DataFrame(out["ledger"])
                logs += [{**r.tags, "job": job, "method": out["kind"], "rounds": out["rounds"], **row,
                          "job_seconds": out["seconds"]} for row in out["ledger"]]
                if out["kind"] == "data_vector":
                    continue
                ev, pr = rows_from_parts(out["evaluation"], r.classes)
                tags = {**r.tags, "method": out["kind"], "restore": "none", "rounds": out["rounds"]}
                cost = {"sync_rounds": out["rounds"], **ledger_costs(ledger), "sequential_visits": 0,
                        "source": "Flower simulation", "reused": _reused(ledger)}
                rows += [{**tags, **cost, **e} for e in ev]
                preds.append(pr.assign(**tags, patient=pr["image"].map(patient).to_numpy()))
            checks += _checks(r, res, restore_mode)
        keep = {(row["split_seed"], row["train_seed"]) for row in rows} or set(run.replicates)
        rows = [row for row in dv_rows if (row["split_seed"], row["train_seed"]) in keep] + rows
        table = pd.DataFrame(rows)
        write_csv(run.result("federated_eval"), table)
        write_csv(run.result("federated_log"), pd.DataFrame(logs))
        write_csv(run.result("federated_checks"), pd.DataFrame(checks))
        if preds:
            write_predictions(run.dir / "results" / "federated_predictions.csv.gz", preds)
    return table


def checks_text(run: Run, tolerance: float = 1e-6) -> str:
    """One line per check of ``federated_checks.csv``: whether every replicate is within ``tolerance``
    of the run's file (how far, and whether bit for bit, is in the file)."""
    c = run.read("federated_checks")
    return "\n".join(f"{name}: {'yes' if bool((g['max_abs_diff'] <= tolerance).all()) else 'NO'}"
                     for name, g in c.groupby("check", sort=False))


__all__ = [
    "FED_METHODS",
    "ROUNDS",
    "ROUNDS_BY_PRESET",
    "checks_text",
    "data_vector_bytes",
    "default_rounds",
    "federated_jobs",
    "federation_config",
    "ledger_costs",
    "step_federated",
]
