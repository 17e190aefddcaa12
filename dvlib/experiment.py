"""The protocol, step by step, over a run folder. Notebooks and the CLI call these functions.

Layout of ``<runs>/<run>/`` (``<runs>`` = ``$DVLIB_RUNS`` or ``runs``)::

    run.json                         the run's settings (preset + overrides + seeds), fixed at creation
    seed_<s>/manifest.csv            the split, written once and reused
    seed_<s>/checkpoints/*.safetensors (+ .json sidecars: metadata, training history, evaluation)
    seed_<s>/results/*.csv           tidy results of each step
    results/*.csv                    all seeds together (what tables and figures are made from)

Every model is evaluated on each hospital's own test split (``eval_on`` = ``h0``..``h{N-1}``, the
paper's "Part Index") and on all test images together (``eval_on`` = ``pooled``).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from dvlib import models, restore as restore_mod
from dvlib.checkpoint import load_checkpoint, save_checkpoint
from dvlib.data import load_dataset
from dvlib.io import DvlibError, read_json, write_csv, write_json
from dvlib.loader import ImageCache, Shard, cache_size_for
from dvlib.merging import merge, negative_variance_keys
from dvlib.presets import Preset, get_preset
from dvlib.split import load_manifest, make_split, save_manifest, shard_table
from dvlib.train import class_weights, compute_metrics, fit, predict, prepare, resolve_device

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc_ovr")
PAPER_METHODS = ("params_mean", "data_vector", "random_vector")
ALL_METHODS = ("params_mean", "data_vector", "random_vector", "ties", "dare", "weighted")
LAMBDAS = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 11))


def method_lam(method: str, lam: float) -> float:
    """The lambda a method is used with: the preset's for the data-vector family; 1.0 for TIES,
    whose merged vector is a (disjoint) mean, as in the TIES paper; none for plain averages."""
    if method in ("data_vector", "random_vector", "dare"):
        return float(lam)
    if method == "ties":
        return 1.0
    return float("nan")


def runs_root() -> Path:
    return Path(os.environ.get("DVLIB_RUNS") or "runs")


@dataclass
class Run:
    name: str
    root: Path
    config: dict

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def preset(self) -> Preset:
        cfg = {k: v for k, v in self.config.items() if k not in ("seeds", "preset", "device", "dvlib_version")}
        return get_preset(self.config["preset"], **cfg)

    @property
    def seeds(self) -> list[int]:
        return list(self.config["seeds"])

    def seed_dir(self, seed: int) -> Path:
        return self.dir / f"seed_{seed}"

    def manifest_path(self, seed: int) -> Path:
        return self.seed_dir(seed) / "manifest.csv"

    def ckpt(self, seed: int, tag: str) -> Path:
        return self.seed_dir(seed) / "checkpoints" / f"{tag}.safetensors"

    def seed_result(self, seed: int, step: str) -> Path:
        return self.seed_dir(seed) / "results" / f"{step}.csv"

    def result(self, step: str) -> Path:
        return self.dir / "results" / f"{step}.csv"

    def read(self, step: str) -> pd.DataFrame:
        p = self.result(step)
        if not p.exists():
            raise DvlibError(f"{p}: result not found; run the step that writes {step!r} first")
        return pd.read_csv(p)


IDENTITY_EXCLUDES = ("seeds", "device", "dvlib_version")


def create_run(name: str, preset: str = "smoke", seeds: Sequence[int] = (0,), root: str | os.PathLike | None = None,
               device: str = "auto", overwrite: bool = False, **overrides) -> Run:
    """Create (or reopen with identical settings) the run folder ``<root>/<name>``.

    A run's identity is its settings (preset + overrides). Seeds are replicates inside it
    (``seed_<s>/``) and the device does not change what is computed, so neither is part of it:
    ``dvlib finetune --hospital 0`` (seed 0) and a later ``make report`` (seeds 0 1 2) share a run.
    """
    if not name or "/" in name or name.startswith("."):
        raise DvlibError(f"invalid run name {name!r}: use letters, digits, '-' and '_'")
    root = Path(root) if root is not None else runs_root()
    p = get_preset(preset, **overrides)
    settings = {**p.to_dict(), "preset": preset}
    settings.pop("name", None)
    run_dir = root / name
    cfg_path = run_dir / "run.json"
    if cfg_path.exists():
        old = {k: v for k, v in read_json(cfg_path).items() if k not in IDENTITY_EXCLUDES}
        if old != settings and not overwrite:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise DvlibError(f"{cfg_path}: run {name!r} exists with other settings ({', '.join(diff)}); "
                             "choose another run name or pass overwrite=True (--overwrite) to start it afresh")
        if old != settings:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg_path.exists():
        from dvlib import __version__

        write_json(cfg_path, {**settings, "dvlib_version": __version__})
    return Run(name, root, {**settings, "seeds": [int(s) for s in seeds], "device": device})


def open_run(name: str, root: str | os.PathLike | None = None, seeds: Sequence[int] | None = None,
             device: str = "auto") -> Run:
    """Reopen a run; seeds default to every ``seed_<s>/`` folder it has."""
    root = Path(root) if root is not None else runs_root()
    cfg = {k: v for k, v in read_json(root / name / "run.json").items() if k not in IDENTITY_EXCLUDES}
    if seeds is None:
        seeds = sorted(int(p.name.split("_", 1)[1]) for p in (root / name).glob("seed_*") if p.is_dir())
    return Run(name, root, {**cfg, "seeds": list(seeds), "device": device})


# --- data for one seed ------------------------------------------------------------------------

_CACHES: dict[tuple, ImageCache] = {}


@dataclass
class Session:
    """Everything a step needs for one seed: dataset index, manifest, decoded images, models."""

    run: Run
    seed: int
    device: torch.device = field(default=None)

    def __post_init__(self):
        self.p = self.run.preset
        self.device = resolve_device(self.device or self.run.config.get("device", "auto"))
        self.index = dataset_index(self.run)
        self.classes = list(self.index.classes)
        self.manifest = load_manifest(self.run.manifest_path(self.seed), self.classes)
        self.class_id = {c: i for i, c in enumerate(self.classes)}
        self.hospitals = sorted(int(h) for h in self.manifest["hospital"].unique())

    @cached_property
    def cache(self) -> ImageCache:
        """Every image of the manifest decoded once (built on first use, shared by later sessions
        of the same images, size and device in this process)."""
        key = (self.index.name, str(self.index.root), cache_size_for(self.p.image_size),
               tuple(sorted(self.manifest["image"])), str(self.device))
        if key not in _CACHES:
            _CACHES.clear()
            for k in [k for k, v in _SESSIONS.items() if v is not self]:  # they may hold the previous cache
                del _SESSIONS[k]
            _CACHES[key] = ImageCache.build(self.index, sorted(self.manifest["image"]),
                                            cache_size_for(self.p.image_size), device=self.device)
        return _CACHES[key]

    def _rows(self, hospital: int | None, subset: str) -> pd.DataFrame:
        m = self.manifest[self.manifest["subset"] == subset]
        return m if hospital is None else m[m["hospital"] == hospital]

    def n_images(self, hospital: int | None, subset: str) -> int:
        """Images in a shard, without decoding any."""
        return len(self._rows(hospital, subset))

    def shard(self, hospital: int | None, subset: str) -> Shard:
        m = self._rows(hospital, subset)
        name = f"h{hospital}" if hospital is not None else "pooled"
        return Shard(name, self.cache, self.cache.rows(m["image"]),
                     torch.tensor(m["label"].map(self.class_id).to_numpy(), dtype=torch.long))

    def train_shards(self) -> list[Shard]:
        return [self.shard(h, "train") for h in self.hospitals]

    def new_model(self) -> models.DVNet:
        return models.build(self.p.arch, len(self.classes), weights=self.p.weights, head=self.p.head,
                            seed=self.seed)

    def model_from(self, state_dict: dict, fresh: bool = False) -> models.DVNet:
        """A model holding ``state_dict``. By default one network is reused for every call (building
        one costs more than loading weights); ``fresh=True`` when two must live at once."""
        if fresh or getattr(self, "_template", None) is None:
            m = models.build(self.p.arch, len(self.classes), weights="random", head=self.p.head, seed=self.seed)
            if fresh:
                m.load_state_dict(state_dict, strict=True)
                return m
            self._template = m
        self._template.load_state_dict(state_dict, strict=True)
        return self._template

    def pretrained_state(self) -> tuple[dict, str]:
        path = self.run.ckpt(self.seed, "pretrained")
        if path.exists():
            sd, meta = load_checkpoint(path)
            return sd, meta["pretrained_sha256"]
        m = self.new_model()
        save_checkpoint(path, m.state_dict(), self.meta(m.pretrained_sha256, tag="pretrained"))
        return {k: v.clone() for k, v in m.state_dict().items()}, m.pretrained_sha256

    def meta(self, pretrained_sha: str, **extra) -> dict:
        return {"arch": self.p.arch, "head": self.p.head, "classes": self.classes, "preset": self.run.config["preset"],
                "image_size": self.p.image_size, "seed": self.seed, "run": self.run.name,
                "pretrained_sha256": pretrained_sha, **extra}

    def evaluate(self, net, **tags) -> list[dict]:
        """Evaluate on every hospital's test split and on all test images; one tidy row each."""
        test = self.shard(None, "test")
        probs = predict(net, self.cache, test.rows, size=self.p.image_size, batch_size=self.p.eval_batch_size,
                        device=self.device)
        y = test.labels.numpy()
        hosp = self.manifest[self.manifest["subset"] == "test"]["hospital"].to_numpy()
        rows = []
        for eval_on, mask in [(f"h{h}", hosp == h) for h in self.hospitals] + [("pooled", np.ones_like(y, bool))]:
            met = compute_metrics(y[mask], probs[mask], self.classes)
            conf = met.pop("confusion")
            rows.append({"seed": self.seed, **tags, "eval_on": eval_on, **met,
                         "confusion": json.dumps(conf) if eval_on == "pooled" else ""})
        return rows


# --- steps ------------------------------------------------------------------------------------

def dataset_index(run: Run):
    """The run's dataset index (what is on disk, with labels and patients)."""
    p = run.preset
    opts = {"n_patients": p.n_patients} if p.dataset == "synthetic" else {}
    return load_dataset(p.dataset, **opts)


def step_split(run: Run) -> pd.DataFrame:
    """Write each seed's manifest once (reused afterwards); returns the shard table for all seeds."""
    p = run.preset
    index = dataset_index(run)
    tables = []
    for seed in run.seeds:
        path = run.manifest_path(seed)
        if path.exists():
            manifest = load_manifest(path, index.classes)
            unknown = set(manifest["image"]) - set(index.records["image"])
            if unknown:
                raise DvlibError(f"{path}: lists {len(unknown)} images the dataset no longer has, "
                                 f"e.g. {sorted(unknown)[0]!r}")
        else:
            # non-IID hospitals (dirichlet) may lack classes: that is the point; their weight is then 0
            manifest = make_split(index, p.n_hospitals, p.scheme, p.alpha, p.test_frac, seed=seed,
                                  allow_missing_classes=p.scheme == "dirichlet")
            save_manifest(manifest, path)
        tables.append(shard_table(manifest, index.classes).assign(seed=seed))
    table = pd.concat(tables, ignore_index=True)
    write_csv(run.result("shards"), table)
    return table


def finetune_targets(run: Run) -> list[str]:
    return [f"hospital_{h}" for h in range(run.preset.n_hospitals)] + ["full"]


def step_finetune(run: Run, targets: Iterable[str] | None = None, overwrite: bool = False,
                  progress: bool = True, devices: Sequence[str] | None = None) -> pd.DataFrame:
    """Fine-tune each hospital's model (``hospital_i``) and Full Training (``full``) from the
    pretrained weights; evaluate each; skip checkpoints that exist unless ``overwrite``.

    The models are independent, so with several ``devices`` (default: every visible GPU when the
    run's device is ``auto``, see :func:`finetune_devices`) they are trained one process per device,
    longest first. Each model's seed depends only on (seed, target): where a model is trained does not
    change it, beyond the device's own arithmetic.
    """
    targets = list(targets) if targets is not None else finetune_targets(run)
    valid = finetune_targets(run)
    bad = [t for t in targets if t not in valid]
    if bad:
        raise DvlibError(f"unknown fine-tuning targets {bad}; valid: {valid}")
    devs = finetune_devices(run.config.get("device", "auto"), devices)
    jobs = []
    for seed in run.seeds:
        s = _session(run, seed, devs[0] if len(devs) == 1 else "cpu")
        s.pretrained_state()  # written once here, before any worker reads it
        for t in targets:
            if overwrite or not run.ckpt(seed, t).exists():
                jobs.append((s.n_images(_target_hospital(t), "train"), seed, t))
    if len(devs) == 1 or len(jobs) <= 1:
        for _, seed, t in jobs:
            _finetune_one(run, seed, t, devs[0], progress)
    else:
        _finetune_parallel(run, sorted(jobs, key=lambda j: -j[0]), devs, progress)
    return finetune_table(run)


def _target_hospital(target: str) -> int | None:
    return None if target == "full" else int(target.split("_")[1])


def finetune_devices(run_device: str = "auto", requested: Sequence[str] | None = None,
                     cuda_count: int | None = None) -> list[str]:
    """Where fine-tuning runs: ``requested`` if given (each checked), otherwise every visible GPU when
    ``run_device`` is ``auto`` and more than one is visible, otherwise ``run_device`` alone."""
    if requested:
        devs = [str(d) for d in requested]
        for d in devs:
            try:
                resolve_device(d)
            except (DvlibError, RuntimeError) as e:
                raise DvlibError(f"devices: {d!r} is not usable ({e})") from None
            if d.startswith("cuda:") and int(d.split(":")[1]) >= torch.cuda.device_count():
                raise DvlibError(f"devices: {d!r} is not usable ({torch.cuda.device_count()} GPU(s) visible)")
        return devs
    n = torch.cuda.device_count() if cuda_count is None else cuda_count
    if str(run_device) == "auto" and n > 1:
        return [f"cuda:{i}" for i in range(n)]
    return [str(run_device)]


def _finetune_one(run: Run, seed: int, target: str, device: str, progress: bool = False) -> float:
    """Train, evaluate and save one model; returns its wall time in seconds."""
    t0 = time.perf_counter()
    p = run.preset
    s = _session(run, seed, device)
    pre_sd, pre_sha = s.pretrained_state()
    shard = s.shard(_target_hospital(target), "train")
    model = s.model_from(pre_sd)
    cw = class_weights(shard.labels.numpy(), len(s.classes), allow_missing=True)
    hist = fit(model, s.cache, shard.rows, shard.labels, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
               size=p.image_size, seed=seed * 1000 + len(target) + sum(map(ord, target)), device=s.device,
               weight_decay=p.weight_decay, class_weight=cw, progress=progress, desc=f"seed {seed} {target}")
    ev = s.evaluate(model, model=target, method="base_model" if target != "full" else "full_training",
                    restore="none", lam=np.nan)
    save_checkpoint(run.ckpt(seed, target), model.state_dict(),
                    s.meta(pre_sha, tag=target, train_images=len(shard), history=hist, eval=ev, device=str(s.device)))
    return time.perf_counter() - t0


_SESSIONS: dict[tuple, Session] = {}


def _session(run: Run, seed: int, device: str) -> Session:
    """One session per (run, seed, device) in this process, so consecutive jobs share the decoded
    images and the reusable model."""
    manifest = run.manifest_path(seed)
    key = (str(run.dir.resolve()), json.dumps(run.config, sort_keys=True), seed, str(device),
           manifest.stat().st_mtime_ns if manifest.exists() else 0)
    if key not in _SESSIONS:
        _SESSIONS.clear()
        _SESSIONS[key] = Session(run, seed, device)
    return _SESSIONS[key]


_WORKER: dict = {}


def _worker_init(device_queue, threads: int) -> None:
    dev = device_queue.get()
    _WORKER["device"] = dev
    if dev.startswith("cuda:"):
        torch.cuda.set_device(int(dev.split(":")[1]))
    if dev == "cpu":
        torch.set_num_threads(threads)


def _worker_job(run: Run, seed: int, target: str) -> tuple[str, float]:
    dev = _WORKER["device"]
    try:
        return dev, _finetune_one(run, seed, target, dev)
    except Exception as e:  # noqa: BLE001 - re-raised with where it happened; the traceback is chained
        raise DvlibError(f"fine-tuning {target} (seed {seed}) on {dev} failed: {type(e).__name__}: {e}") from e


def _finetune_parallel(run: Run, jobs: list[tuple[int, int, str]], devices: list[str], progress: bool) -> None:
    """One worker process per device, each taking the next job when it is free (the largest first)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    q = ctx.Queue()
    for d in devices:
        q.put(d)
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_worker_init, initargs=(q, threads)) as pool:
        futures = {pool.submit(_worker_job, run, seed, t): (seed, t) for _, seed, t in jobs}
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                pool.shutdown(cancel_futures=True)
                raise f.exception()
        if progress:
            for f, (seed, t) in futures.items():
                dev, sec = f.result()
                print(f"seed {seed} {t}: {sec:.1f} s on {dev}")
            print(f"{len(jobs)} models on {len(devices)} devices in {time.perf_counter() - t0:.1f} s")


def finetune_table(run: Run) -> pd.DataFrame:
    """Evaluation rows of every fine-tuned checkpoint present (from their sidecars)."""
    rows, hist = [], []
    for seed in run.seeds:
        for t in finetune_targets(run):
            side = run.ckpt(seed, t).with_suffix(".json")
            if side.exists():
                meta = read_json(side)
                rows += meta["eval"]
                hist += [{"seed": seed, "model": t, **h} for h in meta["history"]]
    table = pd.DataFrame(rows)
    if len(table):
        write_csv(run.result("finetune_eval"), table)
        write_csv(run.result("finetune_history"), pd.DataFrame(hist))
    return table


def _load_finetuned(run: Run, seed: int) -> tuple[list[dict], list[int]]:
    sds, counts = [], []
    for h in range(run.preset.n_hospitals):
        path = run.ckpt(seed, f"hospital_{h}")
        if not path.exists():
            raise DvlibError(f"{path}: missing; fine-tune hospital {h} first (step finetune)")
        sd, meta = load_checkpoint(path)
        sds.append(sd)
        counts.append(int(meta["train_images"]))
    return sds, counts


def step_merge(run: Run, methods: Sequence[str] = ALL_METHODS, lambdas: Sequence[float] = LAMBDAS,
               bn_policies: Sequence[str] = ("mean", "pretrained", "arithmetic")) -> pd.DataFrame:
    """Merge the hospitals' models with every method (lam = preset lam, BN buffers averaged), sweep
    lambda for the data vector, and compare BN-buffer policies; evaluate all without restore."""
    p = run.preset
    rows, lam_rows, bn_rows = [], [], []
    for seed in run.seeds:
        s = Session(run, seed)
        pre_sd, pre_sha = s.pretrained_state()
        sds, counts = _load_finetuned(run, seed)
        for method in methods:
            lam = method_lam(method, p.lam)
            merged = merge(pre_sd, sds, method=method, lam=0.0 if np.isnan(lam) else lam, bn_buffers="mean",
                           seed=seed, weights=counts if method == "weighted" else None)
            save_checkpoint(run.ckpt(seed, f"merged_{method}"), merged,
                            s.meta(pre_sha, tag=f"merged_{method}", method=method,
                                   lam=None if np.isnan(lam) else lam, bn_buffers="mean"))
            rows += s.evaluate(s.model_from(merged), model=f"merged_{method}", method=method, restore="none",
                               lam=lam)
        for lam in lambdas:
            merged = merge(pre_sd, sds, method="data_vector", lam=float(lam), bn_buffers="mean", seed=seed)
            lam_rows += s.evaluate(s.model_from(merged), model="merged_data_vector", method="data_vector",
                                   restore="none", lam=float(lam))
        for pol in bn_policies:
            merged = merge(pre_sd, sds, method="data_vector", lam=p.lam, bn_buffers=pol, seed=seed,
                           allow_negative_var=True)
            neg = negative_variance_keys(merged)
            bn_rows += [{**r, "bn_buffers": pol, "negative_var_layers": len(neg)}
                        for r in s.evaluate(s.model_from(merged), model="merged_data_vector", method="data_vector",
                                            restore="none", lam=p.lam)]
    out = pd.DataFrame(rows)
    write_csv(run.result("merge_eval"), out)
    write_csv(run.result("lambda_eval"), pd.DataFrame(lam_rows))
    write_csv(run.result("bn_policy_eval"), pd.DataFrame(bn_rows))
    return out


def step_restore(run: Run, methods: Sequence[str] = ("pretrained",) + ALL_METHODS,
                 modes: Sequence[str] = ("none", "recalibrate", "finetune_epoch"),
                 finetune_methods: Sequence[str] | None = None, progress: bool = False) -> pd.DataFrame:
    """Apply each restore mode to each merged model (and to the plain pretrained model, which
    isolates what the restore epoch alone does); evaluate every result.

    ``finetune_methods`` limits the (costly) training-based modes to some methods.
    """
    p = run.preset
    rows, logs = [], []
    for seed in run.seeds:
        s = Session(run, seed)
        pre_sd, pre_sha = s.pretrained_state()
        shards = s.train_shards()
        for method in methods:
            src = pre_sd if method == "pretrained" else load_checkpoint(run.ckpt(seed, f"merged_{method}"))[0]
            for mode in modes:
                if "finetune" in mode and finetune_methods is not None and method not in finetune_methods:
                    continue
                model = s.model_from(src)
                log = restore_mod.restore(model, mode, shards, size=p.image_size, batch_size=p.batch_size, lr=p.lr,
                                          seed=seed, num_classes=len(s.classes), epochs=p.restore_epochs,
                                          device=s.device, progress=progress)
                tag = f"restored_{method}_{mode.replace('+', '_')}"
                if mode != "none" and method in ("data_vector", "params_mean"):
                    save_checkpoint(run.ckpt(seed, tag), model.state_dict(),
                                    s.meta(pre_sha, tag=tag, method=method, restore=mode))
                rows += s.evaluate(model, model=tag, method=method, restore=mode, lam=method_lam(method, p.lam))
                logs.append({"seed": seed, "method": method, "restore": mode,
                             "recalibrated_images": json.dumps(log.get("recalibrated_images", [])),
                             "restore_train_loss": float(np.mean([h["loss"] for h in log.get("history", [])]))
                             if log.get("history") else np.nan})
    out = pd.DataFrame(rows)
    write_csv(run.result("restore_eval"), out)
    write_csv(run.result("restore_log"), pd.DataFrame(logs))
    return out


def step_similarity(run: Run) -> pd.DataFrame:
    """Figure 2 data: per convolution layer (network order), cosine similarity to the Full Training
    vector of each hospital's data vector and of the merged vectors (before / after restore)."""
    from dvlib.similarity import layerwise_cosine

    rows = []
    for seed in run.seeds:
        s = Session(run, seed)
        pre_sd, _ = s.pretrained_state()
        conv = models.build(s.p.arch, len(s.classes), weights="random", head=s.p.head).conv_keys()
        full, _ = load_checkpoint(run.ckpt(seed, "full"))
        candidates = {f"hospital_{h}": run.ckpt(seed, f"hospital_{h}") for h in s.hospitals}
        for tag in ("merged_data_vector", "merged_params_mean", "restored_data_vector_recalibrate",
                    "restored_data_vector_finetune_epoch", "restored_params_mean_finetune_epoch"):
            candidates[tag] = run.ckpt(seed, tag)
        for tag, path in candidates.items():
            if not path.exists():
                continue
            sd, _ = load_checkpoint(path)
            table = layerwise_cosine(sd, full, pre_sd, conv)
            rows += [{"seed": seed, "model": tag, **r} for r in table]
    out = pd.DataFrame(rows)
    write_csv(run.result("layer_cosine"), out)
    return out


# --- notebook glue and invariant checks ----------------------------------------------------------

def project_root(start: str | os.PathLike | None = None) -> Path:
    """The dvlib project folder (pyproject.toml + dvlib/) at or above ``start`` (default: cwd); else
    the one this dvlib was installed from (editable install), so `dvlib run` works from anywhere; else
    ``start``."""
    here = Path(start or Path.cwd()).resolve()
    installed = Path(__file__).resolve().parents[1]
    for p in (here, *here.parents, installed):
        if (p / "pyproject.toml").exists() and (p / "dvlib").is_dir():
            return p
    return here


def setup_run(run: str, preset: str, dataset: str = "", seeds: Sequence[int] = (0,), device: str = "auto",
              runs_dir: str = "", **overrides) -> Run:
    """What every notebook does first: open the run named by its parameters (creating it if new).
    Empty strings mean "the default"."""
    over = {k: v for k, v in overrides.items() if v not in ("", None)}
    if dataset:
        over["dataset"] = dataset
    root = Path(runs_dir) if runs_dir else (Path(os.environ["DVLIB_RUNS"]) if os.environ.get("DVLIB_RUNS")
                                            else project_root() / "runs")
    cfg_path = root / run / "run.json"
    if cfg_path.exists() and not (set(over) - {"dataset"}):
        # an existing run keeps the settings it was created with (e.g. by `dvlib run --lr ...`)
        existing = open_run(run, root, seeds, device)
        stored = existing.config
        if stored["preset"] != preset or ("dataset" in over and stored["dataset"] != over["dataset"]):
            raise DvlibError(f"{cfg_path}: run {run!r} was created with preset {stored['preset']!r} and dataset "
                             f"{stored['dataset']!r}, not {preset!r}/{over.get('dataset', stored['dataset'])!r}; "
                             "use another run name")
        return existing
    return create_run(run, preset, seeds, root=root, device=device, **over)


def figures_dir(run: Run, figures: str = "") -> Path:
    d = Path(figures) if figures else project_root() / "figures" / run.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def split_checks(run: Run) -> dict:
    """Invariants of the saved split: patient-disjoint, every image once, every class at every
    hospital's training split."""
    out = {}
    for seed in run.seeds:
        m = load_manifest(run.manifest_path(seed))
        spans = m.groupby("patient")[["hospital", "subset"]].nunique()
        classes = set(m["label"])
        train = m[m["subset"] == "train"]
        out[seed] = {
            "patient_disjoint": bool((spans <= 1).all().all()),
            "images_unique": bool(not m["image"].duplicated().any()),
            "every_class_in_every_train_split": bool(all(set(g["label"]) == classes for _, g in train.groupby("hospital"))),
            "hospitals": int(m["hospital"].nunique()),
        }
    return out


def verify_merge(run: Run, seed: int, method: str = "data_vector") -> float:
    """Recompute theta_pre + lam * sum(theta_i - theta_pre) for the saved models with plain tensor
    arithmetic and return the largest absolute difference to the saved merged checkpoint
    (pretrained parameters only; the head is the mean of the hospitals' heads)."""
    pre, _ = load_checkpoint(run.ckpt(seed, "pretrained"))
    sds, _ = _load_finetuned(run, seed)
    merged, meta = load_checkpoint(run.ckpt(seed, f"merged_{method}"))
    lam = meta.get("lam")
    worst = 0.0
    for k, v in merged.items():
        if not v.is_floating_point() or k.endswith(("running_mean", "running_var")):
            continue
        if k.startswith("head."):
            ref = torch.stack([sd[k] for sd in sds]).mean(0)
        elif method == "data_vector":
            ref = pre[k] + float(lam) * sum(sd[k] - pre[k] for sd in sds)
        elif method == "params_mean":
            ref = torch.stack([sd[k] for sd in sds]).mean(0)
        else:
            raise DvlibError(f"verify_merge knows data_vector and params_mean, not {method!r}")
        worst = max(worst, float((v - ref).abs().max()))
    return worst


def verify_recalibration(run: Run, seed: int) -> float:
    """Largest difference between dvlib's BN recalibration of the data-vector merge and
    torch.optim.swa_utils.update_bn over the same batches (running means and variances)."""
    from torch.optim.swa_utils import update_bn

    from dvlib.loader import batches

    s = Session(run, seed)
    merged, _ = load_checkpoint(run.ckpt(seed, "merged_data_vector"))
    shards = s.train_shards()
    ours = s.model_from(merged, fresh=True)
    restore_mod.recalibrate(ours, shards, size=s.p.image_size, device=s.device)
    ref = prepare(s.model_from(merged, fresh=True), s.device)  # as recalibrate prepares ours (channels_last on CUDA)
    loader = [x for sh in shards for x, _ in batches(sh.cache, sh.rows, None, 64, s.p.image_size, train=False,
                                                      device=s.device, channels_last=s.device.type == "cuda")]
    update_bn(loader, ref, device=s.device)
    a, b = ours.state_dict(), ref.state_dict()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k.endswith(("running_mean", "running_var")))
