"""Invariant checks the notebooks print (and nbval compares): splits, merge formulas, BN statistics."""
from __future__ import annotations

import torch

from dvlib.experiment.session import replicate
from dvlib.files import load_model, load_vector
from dvlib.io import DvlibError
from dvlib.models import pretrained_body
from dvlib.runs import Run
from dvlib.split import load_manifest


def split_checks(run: Run) -> dict:
    """Per split seed: patient-disjoint, every image once, every class in every hospital's training split."""
    out = {}
    for s in run.split_seeds:
        m = load_manifest(run.manifest_path(s))
        spans = m.groupby("patient")[["hospital", "subset"]].nunique()
        train = m[m["subset"] == "train"]
        out[s] = {"patient_disjoint": bool((spans <= 1).all().all()),
                  "images_unique": bool(not m["image"].duplicated().any()),
                  "every_class_in_every_train_split": bool(all(set(g["label"]) == set(m["label"])
                                                               for _, g in train.groupby("hospital"))),
                  "hospitals": int(m["hospital"].nunique())}
    return out


def theta(run: Run, split_seed: int, train_seed: int) -> tuple[dict, list[dict]]:
    """(theta_pre, [theta_i]): the pretrained weights and each hospital's fine-tuned weights, as
    plain state dicts (pretrained keys; a hospital's = theta_pre + its vector file's tau)."""
    r = replicate(run, split_seed, train_seed)
    pre = pretrained_body(r.pretrained()[0])
    thetas = [load_vector(r.path(f"hospital_{h}")).tau.apply_to(pre) for h in r.hospitals]
    return pre, thetas


def verify_merge(run: Run, split_seed: int, train_seed: int, method: str = "data_vector") -> float:
    """Largest difference between the saved merged model and its formula recomputed with plain
    tensor arithmetic: ``theta_pre + lam * sum(theta_i - theta_pre)`` (data_vector) or
    ``mean(theta_i)`` (params_mean) for parameters, the mean of the heads."""
    pre, thetas = theta(run, split_seed, train_seed)
    mf = load_model(run.model_path(split_seed, train_seed, f"merged_{method}"))
    worst = 0.0
    for k, v in mf.state.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        if k.startswith("head.") or method == "params_mean":
            ref = torch.stack([t[k] for t in thetas]).mean(0)
        elif method == "data_vector":
            ref = pre[k] + mf.meta["lam"] * sum(t[k] - pre[k] for t in thetas)
        else:
            raise DvlibError(f"verify_merge knows data_vector and params_mean, not {method!r}")
        worst = max(worst, float((v - ref).abs().max()))
    return worst


def verify_recalibration(run: Run, split_seed: int, train_seed: int) -> float:
    """Largest difference between the BN statistics of the data-vector merge restored by visiting
    the hospitals in turn (the step's ``recalibrate``) and ``torch.optim.swa_utils.update_bn`` fed
    the same batches in one pass."""
    from torch.optim.swa_utils import update_bn

    from dvlib.loader import batches
    from dvlib.restore import BN_BATCH
    from dvlib.device import prepare

    r = replicate(run, split_seed, train_seed)
    ours = load_model(run.model_path(split_seed, train_seed, "restored_data_vector_recalibrate")).state
    merged = load_model(run.model_path(split_seed, train_seed, "merged_data_vector")).state
    ref = prepare(r.model_from(merged, shared=True), r.device)
    loader = [x for sh in r.train_shards() for x, _ in batches(sh.cache, sh.rows, None, BN_BATCH, r.p.image_size,
                                                               train=False, device=r.device,
                                                               channels_last=r.device.type == "cuda")]
    update_bn(loader, ref, device=r.device)
    theirs = ref.state_dict()
    return max(float((ours[k].float() - theirs[k].float().cpu()).abs().max()) for k in ours
               if k.endswith(("running_mean", "running_var")))
