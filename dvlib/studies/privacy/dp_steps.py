"""Differentially private local fine-tuning (notebook 08, part 2): the method with DP-SGD hospitals.

:func:`step_dp` -> ``dp_eval.csv``, ``dp_audit.csv``, ``dp_history.csv``. Each hospital fine-tunes
with :func:`dvlib.studies.privacy.dp.fit_dp` at each epsilon, pretrained BatchNorm frozen, and exports its vector
file as ``dvlib site finetune`` does; the coordinator merges with ``dvlib.coordinator.merge_files``;
the merged and restored models are evaluated and attacked as in
:func:`dvlib.studies.privacy.audit.step_privacy_audit` (same scopes, same bootstrap draws).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from dvlib import models, restore, stages
from dvlib.coordinator import merge_files
from dvlib.studies.privacy.audit import _audit, _scopes, per_image_losses
from dvlib.experiment.session import Replicate, replicate
from dvlib.files import BUILTIN_WEIGHTS, VECTOR_KIND, load_model, load_vector, save_vector
from dvlib.io import DvlibError, write_csv
from dvlib.privacy_budget import check_epsilon, check_n_boot, check_run_delta, resolve_delta, weak_delta
from dvlib.progress import note
from dvlib.runs import Run
from dvlib.seeds import derive
from dvlib.site import restore_site

DP_EPSILONS = (1.0, 4.0, 8.0)
DP_RESTORES = ("none", "recalibrate", "finetune_epoch")
DP_GUARANTEED_RESTORES = ("none",)  # the restores after which the merged model is still (epsilon, delta)-DP


def dp_dir(run: Run, split_seed: int, train_seed: int, epsilon: float, trainable: str,
           delta: float | None = None) -> Path:
    """Where the DP models of one epsilon and trainable variant go: ``models/dp_eps<e>_<variant>/``
    (``dp_eps<e>_delta<d>_<variant>/`` for a delta given instead of the default 1/n)."""
    from dvlib.studies.privacy.dp import trainable_label

    budget = f"eps{float(epsilon):g}" + ("" if delta is None else f"_delta{float(delta):g}")
    return run.model_path(split_seed, train_seed, "x").parent / f"dp_{budget}_{trainable_label(trainable)}"


def finetune_dp_one(r: Replicate, hospital: int, epsilon: float, trainable="all_but_bn", *,
                    max_grad_norm: float = 1.0, class_weight: str = "local", grad_sampler: str = "dvlib",
                    preset: str | None = None, delta: float | None = None) -> tuple:
    """``dvlib site finetune`` with DP-SGD for one simulated hospital: :func:`dvlib.studies.privacy.dp.fit_dp` with
    the run's settings (epochs, batch size, lr, image size) from the pretrained model, to
    (``epsilon``, ``delta``)-DP (default delta 1/n); returns (tau, metadata, history). The metadata is
    a site vector file's (as :func:`dvlib.site.finetune_site` writes it) with ``dp``: the target and the epsilon the
    accountant computes, delta, noise multiplier, steps, sample rate, clipping norm, accountant,
    trainable parameters, and the most images one patient has in the training split (the guarantee
    is per image: a patient with k images is protected at k * epsilon by group privacy).

    ``class_weight``: ``"local"`` (inverse class frequencies of the hospital's training labels, as
    the non-private training) or ``"uniform"``. Local weights and the label counts and sample count
    in the metadata are computed from the private data outside DP-SGD, as is the test-split metrics'
    (test patients are not in training): a strict guarantee publishes neither counts nor weights.
    """
    from dvlib.studies.privacy.dp import fit_dp, resolve_trainable, trainable_label
    from dvlib.train import class_weights

    if class_weight not in ("local", "uniform"):
        raise DvlibError(f"class_weight must be 'local' or 'uniform', got {class_weight!r}")
    settings = r.settings
    if settings.weight_decay:
        raise DvlibError(f"fit_dp has no weight decay; the run trains with weight_decay={settings.weight_decay}")
    target = f"hospital_{hospital}"
    seed = derive(r.train_seed, f"dp{float(epsilon)}", target)
    local = r.local(hospital)
    model = r.pretrained_model(shared=True)
    pre = models.pretrained_body(model.state_dict(), copy=True)
    train = local.shard("train", settings.image_size, r.device)
    if len(train) < settings.batch_size:
        raise DvlibError(f"{target}: {len(train)} training images, fewer than the batch size {settings.batch_size}")
    cw = class_weights(train.labels.numpy(), model.num_classes, allow_missing=True) if class_weight == "local" else None
    t0 = time.perf_counter()
    history = fit_dp(model, train.cache, train.rows, train.labels, epochs=settings.epochs,
                     batch_size=settings.batch_size, lr=settings.lr, size=settings.image_size, seed=seed,
                     target_epsilon=float(epsilon), delta=delta, max_grad_norm=max_grad_norm, class_weight=cw,
                     trainable=resolve_trainable(trainable, settings.arch), device=r.device, grad_sampler=grad_sampler)
    seconds = time.perf_counter() - t0
    rows, _ = stages.evaluate(model, [local.shard("test", settings.image_size, r.device)], size=settings.image_size,
                              batch_size=settings.eval_batch_size, device=r.device)
    tau = stages.export(model, pre)
    last = history[-1]
    per_patient = local.manifest[local.manifest["subset"] == "train"].groupby("patient").size()
    hyper = {**settings.hyperparameters(seed), "optimizer": "adam on DP-SGD gradients",
             "loss": "weighted_cross_entropy" if class_weight == "local" else "cross_entropy"}
    meta = {
        "kind": VECTOR_KIND, "site": local.label, "arch": settings.arch, "head": settings.head,
        "weights": settings.weights if settings.weights in BUILTIN_WEIGHTS else Path(settings.weights).name,
        "build_seed": int(r.train_seed), "classes": list(local.classes), "sample_count": len(train),
        "train_class_counts": local.class_counts("train"), "test_count": len(local.images("test")),
        "pretrained_sha256": model.pretrained_sha256, "image_size": int(settings.image_size),
        "hyperparameters": hyper, "split": local.split,
        "metrics": {"split": "test", **{k: v for k, v in rows[0].items() if k not in ("eval_on", "confusion")}},
        "history": [{k: h[k] for k in ("epoch", "loss", "images", "epsilon", "seconds", "empty_batches")}
                    for h in history], "preset": preset,
        "model": target, "seconds": seconds,
        "dp": {"target_epsilon": float(epsilon), "epsilon": float(last["epsilon"]), "delta": float(last["delta"]),
               "noise_multiplier": float(last["noise_multiplier"]), "sample_rate": float(last["sample_rate"]),
               "steps": int(last["steps"]) * len(history), "steps_per_epoch": int(last["steps"]),
               "max_grad_norm": float(max_grad_norm), "accountant": last["accountant"],
               "trainable": trainable_label(trainable), "grad_sampler": grad_sampler,
               "batchnorm": "frozen: pretrained running statistics and affine parameters, eval mode",
               "class_weight": class_weight, "unit": "image",
               "max_images_per_patient": int(per_patient.max()) if len(per_patient) else 0},
    }
    return tau, meta, history


def _dp_file(r: Replicate, run: Run, h: int, eps: float, trainable, overwrite: bool, kw: dict, log) -> tuple:
    """The DP vector file of hospital h (trained unless it exists with the same settings)."""
    from dvlib.studies.privacy.dp import trainable_label

    path = dp_dir(run, r.split_seed, r.train_seed, eps, trainable, kw["delta"]) / f"hospital_{h}.dv.safetensors"
    if path.exists() and not overwrite:
        vf = load_vector(path)
        dp = vf.meta.get("dp") or {}
        want = {"target_epsilon": float(eps), "trainable": trainable_label(trainable),
                "max_grad_norm": float(kw["max_grad_norm"]), "class_weight": kw["class_weight"],
                "delta": resolve_delta(kw["delta"], len(r.local(h).images("train")))}
        got = {k: dp.get(k) for k in want}
        if got != want or vf.meta["hyperparameters"].get("seed") != derive(r.train_seed, f"dp{float(eps)}", f"hospital_{h}"):
            raise DvlibError(f"{path}: made with {got}, not {want}; pass overwrite=True to train it again")
        return path, vf.meta
    tau, meta, _ = finetune_dp_one(r, h, eps, trainable, preset=run.settings.get("preset"), **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_vector(path, tau, meta)
    log(f"DP eps={eps:g} hospital_{h} (split {r.split_seed}, train {r.train_seed}): epsilon {meta['dp']['epsilon']:.3f}, "
        f"sigma {meta['dp']['noise_multiplier']:.3f}, {meta['seconds']:.0f} s")
    return path, meta


def step_dp(run: Run, epsilons: Sequence[float] = DP_EPSILONS, trainable="all_but_bn", *,
            delta: float | None = None, restores: Sequence[str] = DP_RESTORES, n_boot: int = 1000,
            max_grad_norm: float = 1.0,
            class_weight: str = "local", train_seeds: Sequence[int] | None = None, overwrite: bool = False,
            log=note) -> pd.DataFrame:
    """The method with differentially private local fine-tuning, at each of ``epsilons``.

    Each hospital fine-tunes with :func:`dvlib.studies.privacy.dp.fit_dp` (DP-SGD, the run's settings, seed
    ``derive(train_seed, f"dp{eps}", "hospital_<i>")``, ``delta`` or by default 1/n with n its
    training images, pretrained BatchNorm frozen) and writes a site vector file (``models/dp_eps<e>_<variant>/``, kept
    and reused unless ``overwrite``; its metadata's ``dp`` records what the accountant computed). The
    coordinator merges them with ``dvlib.coordinator.merge_files`` (data_vector, the run's lambda),
    then each of ``restores`` is applied as the hospitals run it; every model is evaluated on the
    test splits and attacked as in :func:`step_privacy_audit`.

    **Which models keep the guarantee.** Each hospital's DP vector is (epsilon, delta)-DP for its
    training images, and the merge only post-processes vectors of disjoint patients, so the merged
    model before any restore (``none``) is (epsilon, delta)-DP for every image (the largest epsilon
    and delta of the hospitals). BatchNorm is frozen, so these models carry the *pretrained*
    statistics: ``none`` is the honest DP restore. ``recalibrate`` computes BatchNorm statistics
    from the hospitals' training images and ``finetune_epoch`` trains a non-private epoch at each
    hospital: both are outside the guarantee (``dp_guarantee`` = False in the results). The
    guarantee is per image, not per patient (group privacy: k images of one patient, k * epsilon).

    ``trainable``: ``"all_but_bn"`` (every parameter outside BatchNorm, the default),
    ``"last_stages"`` (:data:`dvlib.studies.privacy.dp.LAST_STAGES`: the last blocks, the pretrained classifier and
    the head: the nearest cheaper variant, as fast as non-private training on a CPU) or ``"head"``.
    ``delta``: every hospital's (default 1/n, n its training images); the whole budget (``epsilons``
    finite and > 0, ``delta`` below :data:`dvlib.privacy_budget.DELTA_FACTOR` / n at every hospital,
    ``n_boot``) is checked before the first hospital trains, and a delta of 1/n or more is logged as weak.
    ``class_weight``: see :func:`finetune_dp_one`. ``train_seeds``: the training seeds (of every
    split seed) to run, default all of the run's; e.g. ``[run.train_seeds[0]]``: one replicate per split.

    Cost on 2 CPU cores, quick preset (4 hospitals of ~245 training images, 8 epochs, 128 px): see
    the module docs of :mod:`dvlib.studies.privacy.dp` and the measurements reported with notebook 08. Writes
    ``results/dp_eval.csv`` (metrics per model, restore, test split), ``results/dp_audit.csv``
    (as ``privacy_audit.csv``, with epsilon, restore and ``dp_guarantee``) and
    ``results/dp_history.csv`` (per epoch: loss, epsilon spent so far, seconds); returns dp_eval.
    """
    from dvlib.studies.privacy.dp import trainable_label

    for m in restores:
        restore.get(m)
    # the whole budget is checked before the first hospital trains, not at the epsilon it concerns
    epsilons = [check_epsilon(e, "epsilons") for e in epsilons]
    n_boot = check_n_boot(n_boot)
    kw = {"max_grad_norm": float(max_grad_norm), "class_weight": class_weight, "delta": delta}
    variant = trainable_label(trainable)
    ev_rows, audit_rows, hist_rows = [], [], []
    bad = sorted(set(train_seeds or ()) - set(run.train_seeds))
    if bad:
        raise DvlibError(f"training seeds {bad} are not the run's ({run.train_seeds})")
    reps = [(s, t) for s, t in run.replicates if train_seeds is None or t in train_seeds]
    counts = check_run_delta(run, delta, split_seeds={s for s, _ in reps})
    weak = {k: n for k, n in counts.items() if weak_delta(1.0 / n if delta is None else delta, n)}
    if weak:
        log(f"DP delta {'1/n (the default)' if delta is None else f'{delta:g}'} is at least 1/n at {len(weak)} "
            "hospital(s): weak, the usual advice is delta well below 1/n (e.g. delta=1e-5)")
    with run.lock():
        for s, t in reps:
            r = replicate(run, s, t)
            reference = per_image_losses(r, r.pretrained_model(shared=True))
            for eps in epsilons:
                common = {"epsilon": eps, "trainable": variant}
                paths, metas = [], []
                for h in r.hospitals:
                    path, meta = _dp_file(r, run, h, eps, trainable, overwrite, kw, log)
                    paths.append(path)
                    metas.append(meta)
                    dp = meta["dp"]
                    hist_rows += [{**r.tags, **common, "model": f"hospital_{h}", **row,
                                   "noise_multiplier": dp["noise_multiplier"], "delta": dp["delta"]}
                                  for row in meta["history"]]
                    info = {**common, "epsilon_spent": dp["epsilon"], "delta": dp["delta"],
                            "noise_multiplier": dp["noise_multiplier"],
                            "max_images_per_patient": dp["max_images_per_patient"], "restore": "none",
                            "dp_guarantee": True}
                    net = r.model_from(load_vector(path).tau.apply_to(
                        models.pretrained_body(r.pretrained()[0])), shared=True)
                    frame, rows = per_image_losses(r, net, [h], eval_rows=True)
                    ev_rows += [{**r.tags, "model": f"hospital_{h}", **info, **e} for e in rows]
                    audit_rows += _audit(r, f"hospital_{h}", frame, reference, [f"hospital_{h}"], n_boot, **info)[0]
                merged_path = dp_dir(run, s, t, eps, trainable, delta) / "merged_data_vector.safetensors"
                mm = merge_files(paths, merged_path, method="data_vector", lam=run.preset.lam, seed=t,
                                 pretrained=r.pretrained_model(shared=True))
                merged_state = load_model(merged_path).state
                spent = {"epsilon_spent": max(m["dp"]["epsilon"] for m in metas),
                         "delta": max(m["dp"]["delta"] for m in metas), "noise_multiplier": math.nan,
                         "max_images_per_patient": max(m["dp"]["max_images_per_patient"] for m in metas)}
                for mode in restores:
                    model, m = r.model_from(merged_state, shared=True), mm
                    for what in restore.get(mode).visits:
                        for h in r.hospitals:
                            m = restore_site(None, r.local(h), None, mode=what, seed=t, model=model, meta=m,
                                             device=r.device)
                    tag = "merged_data_vector" if mode == "none" else f"restored_data_vector_{mode.replace('+', '_')}"
                    info = {**common, **spent, "restore": mode, "dp_guarantee": mode in DP_GUARANTEED_RESTORES}
                    frame, rows = per_image_losses(r, model, eval_rows=True)
                    ev_rows += [{**r.tags, "model": tag, **info, **e} for e in rows]
                    scopes, _ = _scopes(r, tag)
                    audit_rows += _audit(r, tag, frame, reference, scopes, n_boot, **info)[0]
                log(f"DP eps={eps:g} (split {s}, train {t}): merged and restored ({', '.join(restores)})")
        table = pd.DataFrame(ev_rows)
        write_csv(run.result("dp_eval"), table)
        write_csv(run.result("dp_audit"), pd.DataFrame(audit_rows))
        write_csv(run.result("dp_history"), pd.DataFrame(hist_rows))
    return table


def dp_file_summary(run: Run) -> pd.DataFrame:
    """What the DP vector files of a run record (one row per file): the target epsilon, the epsilon
    the accountant computes from the recorded noise, sample rate and steps, and the recorded one."""
    from dvlib.studies.privacy.dp import epsilon as accountant_epsilon

    rows = []
    for s, t in run.replicates:
        folder = run.model_path(s, t, "x").parent
        for p in sorted(folder.glob("dp_eps*/hospital_*.dv.safetensors")):
            vf = load_vector(p)
            dp = vf.meta["dp"]
            rows.append({"split_seed": s, "train_seed": t, "folder": p.parent.name, "model": vf.meta["model"],
                         "target_epsilon": dp["target_epsilon"], "epsilon": dp["epsilon"],
                         "accountant_epsilon": accountant_epsilon(dp["noise_multiplier"], dp["sample_rate"],
                                                                  dp["steps"], dp["delta"], dp["accountant"]),
                         "delta": dp["delta"], "noise_multiplier": dp["noise_multiplier"], "steps": dp["steps"],
                         "trainable": dp["trainable"], "max_images_per_patient": dp["max_images_per_patient"],
                         "seconds": vf.meta.get("seconds")})
    return pd.DataFrame(rows)


__all__ = ["DP_EPSILONS", "DP_RESTORES", "DP_GUARANTEED_RESTORES", "dp_dir", "finetune_dp_one", "step_dp",
           "dp_file_summary"]
