"""The simulation, step by step: each step calls the stages a real hospital or coordinator runs
and writes one tidy results file (plus per-image predictions for paired statistics).

1. :func:`step_split`      hospitals by patient                         -> ``shards.csv``
2. :func:`step_finetune`   each hospital's ``dvlib site finetune``, and Full Training -> ``finetune_eval.csv``
3. :func:`step_merge`      the coordinator's ``dvlib merge``, every method -> ``merge_eval.csv``
   :func:`step_lambda`     the data-vector merge against lambda (descriptive) -> ``lambda_eval.csv``
   :func:`step_bn_policy`  what to do with BatchNorm buffers when merging   -> ``bn_policy_eval.csv``
4. :func:`step_restore`    each hospital's ``dvlib site restore``, in turn   -> ``restore_eval.csv``
                           (in :mod:`dvlib.experiment.restoring`)
5. :func:`step_similarity` Figure 2: layer-wise cosine to Full Training     -> ``layer_cosine.csv``

Every model is evaluated on each hospital's own test split (``eval_on`` = ``hospital_<i>``, the
paper's Part Index i) and on all test images together (``pooled``).

How each step writes its files, and the work log (``DVLIB_WORK_LOG``): :mod:`dvlib.experiment.records`.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from dvlib import models, provenance
from dvlib.methods import METHODS, run_lam
from dvlib.coordinator import merge_files
from dvlib.experiment.parallel import finetune_devices, run_parallel
from dvlib.experiment.records import save_results, work_logged
from dvlib.experiment.session import dataset_index, replicate
from dvlib.files import load_model, load_vector, save_vector
from dvlib.io import DvlibError, write_csv
from dvlib.merging import BN_MODES, merge
from dvlib.progress import note
from dvlib.runs import Run
from dvlib.site import finetune_site
from dvlib.split import load_manifest, make_split, save_manifest, shard_table
from dvlib.vectors import DataVector, key_kinds

ALL_METHODS = tuple(METHODS)
LAMBDAS = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 11))


def _body(state: dict) -> dict:
    return models.pretrained_body(state)


# --- 1. split -------------------------------------------------------------------------------------

@work_logged
def step_split(run: Run) -> pd.DataFrame:
    """Write each split seed's manifest once (reused afterwards); the shard table of all of them."""
    p = run.preset
    with run.lock():
        index = dataset_index(run)
        tables = []
        for s in run.split_seeds:
            path = run.manifest_path(s)
            if path.exists():
                manifest = load_manifest(path, index.classes)
                unknown = set(manifest["image"]) - set(index.records["image"])
                if unknown:
                    raise DvlibError(f"{path}: lists {len(unknown)} images the dataset no longer has, "
                                     f"e.g. {sorted(unknown)[0]!r}")
            else:  # non-IID hospitals may lack classes: that is the point; their weight is then 0
                manifest = make_split(index, p.n_hospitals, p.scheme, p.alpha, p.test_frac, seed=s,
                                      allow_missing_classes=p.scheme == "dirichlet", test_design=p.test_design)
                save_manifest(manifest, path)
            tables.append(shard_table(manifest, index.classes).assign(split_seed=s))
        table = pd.concat(tables, ignore_index=True)
        write_csv(run.result("shards"), table)
        provenance.record(run, "split", index=index)
    return table


# --- 2. fine-tune ----------------------------------------------------------------------------------

def finetune_targets(run: Run) -> list[str]:
    return [f"hospital_{h}" for h in range(1, run.preset.n_hospitals + 1)] + ["full"]


def finetune_one(run: Run, split_seed: int, train_seed: int, target: str, device: str = "auto",
                 progress: bool = False) -> float:
    """``dvlib site finetune`` for one simulated hospital (or Full Training); its vector file is
    written where the run keeps it. Returns the wall time in seconds."""
    t0 = time.perf_counter()
    r = replicate(run, split_seed, train_seed, device)
    tau, meta = finetune_site(r.target(target), r.settings, seed=r.seed(target), build_seed=train_seed,
                              device=r.device, progress=progress, model=r.pretrained_model(shared=True),
                              desc=f"{target} (split {split_seed}, train {train_seed})", preset=run.settings["preset"])
    save_vector(r.path(target), tau, {**meta, "model": target, "seconds": time.perf_counter() - t0})
    return time.perf_counter() - t0


@work_logged
def step_finetune(run: Run, targets: Iterable[str] | None = None, overwrite: bool = False,
                  progress: bool = False, devices: Sequence[str] | None = None, log=note) -> pd.DataFrame:
    """Fine-tune every hospital's model and Full Training (files that exist are kept unless
    ``overwrite``), then evaluate them all. With several ``devices`` the models train in parallel,
    one process per device, the largest first."""
    valid = finetune_targets(run)
    targets = list(targets) if targets is not None else valid
    bad = [t for t in targets if t not in valid]
    if bad:
        raise DvlibError(f"unknown fine-tuning targets {bad}; valid: {valid}")
    devs = finetune_devices(run.device, devices)
    with run.lock():
        train = {s: load_manifest(run.manifest_path(s)).query("subset == 'train'") for s in run.split_seeds}
        size = {(s, m): len(train[s]) if m == "full" else int((train[s]["hospital"] == int(m.split("_")[1])).sum())
                for s in run.split_seeds for m in targets}
        jobs = [(size[s, m], s, t, m) for s, t in run.replicates for m in targets
                if overwrite or not run.model_path(s, t, m).exists()]
        if len(devs) > 1 and len(jobs) > 1:
            run_parallel(_finetune_job, [(run, s, t, m) for _, s, t, m in sorted(jobs, key=lambda j: -j[0])], devs, log,
                         name=lambda job: f"split {job[1]} train {job[2]} {job[3]}")
        for i, (_, s, t, m) in enumerate(jobs if len(devs) == 1 or len(jobs) <= 1 else []):
            log(f"[{i + 1}/{len(jobs)}] split {s} train {t} {m}: {finetune_one(run, s, t, m, devs[0], progress):.1f} s")
        if jobs:
            provenance.record(run, "finetune", device=replicate(run, *run.replicates[0]).device)
        return finetune_table(run)


def _finetune_job(run, s, t, m, device):  # module level: picklable for the worker processes
    return finetune_one(run, s, t, m, device)


def finetune_table(run: Run) -> pd.DataFrame:
    """Evaluate every fine-tuned model present; ``finetune_eval.csv`` and ``finetune_history.csv``."""
    rows, preds, hist = [], [], []
    for s, t in run.replicates:
        r = replicate(run, s, t)
        pre = _body(r.pretrained()[0])
        for m in finetune_targets(run):
            if not r.path(m).exists():
                continue
            vf = load_vector(r.path(m))
            net = r.model_from(vf.tau.apply_to(pre), shared=True)
            ev, pr = r.evaluate(net, model=m, restore="none", lam=math.nan,
                                method="full_training" if m == "full" else "base_model")
            rows += ev
            preds.append(pr)
            hist += [{**r.tags, "model": m, **h} for h in vf.meta["history"]]
    table = save_results(run, "finetune_eval", rows, preds)
    if hist:
        write_csv(run.result("finetune_history"), pd.DataFrame(hist))
    return table


def _hospital_files(run: Run, s: int, t: int) -> list:
    paths = [run.model_path(s, t, f"hospital_{h}") for h in range(1, run.preset.n_hospitals + 1)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DvlibError(f"fine-tune the hospitals first (step finetune); missing: {missing}")
    return paths


# --- 3. merge ---------------------------------------------------------------------------------------

@work_logged
def step_merge(run: Run, methods: Sequence[str] = ALL_METHODS) -> pd.DataFrame:
    """``dvlib merge`` of the hospitals' files with every method (the run's lambda for the data-vector
    family, BN statistics averaged); each merged model evaluated as the coordinator wrote it."""
    rows, preds = [], []
    with run.lock():
        for s, t in run.replicates:
            r = replicate(run, s, t)
            for method in methods:
                note(f"merge {method} (split {s}, train {t})")
                lam = run_lam(method, run.preset.lam)
                out = r.path(f"merged_{method}")
                merge_files(_hospital_files(run, s, t), out, method=method, lam=lam, seed=t,
                            pretrained=r.pretrained_model(shared=True))
                net = r.model_from(load_model(out).state, shared=True)
                ev, pr = r.evaluate(net, model=f"merged_{method}", method=method, restore="none",
                                    lam=math.nan if lam is None else lam)
                rows += ev
                preds.append(pr)
        return save_results(run, "merge_eval", rows, preds)


def _taus(run: Run, s: int, t: int) -> list[DataVector]:
    return [load_vector(p).tau for p in _hospital_files(run, s, t)]


@work_logged
def step_lambda(run: Run, lambdas: Sequence[float] = LAMBDAS) -> pd.DataFrame:
    """``theta_pre + lam * sum(tau_i)`` against lam, no restore. Descriptive: evaluated on the test
    splits, so it must not be used to choose lambda."""
    rows = []
    with run.lock():
        for s, t in run.replicates:
            r = replicate(run, s, t)
            pre, taus = _body(r.pretrained()[0]), _taus(run, s, t)
            for lam in lambdas:
                state, _ = merge(pre, taus, "data_vector", lam=float(lam))
                rows += r.evaluate(r.model_from(state, shared=True), model="merged_data_vector",
                                   method="data_vector", restore="none", lam=float(lam))[0]
        return save_results(run, "lambda_eval", rows)


@work_logged
def step_bn_policy(run: Run, policies: Sequence[str] = BN_MODES) -> pd.DataFrame:
    """The data-vector merge with each BatchNorm-buffer policy (no restore), negative variances counted."""
    rows = []
    with run.lock():
        for s, t in run.replicates:
            r = replicate(run, s, t)
            pre, taus = _body(r.pretrained()[0]), _taus(run, s, t)
            for pol in policies:
                with warnings.catch_warnings():  # expected here: counted in the results, not printed
                    warnings.simplefilter("ignore", RuntimeWarning)
                    state, rep = merge(pre, taus, "data_vector", lam=run.preset.lam, bn_buffers=pol,
                                       allow_negative_var=True)
                ev, _ = r.evaluate(r.model_from(state, shared=True), model="merged_data_vector",
                                   method="data_vector", restore="none", lam=run.preset.lam)
                rows += [{**e, "bn_buffers": pol, "negative_var_layers": rep["negative_variance_layers"]} for e in ev]
        return save_results(run, "bn_policy_eval", rows)


# --- 5. similarity -------------------------------------------------------------------------------------

FIG2_MODELS = ("merged_data_vector", "merged_params_mean", "restored_data_vector_recalibrate",
               "restored_data_vector_finetune_epoch", "restored_params_mean_finetune_epoch")


@work_logged
def step_similarity(run: Run) -> pd.DataFrame:
    """Figure 2 data: per convolution layer (network order), the cosine similarity to Full Training's
    data vector of each hospital's and of the merged models' (before and after restore)."""
    rows = []
    for s, t in run.replicates:
        r = replicate(run, s, t)
        pre = _body(r.pretrained()[0])
        net = r.pretrained_model(shared=True)
        conv, kinds = net.conv_keys(), key_kinds(r.pretrained()[0], net)
        full = load_vector(r.path("full")).tau
        vectors = {f"hospital_{h}": load_vector(r.path(f"hospital_{h}")).tau for h in r.hospitals}
        for tag in FIG2_MODELS:
            if r.path(tag).exists():
                vectors[tag] = DataVector.between(load_model(r.path(tag)).state, pre, kinds)
        for tag, tau in vectors.items():
            cos, norms, ref_norms = tau.cosine(full, conv), tau.norms(), full.norms()
            rows += [{**r.tags, "model": tag, "layer_index": i, "layer": k, "cosine": cos[k], "norm": norms[k],
                      "reference_norm": ref_norms[k]} for i, k in enumerate(conv)]
    return save_results(run, "layer_cosine", rows)
