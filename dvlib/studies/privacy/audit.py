"""The privacy audit (notebook 08): what the released models say about the hospitals' patients.

1. :func:`step_privacy_audit` -> ``privacy_audit.csv``, ``privacy_roc.csv.gz``: membership inference
   (:mod:`dvlib.studies.privacy.attack`) on every model a run released.
2. :func:`dvlib.studies.privacy.dp_steps.step_dp` -> ``dp_eval.csv``, ``dp_audit.csv``, ``dp_history.csv``:
   the same method with differentially private local fine-tuning (:func:`dvlib.studies.privacy.dp.fit_dp`), its
   accuracy and the same attacks.

**Members and non-members.** A model's members are the images it was trained on, its non-members
patient-disjoint held-out images of the same distribution: the test splits. Each audit has a *scope*:

- ``pooled``: the union of the hospitals' training images against all test images (for the models
  that learnt from every hospital: Full Training, the merges, the restored merges, FedAvg);
- ``hospital_<i>``: hospital i's training images against hospital i's test images (every model that
  saw hospital i's training images; a hospital's own model is audited on its own scope only).

**Attacks**, from per-image losses ``loss = -log p_true`` (``dvlib.stages.evaluate``'s probability
of the true class; centre crops, as a user of the model would query it), no shadow models:

- ``loss`` (Yeom et al. 2018): ``score = -loss``;
- ``reference`` (Watson et al. 2022): ``score = loss_ref - loss`` with the pretrained model as the
  reference, which saw neither members nor non-members. Its new head is random (seeded by the
  training seed, the same at every hospital), so the reference calibrates only what the backbone's
  features and that fixed head make of an image.

**Sanity check**: the pretrained model itself is audited too. It never saw any of these images, so
its loss-attack AUC must be about 0.5 (an interval containing 0.5); its reference attack is the
model against itself, every score 0, AUC 0.5 exactly.

Every number is an estimate with a bootstrap percentile interval over patients (members and
non-members resampled separately, whole patients at a time); the resamples are the same for every
model and attack of a scope (seed from the replicate and the scope), so models are compared on the
same draws. With n non-members the lowest FPR that can be observed is 1/n (``min_fpr``): below it,
"TPR at FPR x" is the TPR at zero false positives.

Cost (2 CPU cores, quick preset): the audit predicts every training and test image once per model;
DP fine-tuning costs what :mod:`dvlib.studies.privacy.dp` says.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd

from dvlib import stages
from dvlib.studies.privacy import attack as privacy
from dvlib.experiment.session import Replicate, replicate
from dvlib.files import load_model, load_vector
from dvlib.io import DvlibError, atomic_path, write_csv
from dvlib.models import pretrained_body
from dvlib.privacy_budget import check_n_boot
from dvlib.progress import note
from dvlib.runs import Run
from dvlib.seeds import derive

ATTACKS = ("loss", "reference")
ATTACK_LABELS = {"loss": "loss threshold (Yeom et al. 2018): score = -loss",
                 "reference": "reference-calibrated (Watson et al. 2022): score = loss_pretrained - loss"}
# the models step_privacy_audit looks for, in table order; a hospital's own model is hospital_<i>
UNION_MODELS = ("full", "merged_params_mean", "merged_data_vector", "restored_data_vector_recalibrate",
                "restored_data_vector_finetune_epoch")
FEDERATED_GLOB = "fedavg*.safetensors"  # Flower FedAvg model files in a replicate's models folder
CURVE_POINTS = 200


# --- per-image losses --------------------------------------------------------------------------------

def per_image_losses(r: Replicate, net, hospitals: Sequence[int] | None = None,
                     eval_rows: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, list[dict]]:
    """One row per training and test image of ``hospitals`` (default: all): hospital, subset
    (``train``: a member), member, image, patient, label, pred, p_true and ``loss = -log p_true``.

    These are :func:`dvlib.stages.evaluate`'s per-image rows: its two parts (``predict_shards``, then
    ``score``) are called here so that train and test images are predicted in one pass. With
    ``eval_rows`` also every test split's (and the pooled) metrics, as ``Replicate.evaluate`` gives
    them (every hospital's test split is predicted then, for the metrics).
    """
    hospitals = list(r.hospitals if hospitals is None else hospitals)
    size, dev = r.p.image_size, r.device
    train = [r.local(h).shard("train", size, dev) for h in hospitals]
    test_h = r.hospitals if eval_rows else hospitals
    test = [r.local(h).shard("test", size, dev) for h in test_h]
    probs = stages.predict_shards(net, train + test, size=size, batch_size=r.p.eval_batch_size, device=dev)
    patient = r.manifest.set_index("image")["patient"]
    frames = []
    for subset, hs, shards, ps in (("train", hospitals, train, probs[:len(train)]),
                                   ("test", test_h, test, probs[len(train):])):
        _, preds = stages.score(shards, ps, net.num_classes, pooled=False)
        for h, sh, p in zip(hs, shards, ps):
            if subset == "test" and h not in hospitals:
                continue
            part = preds[preds["eval_on"] == sh.name]
            frames.append(pd.DataFrame({
                "hospital": h, "eval_on": sh.name, "subset": subset, "member": subset == "train",
                "image": part["image"].to_numpy(), "patient": part["image"].map(patient).to_numpy(),
                "label": part["label"].to_numpy(), "pred": part["pred"].to_numpy(),
                "p_true": part["p_true"].to_numpy(np.float64),
                "loss": privacy.loss_from_p_true(part["p_true"].to_numpy())}))
    frame = pd.concat(frames, ignore_index=True)
    if not eval_rows:
        return frame
    rows, _ = stages.score(test, probs[len(train):], net.num_classes)
    return frame, rows


def audit_seed(r: Replicate, scope: str) -> int:
    """The bootstrap seed of a scope in a replicate: the same for every model and attack."""
    return derive(r.train_seed, "privacy_audit", r.split_seed, scope)


def scope_mask(frame: pd.DataFrame, scope: str) -> np.ndarray:
    """The rows of ``frame`` (from :func:`per_image_losses`) that a scope audits."""
    if scope == "pooled":
        return np.ones(len(frame), dtype=bool)
    if not scope.startswith("hospital_"):
        raise DvlibError(f"unknown scope {scope!r}: pooled or hospital_<i>")
    return (frame["eval_on"] == scope).to_numpy()


def attack_scores(frame: pd.DataFrame, reference: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every attack's scores for the rows of ``frame``; ``reference``: the pretrained model's rows."""
    ref = reference.set_index("image")["loss"].reindex(frame["image"]).to_numpy()
    if np.isnan(ref).any():
        raise DvlibError("the reference losses lack some of the audited images")
    loss = frame["loss"].to_numpy()
    return {"loss": privacy.loss_attack(loss), "reference": privacy.reference_attack(loss, ref)}


def _audit(r: Replicate, model: str, frame: pd.DataFrame, reference: pd.DataFrame, scopes: Sequence[str],
           n_boot: int, curve_scope: str | None = None, **tags) -> tuple[list[dict], list[pd.DataFrame]]:
    rows, curves = [], []
    scores = attack_scores(frame, reference)
    for scope in scopes:
        m = scope_mask(frame, scope)
        part = frame[m]
        member = part["member"].to_numpy()
        correct = (part["pred"] == part["label"]).to_numpy()
        extra = {"train_accuracy": float(correct[member].mean()), "test_accuracy": float(correct[~member].mean()),
                 "train_loss": float(part["loss"][member].mean()), "test_loss": float(part["loss"][~member].mean())}
        for attack in ATTACKS:
            s = scores[attack][m]
            a = privacy.audit(s, member, groups=part["patient"].to_numpy(), n_boot=n_boot, seed=audit_seed(r, scope))
            (row,) = privacy.audit_rows({(model, attack): a})
            rows.append({**r.tags, **tags, "model": model, "attack": attack, "scope": scope,
                         **{k: v for k, v in row.items() if k not in ("model", "attack")}, **extra})
            if scope == curve_scope:
                fpr, tpr, _ = privacy.roc_curve(s, member)
                fpr, tpr = privacy.thin_roc(fpr, tpr, CURVE_POINTS)
                curves.append(pd.DataFrame({**r.tags, **tags, "model": model, "attack": attack, "scope": scope,
                                            "fpr": fpr, "tpr": tpr}))
    return rows, curves


def write_curves(path, frames: list[pd.DataFrame]) -> None:
    """ROC curves, gzipped CSV (byte-stable: no time stamp)."""
    with atomic_path(path, suffix=".csv.gz") as tmp:
        pd.concat(frames, ignore_index=True).round({"fpr": 6, "tpr": 6}).to_csv(
            tmp, index=False, compression={"method": "gzip", "mtime": 0})


# --- 1. the audit of the released models --------------------------------------------------------------

def audited_models(run: Run, split_seed: int, train_seed: int) -> list[str]:
    """The models of a replicate on disk, in table order: pretrained, each hospital's own model,
    Full Training, Params Mean, the data-vector merge before restore, after BN recalibration, after
    the restore epoch, and any Flower FedAvg model file (``models/fedavg*.safetensors``)."""
    r = replicate(run, split_seed, train_seed)
    tags = ["pretrained"] + [f"hospital_{h}" for h in r.hospitals] + list(UNION_MODELS)
    folder = r.path("x").parent
    tags += sorted(p.name.removesuffix(".safetensors") for p in folder.glob(FEDERATED_GLOB))
    return [t for t in tags if t == "pretrained" or r.path(t).exists()]


def _state(r: Replicate, tag: str) -> dict:
    if tag == "pretrained":
        return r.pretrained()[0]
    if tag.startswith("hospital_") or tag == "full":
        pre = pretrained_body(r.pretrained()[0])
        return load_vector(r.path(tag)).tau.apply_to(pre)
    return load_model(r.path(tag)).state


def _scopes(r: Replicate, tag: str) -> tuple[list[str], str]:
    """(scopes, the scope whose ROC curve is kept) of a model."""
    if tag.startswith("hospital_"):
        return [tag], tag
    return ["pooled"] + [f"hospital_{h}" for h in r.hospitals], "pooled"


def step_privacy_audit(run: Run, n_boot: int = 1000, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Membership inference on every released model of every replicate (``models``: the tags to
    audit, default :func:`audited_models`; a tag given whose file is missing is an error).

    Writes ``results/privacy_audit.csv`` (split_seed, train_seed, model, attack, scope, auc,
    auc_low, auc_high, tpr@1% and tpr@0.1% with their intervals, min_fpr, n_members, n_nonmembers,
    member/non-member patients, n_boot, confidence, and the scope's train/test accuracy and mean
    loss) and ``results/privacy_roc.csv.gz`` (each model's curves in its own scope, pooled for
    models trained on every hospital, thinned to at most :data:`CURVE_POINTS` vertices).
    """
    n_boot = check_n_boot(n_boot)  # before hours of evaluation, not at the first audit
    rows, curves = [], []
    with run.lock():
        for s, t in run.replicates:
            r = replicate(run, s, t)
            tags = audited_models(run, s, t) if models is None else list(models)
            missing = [m for m in tags if m != "pretrained" and not r.path(m).exists()]
            if missing:
                raise DvlibError(f"split {s} train {t}: no model files for {missing} ({r.path(missing[0])}); run the "
                                 "steps that write them first (notebooks 02-04)")
            t0 = time.perf_counter()
            reference = per_image_losses(r, r.pretrained_model(shared=True))
            for tag in tags:
                scopes, curve_scope = _scopes(r, tag)
                hospitals = [int(tag.split("_")[1])] if tag.startswith("hospital_") else None
                frame = reference if tag == "pretrained" else per_image_losses(r, r.model_from(_state(r, tag), shared=True), hospitals)
                got, cur = _audit(r, tag, frame, reference, scopes, n_boot, curve_scope)
                rows += got
                curves += cur
            note(f"privacy audit (split {s}, train {t}): {len(tags)} models in {time.perf_counter() - t0:.0f} s")
        table = pd.DataFrame(rows)
        write_csv(run.result("privacy_audit"), table)
        write_curves(run.dir / "results" / "privacy_roc.csv.gz", curves)
    return table


__all__ = ["ATTACKS", "ATTACK_LABELS", "UNION_MODELS", "per_image_losses", "audit_seed", "scope_mask", "attack_scores",
           "audited_models", "step_privacy_audit"]
