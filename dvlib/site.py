"""A real multi-site workflow: hospitals export data-vector files, a coordinator merges them.

Four steps, each run where the data (or the files) are; see ``docs/multi-site.md``:

1. :func:`finetune_site` (at each hospital): fine-tune the shared pretrained network on the local
   images (its own patient-disjoint train/test split, :func:`dvlib.split.make_split` with one
   hospital) and write a *vector file* (:func:`dvlib.vectors.save_vector`) that holds only the data
   vector ``tau = theta_site - theta_pre``, the new head, the BatchNorm buffers and metadata (arch,
   head mode, classes in order, training sample count, sha256 of the pretrained weights, the weights
   spec, hyperparameters, dvlib version, image size, metrics on the local test split). No images, no
   file names, no patient ids.
2. :func:`merge_sites` (at the coordinator): check the files can be merged (all problems reported at
   once), rebuild ``theta_pre`` from the metadata and refuse it unless its sha256 matches, merge
   (``theta_pre + lam * sum(tau_i)``, heads averaged, for the paper's ``data_vector``) and write a
   model checkpoint (:func:`dvlib.checkpoint.save_checkpoint`) with ``restore_visits: []``.
3. :func:`restore_site` (at each hospital in turn): label-free BatchNorm recalibration that
   *accumulates across visits*: the first visit resets the running statistics, later visits continue
   the cumulative average (``momentum=None``, the count of batches seen so far kept in each layer's
   ``num_batches_tracked``), so visiting A then B gives the statistics that
   :func:`dvlib.bn.recalibrate_bn` computes over A's and B's batches in one process. Every visit is
   recorded (site label, mode, images, batches). ``finetune_epoch`` (one labelled epoch, the paper's
   restore) is offered too.
4. :func:`evaluate_folders`: metrics (JSON + CSV) and a confusion-matrix PNG on one or more folders.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from dvlib import models
from dvlib.bn import bn_modules, recalibrate_bn
from dvlib.io import DvlibError, atomic_path, sha256_file, write_csv, write_json

__all__ = ["SiteData", "open_site", "finetune_site", "load_vectors", "rebuild_pretrained", "merge_sites",
           "load_model", "accumulate_bn", "restore_site", "evaluate_folders", "plot_confusion",
           "RESTORE_MODES", "SPLITS"]

RESTORE_MODES = ("recalibrate", "finetune_epoch")
SPLITS = ("all", "train", "test")
DEFAULT_SPLIT = {"seed": 0, "test_frac": 0.2}
BUILTIN_WEIGHTS = ("imagenet", "random")


# --------------------------------------------------------------------------------------- local data

@dataclass
class SiteData:
    """A hospital's local images: dataset index, its own one-hospital split, and the site label."""

    label: str
    index: Any  # dvlib.data.base.DatasetIndex
    manifest: pd.DataFrame  # image, patient, label, hospital (0), subset (train/test)
    split_seed: int
    test_frac: float

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    def images(self, split: str) -> list[str]:
        """Image ids of ``split`` (``all``, ``train`` or ``test``), sorted (fixed batch composition)."""
        if split not in SPLITS:
            raise DvlibError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        m = self.manifest if split == "all" else self.manifest[self.manifest["subset"] == split]
        return sorted(m["image"])

    def labels(self, images: Sequence[str]) -> torch.Tensor:
        cid = {c: i for i, c in enumerate(self.classes)}
        lab = self.manifest.set_index("image").loc[list(images), "label"].map(cid)
        return torch.tensor(lab.to_numpy(), dtype=torch.long)

    def shard(self, split: str, size: int, device, cache=None):
        """A :class:`dvlib.loader.Shard` of ``split`` (builds the image cache unless given)."""
        from dvlib.loader import ImageCache, Shard, cache_size_for

        images = self.images(split)
        if not images:
            raise DvlibError(f"{self.label}: the {split!r} split of the local data is empty "
                             f"({len(self.manifest)} images, test_frac={self.test_frac}, seed={self.split_seed})")
        if cache is None:
            cache = ImageCache.build(self.index, images, cache_size_for(size), device=device)
        return Shard(self.label, cache, cache.rows(images), self.labels(images))


def _site_label(data: str, index, site: str | None) -> str:
    label = site if site else (Path(data).name if Path(data).is_dir() else index.name)
    if not label or "/" in label or "\\" in label:
        raise DvlibError(f"invalid site label {label!r}: give --site NAME (letters, digits, '-', '_')")
    return label


def open_site(data: str, *, seed: int = 0, test_frac: float = 0.2, site: str | None = None,
              strict_classes: bool = True, classes: Sequence[str] | None = None,
              source: str = "--classes") -> SiteData:
    """Index the local data (a folder with one sub-folder per class, or a registered dataset name)
    and split it patient-disjointly into train/test (one hospital, ``seed``, ``test_frac``).

    ``classes``: the class list the sites agreed on, in order (``source`` names where it came from, for
    errors); the local classes must be among them, and a class without local images is allowed (its
    output is still trained, on other classes' images only). Default: the local classes.
    ``strict_classes`` (without ``classes``): every local class must have training images."""
    from dataclasses import replace

    from dvlib.data import load_dataset
    from dvlib.split import make_split

    data = str(data)
    if Path(data).is_dir() and not any(Path(data).iterdir()):
        raise DvlibError(f"{data}: the site folder is empty (expected one sub-folder per class holding images)")
    index = load_dataset(data)
    if len(index) == 0:
        raise DvlibError(f"{data}: no images found")
    if classes is not None:
        classes = [str(c) for c in classes]
        dup = sorted({c for c in classes if classes.count(c) > 1})
        if dup or len(classes) < 2:
            raise DvlibError(f"{source}: needs at least 2 distinct classes, got {classes}")
        extra = [c for c in index.classes if c not in classes]
        if extra:
            raise DvlibError(f"{data}: local classes {extra} are not among {source} {classes}")
        index = replace(index, classes=classes)
        strict_classes = False
    try:
        manifest = make_split(index, n_hospitals=1, test_frac=test_frac, seed=seed,
                              allow_missing_classes=not strict_classes)
    except DvlibError as e:
        raise DvlibError(f"{data}: cannot split the local data: {e}") from e
    return SiteData(_site_label(data, index, site), index, manifest, int(seed), float(test_frac))


def _check_out(out: str | os.PathLike, what: str) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise DvlibError(f"{out}: {what} must end in .safetensors")
    return out


# ------------------------------------------------------------------------------------ 1. finetune

def finetune_site(data: str, out: str | os.PathLike, *, preset: str = "quick", site: str | None = None,
                  device: str = "auto", progress: bool = False, classes: Sequence[str] | None = None,
                  **overrides) -> dict:
    """Fine-tune on the local data and write the site's vector file; returns its metadata.

    ``classes``: the class list every site agreed on (see :func:`open_site`), so that a site without
    images of some class still produces a vector file that merges with the others.

    ``overrides``: preset fields (``arch``, ``weights``, ``head``, ``image_size``, ``epochs``,
    ``batch_size``, ``lr``, ``seed``, ``test_frac``, ``weight_decay``); ``None`` values are ignored.
    The seed drives the local split, the (seeded) model build and training.
    """
    from dvlib.presets import get_preset
    from dvlib.train import class_weights, compute_metrics, fit, predict, resolve_device
    from dvlib.vectors import BN_STAT, COUNTER, HEAD, data_vector, key_kinds, keys_of

    out = _check_out(out, "the vector file")
    p = get_preset(preset, **{k: v for k, v in overrides.items() if v is not None})
    dev = resolve_device(device)
    sd = open_site(data, seed=p.seed, test_frac=p.test_frac, site=site, classes=classes)
    from dvlib.loader import ImageCache, cache_size_for

    cache = ImageCache.build(sd.index, sd.images("all"), cache_size_for(p.image_size), device=dev)
    train, test = sd.shard("train", p.image_size, dev, cache), sd.shard("test", p.image_size, dev, cache)
    model = models.build(p.arch, len(sd.classes), weights=p.weights, head=p.head, seed=p.seed)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cw = class_weights(train.labels.numpy(), len(sd.classes), allow_missing=classes is not None)
    history = fit(model, cache, train.rows, train.labels, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                  size=p.image_size, seed=p.seed, device=dev, weight_decay=p.weight_decay, class_weight=cw,
                  progress=progress, desc=f"site {sd.label}")
    probs = predict(model, cache, test.rows, size=p.image_size, batch_size=p.eval_batch_size, device=dev)
    metrics = compute_metrics(test.labels.numpy(), probs, sd.classes)
    ft = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kinds = key_kinds(ft, model)
    tau = data_vector(ft, pre, kinds)
    head = {k: ft[k] for k in keys_of(kinds, HEAD)}
    bn = {k: ft[k] for k in keys_of(kinds, BN_STAT, COUNTER)}
    weights_spec = p.weights if p.weights in BUILTIN_WEIGHTS else Path(p.weights).name
    train_counts = np.bincount(train.labels.numpy(), minlength=len(sd.classes))
    meta = {
        "kind": "site_vector",
        "site": sd.label,
        "arch": p.arch,
        "head": p.head,
        "weights": weights_spec,
        "build_seed": int(p.seed),
        "classes": sd.classes,
        "sample_count": int(len(train)),
        "train_class_counts": {c: int(n) for c, n in zip(sd.classes, train_counts)},
        "test_count": int(len(test)),
        "pretrained_sha256": model.pretrained_sha256,
        "image_size": int(p.image_size),
        "preset": p.name,
        "hyperparameters": {"epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr,
                            "weight_decay": p.weight_decay, "seed": p.seed, "image_size": p.image_size,
                            "optimizer": "adam", "loss": "weighted_cross_entropy"},
        "split": {"seed": sd.split_seed, "test_frac": sd.test_frac},
        "metrics": {"split": "test", **metrics},
        "history": [{k: h[k] for k in ("epoch", "loss", "images")} for h in history],
    }
    _save_loadable(out, tau, head, bn, meta)
    return meta


def _save_loadable(out: Path, tau, head, bn, meta: dict) -> None:
    """Write the vector file and read it back once, so a site never sends a file the coordinator refuses."""
    from dvlib.vectors import load_vector, save_vector

    save_vector(out, tau, head, bn, meta)
    try:
        load_vector(out)
    except DvlibError:
        out.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------- 2. merge

def load_vectors(paths: Sequence[str | os.PathLike]) -> list:
    """Load every vector file; raise one :class:`DvlibError` listing all files that cannot be read
    and, among those that can, every reason they cannot be merged (:func:`check_mergeable`)."""
    from dvlib.vectors import check_mergeable, load_vector

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise DvlibError(f"need at least 2 site vector files to merge, got {len(paths)}: "
                         f"{[str(p) for p in paths]}")
    dup = sorted({str(p) for p in paths if sum(q.resolve() == p.resolve() for q in paths) > 1})
    problems = [f"{d}: given more than once" for d in dup]
    vfs = []
    for p in paths:
        try:
            vfs.append(load_vector(p))
        except DvlibError as e:
            problems += _lines(e)
    for vf in vfs:
        for k in ("head", "weights", "build_seed"):
            if k not in vf.meta:
                problems.append(f"{vf.path}: metadata lacks '{k}' (not written by `dvlib site finetune`?)")
    if len(vfs) >= 2:
        try:
            check_mergeable(vfs)
        except DvlibError as e:
            problems += _lines(e)
        ref = vfs[0]
        for vf in vfs[1:]:
            for k in ("head", "image_size"):
                if vf.meta.get(k) != ref.meta.get(k):
                    problems.append(f"{vf.path}: {k} {vf.meta.get(k)!r} differs from {ref.path} ({ref.meta.get(k)!r})")
    if problems:
        raise DvlibError(f"cannot merge {len(paths)} vector files:\n  - " + "\n  - ".join(problems))
    return vfs


def _lines(e: Exception) -> list[str]:
    """The problems listed in a multi-line error ("header:\n  - a\n  - b"), or the message itself."""
    lines = str(e).splitlines()
    if len(lines) == 1:
        return lines
    return [ln.strip()[2:] if ln.strip().startswith("- ") else ln.strip() for ln in lines[1:] if ln.strip()]


def _resolve_weights(spec: str, override: str | None, search: Iterable[Path]) -> str:
    if override:
        return override
    if spec in BUILTIN_WEIGHTS:
        return spec
    for d in [Path.cwd(), *search]:
        if (d / spec).is_file():
            return str(d / spec)
    raise DvlibError(f"the sites were fine-tuned from the weights file {spec!r}, which is not in the current "
                     "folder or next to the vector files; pass --weights PATH (the same pretrained weights)")


def rebuild_pretrained(meta: dict, weights: str | None = None, where: Sequence[Path] = ()) -> models.DVNet:
    """Rebuild the sites' pretrained model from vector-file metadata (arch, classes, head, weights
    spec, build seed) and refuse it unless its sha256 is the one the sites recorded."""
    spec = _resolve_weights(str(meta.get("weights", "")), weights, where)
    model = models.build(meta["arch"], len(meta["classes"]), weights=spec, head=meta.get("head", "append"),
                         seed=int(meta.get("build_seed", 0)))
    if model.pretrained_sha256 != meta["pretrained_sha256"]:
        hint = "" if weights else " Pass --weights PATH to the exact pretrained weights the sites used."
        raise DvlibError(f"rebuilt pretrained weights (arch={meta['arch']}, weights={spec!r}, "
                         f"seed={meta.get('build_seed', 0)}) have sha256 {model.pretrained_sha256}, but the "
                         f"vector files were fine-tuned from {meta['pretrained_sha256']}.{hint}")
    return model


def merge_sites(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, method: str = "data_vector",
                lam: float = 0.5, bn_buffers: str = "mean", weights: str | None = None, seed: int = 0,
                **opts) -> dict:
    """Merge site vector files into a model checkpoint; returns its metadata.

    The fine-tuned state dicts ``theta_pre + tau_i`` (with each site's head and BN buffers) are
    rebuilt and merged by :func:`dvlib.merging.merge`: for ``data_vector`` the result is
    ``theta_pre + lam * sum(tau_i)``, heads averaged, BN buffers per ``bn_buffers``. ``weights``
    overrides the pretrained weights spec; method ``weighted`` uses the sites' sample counts.
    """
    from dvlib.checkpoint import save_checkpoint
    from dvlib.merging import METHODS, merge
    from dvlib.vectors import finetuned_state_dict, key_kinds

    out = _check_out(out, "the merged checkpoint")
    if method not in METHODS:
        raise DvlibError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    vfs = load_vectors(paths)
    ref = vfs[0]
    model = rebuild_pretrained(ref.meta, weights, sorted({vf.path.resolve().parent for vf in vfs}))
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kinds = key_kinds(pre, model)
    fts = [finetuned_state_dict(pre, vf) for vf in vfs]
    counts = [vf.sample_count for vf in vfs]
    report: dict = {}
    try:
        merged = merge(pre, fts, method=method, lam=lam, bn_buffers=bn_buffers, seed=seed,
                       weights=counts if method == "weighted" else None, kinds=kinds,
                       names=[str(vf.path) for vf in vfs], report=report, **opts)
    except DvlibError as e:
        if "negative running_var" in str(e):
            raise DvlibError(f"{e}\n(with dvlib merge: --bn-buffers mean or pretrained, then `dvlib site restore`)") from None
        raise
    try:
        model.load_state_dict(merged, strict=True)
    except RuntimeError as e:  # pragma: no cover - merge keeps the keys and shapes
        raise DvlibError(f"merged state dict does not fit {ref.meta['arch']}: {e}") from e
    splits = {json.dumps(vf.meta.get("split", DEFAULT_SPLIT), sort_keys=True) for vf in vfs}
    meta = {
        "kind": "merged",
        "arch": ref.meta["arch"],
        "head": ref.meta["head"],
        "weights": ref.meta["weights"] if not weights else
        (weights if weights in BUILTIN_WEIGHTS else Path(weights).name),
        "build_seed": ref.meta["build_seed"],
        "classes": ref.classes,
        "pretrained_sha256": ref.meta["pretrained_sha256"],
        "image_size": ref.meta.get("image_size"),
        "method": method,
        "lam": float(lam),
        "bn_buffers": bn_buffers,
        "seed": int(seed),
        "options": dict(opts),
        "sample_counts": counts,
        "sources": [{"file": vf.path.name, "sha256": sha256_file(vf.path), "site": vf.meta.get("site"),
                     "sample_count": vf.sample_count, "metrics": vf.meta.get("metrics"),
                     "hyperparameters": vf.meta.get("hyperparameters")} for vf in vfs],
        # the sites' common split settings, so `site restore` / `evaluate --split` reuse them
        "split": json.loads(splits.pop()) if len(splits) == 1 else None,
        # exact zeros are legitimate (dead channels of the pretrained network); recorded for the reader
        "zero_variance_layers": sorted(k for k, v in merged.items() if k.endswith("running_var") and v.numel()
                                       and float(v.min()) == 0.0),
        "restore_visits": [],
        "warnings": merge_warnings(vfs),
    }
    save_checkpoint(out, merged, meta)
    return meta


def merge_warnings(vfs) -> list[str]:
    """What differs between mergeable vector files without making the merge wrong, but that a reader
    of the result should know: other dvlib versions, other training settings at different sites."""
    out = []
    versions = {vf.path.name: vf.meta.get("dvlib_version") for vf in vfs}
    if len(set(versions.values())) > 1:
        out.append("written by different dvlib versions: " + ", ".join(f"{f} {v}" for f, v in versions.items()))
    for k in ("epochs", "lr", "batch_size", "weight_decay", "optimizer", "loss"):
        vals = {vf.path.name: (vf.meta.get("hyperparameters") or {}).get(k) for vf in vfs}
        if len({json.dumps(v) for v in vals.values()}) > 1:
            out.append(f"sites trained with different {k}: " + ", ".join(f"{f} {v}" for f, v in vals.items()))
    return out


# ------------------------------------------------------------------------------------ models

def _is_vector_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("dvlib")
            names = list(f.keys())
    except Exception:
        return False
    if raw is None:
        return False
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return False
    return isinstance(meta, dict) and "format_version" in meta and any(n.startswith("vector/") for n in names)


def load_model(path: str | os.PathLike, weights: str | None = None) -> tuple[models.DVNet, dict]:
    """A model and its metadata from a checkpoint (merged or restored) or from a site vector file
    (rebuilt on the pretrained weights, which must match the recorded sha256)."""
    from dvlib.checkpoint import load_checkpoint
    from dvlib.vectors import finetuned_state_dict, load_vector

    path = Path(path)
    if not path.is_file():
        raise DvlibError(f"{path}: model file not found")
    if path.suffix == ".safetensors" and _is_vector_file(path):
        vf = load_vector(path)
        model = rebuild_pretrained(vf.meta, weights, [path.resolve().parent])
        state = finetuned_state_dict(model.state_dict(), vf)
        meta = dict(vf.meta)
    else:
        state, meta = load_checkpoint(path)
        missing = [k for k in ("arch", "classes") if k not in meta]
        if missing:
            raise DvlibError(f"{path}: checkpoint metadata lacks {missing}")
        model = models.build(meta["arch"], len(meta["classes"]), weights="random", head=meta.get("head", "append"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DvlibError(f"{path}: tensors do not fit {meta['arch']} (head {meta.get('head', 'append')!r}, "
                         f"{len(meta['classes'])} classes): {e}") from e
    model.eval()
    return model, meta


def _split_settings(meta: dict, seed: int | None, test_frac: float | None) -> tuple[int, float]:
    rec = meta.get("split") or DEFAULT_SPLIT
    return (int(seed if seed is not None else rec.get("seed", DEFAULT_SPLIT["seed"])),
            float(test_frac if test_frac is not None else rec.get("test_frac", DEFAULT_SPLIT["test_frac"])))


# ---------------------------------------------------------------------------------- 3. restore

def accumulate_bn(model: nn.Module, images: Iterable[torch.Tensor], *, reset: bool) -> tuple[int, int]:
    """Add ``images`` (batches) to the model's BatchNorm running statistics, in place.

    Cumulative average per batch (``momentum=None``), continuing from ``num_batches_tracked`` unless
    ``reset`` (see :func:`dvlib.bn.recalibrate_bn`, which does the work). Returns (images, batches) seen.
    """
    if not bn_modules(model):
        return 0, 0
    seen = {"batches": 0}

    def counted():
        for x in images:
            seen["batches"] += 1
            yield x

    (n,) = recalibrate_bn(model, [counted()], reset=reset)
    return n, seen["batches"]


def restore_site(model_path: str | os.PathLike, data: str, out: str | os.PathLike, *, mode: str = "recalibrate",
                 site: str | None = None, split: str = "train", split_seed: int | None = None,
                 test_frac: float | None = None, batch_size: int = 64, image_size: int | None = None,
                 lr: float | None = None, device: str = "auto", allow_revisit: bool = False,
                 progress: bool = False) -> dict:
    """One restore visit at a hospital; writes a checkpoint recording every visit so far.

    ``recalibrate`` accumulates BatchNorm statistics (images only) across visits: the first visit (or
    the first after a ``finetune_epoch`` visit, which changes the weights) starts afresh; later ones
    continue the cumulative average. ``split``: which local images (``train`` by default, so the
    local test split stays unseen; the split settings default to those the sites recorded).
    """
    from dvlib.checkpoint import save_checkpoint
    from dvlib.loader import batches
    from dvlib.train import prepare, resolve_device

    if mode not in RESTORE_MODES:
        raise DvlibError(f"unknown restore mode {mode!r}; valid: {', '.join(RESTORE_MODES)}")
    if split not in ("all", "train"):
        raise DvlibError(f"restore uses the 'train' or 'all' local images, not {split!r}")
    if isinstance(batch_size, bool) or batch_size < 2:
        raise DvlibError(f"batch_size must be >= 2 (BatchNorm needs more than one image), got {batch_size}")
    out = _check_out(out, "the restored checkpoint")
    model, meta = load_model(model_path)
    if meta.get("kind") == "site_vector":
        raise DvlibError(f"{model_path}: a site vector file; restore a merged checkpoint (`dvlib merge`)")
    visits = list(meta.get("restore_visits") or [])
    seed, frac = _split_settings(meta, split_seed, test_frac)
    sd = open_site(data, seed=seed, test_frac=frac, site=site, classes=meta["classes"],
                   source=f"the classes of {model_path}")
    size = int(image_size or meta.get("image_size") or 0)
    if size <= 0:
        raise DvlibError(f"{model_path}: no image_size in its metadata; pass --image-size")
    dev = resolve_device(device)
    reset = not visits or visits[-1].get("mode") != "recalibrate"
    if mode == "recalibrate" and not reset and not allow_revisit:
        current = [v["site"] for v in _current_accumulation(visits)]
        if sd.label in current:
            raise DvlibError(f"site {sd.label!r} already contributed to these BatchNorm statistics "
                             f"(visits: {current}); its images would count twice. Use another --site "
                             "label only if this is other data, or --allow-revisit")
    shard = sd.shard(split, size, dev)
    prepare(model, dev)
    visit: dict[str, Any] = {"site": sd.label, "mode": mode, "split": split, "images": int(len(shard))}
    if mode == "recalibrate":
        xs = (x for x, _ in batches(shard.cache, shard.rows, None, batch_size, size, train=False, device=dev,
                                    channels_last=dev.type == "cuda"))
        n, b = accumulate_bn(model, xs, reset=reset)
        visit.update(batches=b, batch_size=int(batch_size), reset=bool(reset))
    else:
        from dvlib.restore import finetune_epoch

        lr = float(lr if lr is not None else _source_value(meta, "lr", 2e-4))
        hist = finetune_epoch(model, [shard], size=size, batch_size=batch_size, lr=lr,
                              seed=seed + len(visits), epochs=1, num_classes=len(sd.classes), device=dev,
                              progress=progress)
        visit.update(lr=lr, batch_size=int(batch_size), loss=float(hist[-1]["loss"]) if hist else None)
    visit["split_seed"], visit["test_frac"], visit["image_size"] = seed, frac, size
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    new_meta = {k: v for k, v in meta.items() if k != "dvlib_version"}
    new_meta.update(kind="restored", restore_visits=visits + [visit],
                    bn_images=sum(v["images"] for v in _current_accumulation(visits + [visit])))
    save_checkpoint(out, state, new_meta)
    return new_meta


def _current_accumulation(visits: list[dict]) -> list[dict]:
    """The trailing run of ``recalibrate`` visits (those whose images the BN statistics average)."""
    out: list[dict] = []
    for v in reversed(visits):
        if v.get("mode") != "recalibrate":
            break
        out.insert(0, v)
        if v.get("reset"):
            break
    return out


def _source_value(meta: dict, key: str, default):
    for s in meta.get("sources") or []:
        hp = s.get("hyperparameters") or {}
        if key in hp:
            return hp[key]
    return default


# --------------------------------------------------------------------------------- 4. evaluate

def plot_confusion(confusion, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """A confusion-matrix PNG (rows: true class, columns: predicted), written atomically (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(confusion, dtype=float)
    k = len(classes)
    fig = Figure(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def evaluate_folders(model_path: str | os.PathLike, datas: Sequence[str], *, split: str = "all",
                     split_seed: int | None = None, test_frac: float | None = None,
                     image_size: int | None = None, batch_size: int = 128, device: str = "auto",
                     out: str | os.PathLike | None = None, weights: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Evaluate a model on each data folder (``split``: ``all`` images, or the site's own ``test`` /
    ``train`` split, reproduced from the split settings the sites recorded) and on all of them
    together (``pooled``, with more than one folder). Writes ``<out>.eval.json``, ``<out>.eval.csv``
    and ``<out>.confusion.png`` (pooled, or the only folder). Returns (table, JSON record)."""
    from dvlib.train import compute_metrics, predict, resolve_device

    if split not in SPLITS:
        raise DvlibError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not datas:
        raise DvlibError("evaluate: give at least one --data folder")
    model_path = Path(model_path)
    model, meta = load_model(model_path, weights)
    seed, frac = _split_settings(meta, split_seed, test_frac)
    size = int(image_size or meta.get("image_size") or 0)
    if size <= 0:
        raise DvlibError(f"{model_path}: no image_size in its metadata; pass --image-size")
    dev = resolve_device(device)
    sites = [open_site(d, seed=seed, test_frac=frac, classes=meta["classes"], source=f"the classes of {model_path}")
             for d in datas]
    labels = [s.label for s in sites]
    if len(set(labels)) != len(labels):
        raise DvlibError(f"evaluate: data folders share a name {labels}; give folders with distinct names")
    classes = list(meta["classes"])
    ys, ps, rows, results = [], [], [], []
    name = model_path.name
    for s in sites:
        shard = s.shard(split, size, dev)
        probs = predict(model, shard.cache, shard.rows, size=size, batch_size=batch_size, device=dev)
        ys.append(shard.labels.numpy())
        ps.append(probs)
    parts = list(zip(labels, ys, ps))
    if len(sites) > 1:
        parts.append(("pooled", np.concatenate(ys), np.concatenate(ps)))
    for eval_on, y, p in parts:
        met = compute_metrics(y, p, classes)
        results.append({"eval_on": eval_on, **met})
        rows.append({"model": name, "eval_on": eval_on, "split": split,
                     **{k: v for k, v in met.items() if k != "confusion"}})
    table = pd.DataFrame(rows)
    record = {"model": name, "model_kind": meta.get("kind"), "classes": classes, "split": split,
              "split_seed": seed, "test_frac": frac, "image_size": size,
              "restore_visits": meta.get("restore_visits"), "results": results}
    prefix = Path(out) if out else model_path.with_suffix("")
    write_json(prefix.with_name(prefix.name + ".eval.json"), record)
    write_csv(prefix.with_name(prefix.name + ".eval.csv"), table)
    last = results[-1]
    plot_confusion(last["confusion"], classes, prefix.with_name(prefix.name + ".confusion.png"),
                   title=f"{name} on {last['eval_on']} ({split}, n={last['n']})")
    return table, record


def format_metrics(m: dict) -> str:
    def f(x):
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
    return (f"n={m['n']} accuracy={f(m['accuracy'])} balanced_accuracy={f(m['balanced_accuracy'])} "
            f"macro_f1={f(m['macro_f1'])} auc_ovr={f(m['auc_ovr'])}")
