"""Step 4 of the simulation: each restore mode applied to each merged model (and to the bare
pretrained model, which shows what the restore alone does) as the hospitals run it, ``dvlib site
restore`` at hospital 1, then 2, ... on their training images -> ``restore_eval.csv``, ``restore_log.csv``.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import pandas as pd

from dvlib import device as hw  # DVLIB_PLAIN
from dvlib import restore
from dvlib.experiment.records import save_results, work_logged
from dvlib.experiment.session import Replicate, replicate
from dvlib.files import load_model, save_model
from dvlib.methods import METHODS, run_lam
from dvlib.progress import note
from dvlib.runs import Run
from dvlib.site import restore_site

SAVED_RESTORES = ("data_vector", "params_mean")  # kept on disk: Figure 2 and the command-line check use them


def restored_tag(method: str, mode: str) -> str:
    return f"restored_{method}_{mode.replace('+', '_')}"


def visit_hospitals(r: Replicate, model, visit: str, meta: dict, progress: bool = False) -> dict:
    """One round of restore visits: ``visit`` at every hospital in turn, on ``model`` in place; returns
    the model's metadata after it."""
    for h in r.hospitals:
        meta = restore_site(None, r.local(h), None, mode=visit, seed=r.train_seed, model=model, meta=meta,
                            device=r.device, progress=progress)
    return meta


def restored_models(r: Replicate, state: dict, meta: dict, modes: Sequence[str], label: str,
                    progress: bool = False) -> Iterator[tuple[str, object, dict]]:
    """(mode, model, metadata) for each of ``modes`` applied to ``state``, one after another in the
    replicate's shared network (each model is overwritten by the next one).

    A mode that begins with rounds already done for an earlier mode goes on from their model: the same
    visits from the same model give the same result, so ``recalibrate+finetune_epoch`` continues from
    ``recalibrate``'s model instead of recalibrating again. Not in the plain path (``DVLIB_PLAIN=1``),
    where each mode starts from ``state``."""
    todo = [(mode, restore.get(mode).visits) for mode in modes]
    after = {(): (state, meta)}  # rounds done -> (weights, metadata) after them, kept for a later mode
    for i, (mode, rounds) in enumerate(todo):
        note(f"restore {label} with {mode} (split {r.split_seed}, train {r.train_seed})")
        start = max(len(done) for done in after if rounds[:len(done)] == done)
        weights, m = after[rounds[:start]]
        model = r.model_from(weights, shared=True)
        for n in range(start + 1, len(rounds) + 1):
            m = visit_hospitals(r, model, rounds[n - 1], m, progress)
            if not hw.plain() and any(later[:n] == rounds[:n] for _, later in todo[i + 1:]):
                after[rounds[:n]] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, m)
        yield mode, model, m


def restore_source(r: Replicate, method: str) -> tuple[dict, dict]:
    """(weights, metadata) a restore starts from: the coordinator's merged file, or the bare pretrained model."""
    if method == "pretrained":
        return r.pretrained()[0], {"kind": "model", "classes": r.classes, "image_size": r.p.image_size,
                                   "restore_visits": [],
                                   "sources": [{"hyperparameters": r.settings.hyperparameters(r.train_seed)}]}
    mf = load_model(r.path(f"merged_{method}"))
    return mf.state, mf.meta


@work_logged
def step_restore(run: Run, methods: Sequence[str] = ("pretrained",) + tuple(METHODS),
                 modes: Sequence[str] = tuple(restore.MODES), finetune_methods: Sequence[str] | None = None,
                 progress: bool = False) -> pd.DataFrame:
    """Each restore mode applied to each merged model and to the pretrained one (:func:`restored_models`);
    ``finetune_methods`` limits the training modes to some methods. ``none`` evaluates the merged
    file as it is."""
    rows, preds, logs = [], [], []
    with run.lock():
        for s, t in run.replicates:
            r = replicate(run, s, t)
            for method in methods:
                todo = [mode for mode in modes
                        if not (restore.get(mode).uses_labels and finetune_methods and method not in finetune_methods)]
                lam = run_lam(method, run.preset.lam) if method != "pretrained" else None
                for mode, model, m in restored_models(r, *restore_source(r, method), todo, method, progress):
                    tag = restored_tag(method, mode)
                    if mode != "none" and method in SAVED_RESTORES:
                        save_model(r.path(tag), {k: v.detach().cpu() for k, v in model.state_dict().items()}, m)
                    ev, pr = r.evaluate(model, model=tag, method=method, restore=mode,
                                        lam=math.nan if lam is None else lam)
                    rows += ev
                    preds.append(pr)
                    logs += [{**r.tags, "method": method, "restore": mode,
                              **{k: x for k, x in visit.items() if k != "split"}} for visit in m["restore_visits"]]
        save_results(run, "restore_log", logs)
        return save_results(run, "restore_eval", rows, preds)
