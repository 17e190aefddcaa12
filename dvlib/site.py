"""A hospital's side: fine-tune and export its data vector; restore a merged model; evaluate.

``dvlib site finetune`` is :func:`finetune_site` + :func:`dvlib.files.save_vector`, ``dvlib site
restore`` is :func:`restore_site`, ``dvlib evaluate --data`` is :func:`evaluate_sites`; the
simulation calls the same functions on its simulated hospitals (:mod:`dvlib.local`). What leaves a
hospital is the vector file: a data vector, a head, BatchNorm statistics and metadata (settings,
counts, local test metrics), never an image, a file name or a patient id. See docs/multi-site.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dvlib import models, restore, stages
from dvlib.checks import MAX_IMAGE_SIZE, distinct_outputs, fail, finite_number, integer, nonfinite_keys
from dvlib.coordinator import check_out, open_model
from dvlib.files import save_model
from dvlib.metadata import BUILTIN_WEIGHTS, VECTOR_KIND
from dvlib.io import DvlibError, all_or_nothing, check_writable, write_csv, write_json
from dvlib.local import LocalData
from dvlib.presets import PRESETS


def finetune_site(local: LocalData, settings: stages.TrainSettings, *, seed: int, build_seed: int = 0,
                  device="auto", progress: bool = False, model=None, desc: str | None = None,
                  preset: str | None = None):
    """Fine-tune on the site's training images and export the data vector; returns (tau, metadata).

    ``seed`` drives shuffling and augmentation, ``build_seed`` the new head (the same at every site).
    ``model``: the consortium's pretrained model to train in place (built from ``settings`` if None).
    """
    from dvlib.device import resolve_device

    dev = resolve_device(device)
    model = model if model is not None else stages.pretrained_model(settings, len(local.classes), build_seed)
    pre = models.pretrained_body(model.state_dict(), copy=True)
    train = local.shard("train", settings.image_size, dev)
    history = stages.finetune(model, train, settings, seed=seed, device=dev, progress=progress, desc=desc or local.label)
    rows, _ = stages.evaluate(model, [local.shard("test", settings.image_size, dev)], size=settings.image_size,
                              batch_size=settings.eval_batch_size, device=dev)
    tau = stages.export(model, pre)
    meta = {
        "kind": VECTOR_KIND, "site": local.label, "arch": settings.arch, "head": settings.head,
        "weights": settings.weights if settings.weights in BUILTIN_WEIGHTS else Path(settings.weights).name,
        "build_seed": int(build_seed), "classes": list(local.classes), "sample_count": len(train),
        "train_class_counts": local.class_counts("train"), "test_count": len(local.images("test")),
        "pretrained_sha256": model.pretrained_sha256, "image_size": int(settings.image_size),
        "hyperparameters": settings.hyperparameters(seed), "split": local.split,
        "metrics": {"split": "test", **{k: v for k, v in rows[0].items() if k not in ("eval_on", "confusion")}},
        "history": [{k: h[k] for k in ("epoch", "loss", "images")} for h in history], "preset": preset,
    }
    return tau, meta


FALLBACK = PRESETS["quick"]  # the training settings of a model file that records no sources


def _source_value(meta: dict, key: str, default):
    for s in meta.get("sources") or []:
        value = (s.get("hyperparameters") or {}).get(key)
        if value is not None:
            return value
    return default


def current_accumulation(visits: list[dict]) -> list[dict]:
    """The trailing run of ``recalibrate`` visits: those whose images the BN statistics average."""
    out: list[dict] = []
    for v in reversed(visits):
        if v.get("mode") != "recalibrate":
            break
        out.insert(0, v)
        if v.get("reset"):
            break
    return out


def check_split(meta: dict, local: LocalData, where) -> None:
    """A hospital's split is its own: refuse a model file that records another one for this site."""
    rec = meta.get("split")
    if rec is not None and rec != local.split:
        raise DvlibError(f"{where}: records the split {rec}, but site {local.label!r} splits its images as "
                         f"{local.split}; a model file never chooses a hospital's split (its test images could "
                         "be used): give this site's own --split-seed/--test-frac or --manifest")


def restored_meta(meta: dict, visits: list[dict]) -> dict:
    """The model's record after ``visits`` (the merged model's record, plus the visits)."""
    return {**{k: v for k, v in meta.items() if k not in ("format_version", "dvlib_version")}, "kind": "restored",
            "restore_visits": visits, "bn_images": sum(v["images"] for v in current_accumulation(visits))}


def restore_site(model_path: str | os.PathLike, local: LocalData, out: str | os.PathLike, *,
                 mode: str = "recalibrate", seed: int = 0, subset: str = "train", batch_size: int | None = None,
                 image_size: int | None = None, lr: float | None = None, device="auto",
                 allow_revisit: bool = False, progress: bool = False, model=None, meta: dict | None = None,
                 merged_sha256: str | None = None) -> dict:
    """One restore visit at this site (:func:`dvlib.restore.visit`); writes a model file recording
    every visit so far. ``recalibrate`` resets the statistics on the first visit (or the first after
    a training visit) and continues their cumulative average on later ones. ``model``/``meta``: the
    model already in memory (the simulation); otherwise it is read from ``model_path``. The model
    must be the merged one as earlier visits left it (:func:`dvlib.custody.verify`; ``merged_sha256``:
    the hash the coordinator announced), with no split other than this site's."""
    from dvlib import custody
    from dvlib.device import resolve_device

    if mode not in restore.VISITS:
        raise DvlibError(f"unknown restore visit {mode!r}; valid: {', '.join(restore.VISITS)}")
    if subset not in ("train", "all"):
        raise DvlibError(f"restore uses the 'train' or 'all' local images, not {subset!r}")
    out = check_out(out, [model_path], "the restored model") if out is not None else None
    if model is None:
        model, meta = open_model(model_path)
    if meta["kind"] == VECTOR_KIND:
        raise DvlibError(f"{model_path}: a site vector file; restore a merged model (`dvlib merge`)")
    if list(meta["classes"]) != list(local.classes):
        raise DvlibError(f"{local.label}: classes {local.classes} differ from the model's {meta['classes']}")
    where = model_path if model_path is not None else "the model"
    if subset != "all":
        check_split(meta, local, where)
    before = custody.key_sha256(model.state_dict())
    custody.verify(meta, model.state_dict(), str(where), expected=merged_sha256, digests=before)
    visits = list(meta.get("restore_visits") or [])
    reset = not visits or visits[-1].get("mode") != "recalibrate"
    if mode == "recalibrate" and not reset and not allow_revisit:
        current = [v["site"] for v in current_accumulation(visits)]
        if local.label in current:
            raise DvlibError(f"site {local.label!r} already contributed to these BatchNorm statistics (visits: "
                             f"{current}); its images would count twice. Use --allow-revisit only if this is other data")
    size = integer(image_size if image_size is not None else meta["image_size"], "image size", low=1,
                   high=MAX_IMAGE_SIZE)
    batch = integer(batch_size if batch_size is not None else restore.BN_BATCH if mode == "recalibrate"
                    else _source_value(meta, "batch_size", FALLBACK.batch_size),
                    "batch size", low=2)  # BatchNorm needs more than one image
    lr = finite_number(lr if lr is not None else _source_value(meta, "lr", FALLBACK.lr), "lr", low=0.0)
    dev = resolve_device(device)
    shard = local.shard(subset, size, dev)
    rec = restore.visit(model, mode, shard, index=len(visits), reset=reset, seed=integer(seed, "seed"), size=size,
                        batch_size=batch, lr=lr, num_classes=len(local.classes), device=dev, progress=progress)
    rec.update(subset=subset, split=local.split)
    bad = nonfinite_keys(model.state_dict())
    if bad:  # finite weights can still overflow on real images; such a model is never written
        fail([f"'{k}' holds {what}" for k, what in bad.items()],
             f"{model_path}: the {mode} visit at site {local.label!r} gives a model that is not finite; "
             "nothing was written")
    rec.update(custody.visit_record(before, model.state_dict(), mode))  # the next visit checks against it
    visits.append(rec)
    new = restored_meta(meta, visits)
    if out is not None:
        save_model(out, {k: v.detach().cpu() for k, v in model.state_dict().items()}, new)
    return new


def evaluate_sites(model_path: str | os.PathLike, locals_: Sequence[LocalData], *, subset: str = "all",
                   device="auto", batch_size: int = 128, image_size: int | None = None,
                   weights: str | None = None, weights_dirs=()) -> tuple[pd.DataFrame, dict]:
    """Metrics of a model (or a site's vector file) on each site's ``subset`` and pooled; returns a
    tidy table and a JSON-able record with the confusion matrices."""
    from dvlib.device import resolve_device

    if not locals_:
        raise DvlibError("evaluate: give at least one --data folder")
    labels = [d.label for d in locals_]
    if len(set(labels)) != len(labels):
        raise DvlibError(f"evaluate: data folders share a name {labels}; give folders with distinct names")
    model, meta = open_model(model_path, weights, weights_dirs)
    for d in locals_:
        if list(d.classes) != list(meta["classes"]):
            raise DvlibError(f"{d.label}: classes {d.classes} differ from the model's {meta['classes']}")
        if subset != "all":
            check_split(meta, d, model_path)
    size = integer(image_size if image_size is not None else meta["image_size"], "image size", low=1,
                   high=MAX_IMAGE_SIZE)
    batch_size = integer(batch_size, "batch size", low=1)
    dev = resolve_device(device)
    rows, _ = stages.evaluate(model, [d.shard(subset, size, dev) for d in locals_], size=size,
                              batch_size=batch_size, device=dev)
    name = Path(model_path).name
    table = pd.DataFrame([{"model": name, "subset": subset, **{k: v for k, v in r.items() if k != "confusion"}}
                          for r in rows])
    record = {"model": name, "model_kind": meta["kind"], "classes": meta["classes"], "subset": subset,
              "image_size": size, "splits": {d.label: d.split for d in locals_},
              "restore_visits": meta.get("restore_visits"),
              "results": [{**r, "confusion": json.loads(r["confusion"])} for r in rows]}
    return table, record


def evaluation_paths(prefix: str | os.PathLike) -> list[Path]:
    """What :func:`write_evaluation` writes for ``prefix``."""
    prefix = Path(prefix)
    if not prefix.name or prefix.name in (".", ".."):
        raise DvlibError(f"{prefix}: give an output prefix with a file name part, e.g. eval/merged")
    return [check_writable(prefix.with_name(prefix.name + s)) for s in (".eval.csv", ".eval.json", ".confusion.png")]


def write_evaluation(prefix: str | os.PathLike, table: pd.DataFrame, record: dict,
                     inputs: dict | None = None) -> list[Path]:
    """``<prefix>.eval.csv``, ``.eval.json`` and ``.confusion.png`` (pooled, or the only site): all
    three or none. ``inputs``: ``{what: path}`` the outputs must not replace."""
    from dvlib.reporting import plot_confusion

    paths = evaluation_paths(prefix)
    distinct_outputs({str(p): p for p in paths}, inputs or {})
    with all_or_nothing():
        write_csv(paths[0], table)
        write_json(paths[1], record)
        last = record["results"][-1]
        plot_confusion(np.asarray(last["confusion"]), record["classes"], paths[2],
                       title=f"{record['model']} on {last['eval_on']} ({record['subset']}, n={last['n']})")
    return paths


def format_metrics(m: dict) -> str:
    def f(x):
        return "nan" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"
    return (f"n={m['n']} accuracy={f(m['accuracy'])} balanced_accuracy={f(m['balanced_accuracy'])} "
            f"macro_f1={f(m['macro_f1'])} auc_ovr={f(m['auc_ovr'])}")


__all__ = [
    "check_split",
    "current_accumulation",
    "evaluate_sites",
    "evaluation_paths",
    "finetune_site",
    "format_metrics",
    "restore_site",
    "restored_meta",
    "write_evaluation",
]
