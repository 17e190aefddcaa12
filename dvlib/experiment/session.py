"""One replicate of a run in memory: its dataset, split, decoded images and pretrained model.

Decoding images and building networks cost more than most steps, so a process keeps the last image
cache and pretrained model (:func:`reset_caches` drops them, e.g. between benchmark repeats).

Work that the steps (each in its own notebook kernel) would repeat is done once per run, under
``<run>/cache/`` (safe to delete; every entry is keyed by what it was computed from):

- the decoded images (``images_<side>px_<key>.npy``): every later process reads them back, bit for
  bit what decoding gives (the key covers the image list, each file's size and modification time,
  and the decoding code);
- every evaluation's class probabilities (``predictions/<key>.npz``), keyed by the weights' bytes,
  the test images' bytes and everything else the forward pass depends on (code, settings, torch,
  threads): a model with the same weights as one evaluated before, e.g. ``merged_data_vector`` as
  lambda 0.5 and again before its restore, is scored from the stored probabilities, which are the
  ones recomputing would give.

``DVLIB_PLAIN=1`` (:func:`dvlib.train.plain`) turns both off.
"""
from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dvlib import models, stages
from dvlib.data import load_dataset
from dvlib.local import LocalData, from_manifest
from dvlib.runs import Run
from dvlib.seeds import derive
from dvlib.split import load_manifest

_CACHES: dict[tuple, object] = {}
_INDEXES: dict[tuple, object] = {}
_PRETRAINED: dict[tuple, tuple[dict, str]] = {}


def reset_caches() -> None:
    """Forget the decoded images, pretrained weights and replicates kept by this process."""
    _CACHES.clear()
    _INDEXES.clear()
    _PRETRAINED.clear()
    _REPLICATES.clear()


def dataset_index(run: Run):
    """The run's dataset index (what is on disk, with labels and patients)."""
    import os

    p = run.preset
    key = (p.dataset, p.n_patients, os.environ.get("DVLIB_DATA", ""))
    if key not in _INDEXES:
        _INDEXES.clear()
        _INDEXES[key] = load_dataset(p.dataset, **({"n_patients": p.n_patients} if p.dataset == "synthetic" else {}))
    return _INDEXES[key]


class Replicate:
    """(split seed, training seed) of a run: hospitals as :class:`LocalData`, the pretrained model."""

    def __init__(self, run: Run, split_seed: int, train_seed: int, device=None, index=None):
        from dvlib.train import resolve_device

        self.run, self.split_seed, self.train_seed = run, int(split_seed), int(train_seed)
        self.p = run.preset
        self.settings = stages.TrainSettings.from_preset(self.p)
        self.device = resolve_device(device or run.device)
        self.index = index if index is not None else dataset_index(run)
        self.classes = list(self.index.classes)
        self.manifest = load_manifest(run.manifest_path(split_seed), self.classes)
        self.hospitals = sorted(int(h) for h in self.manifest["hospital"].unique())
        self._template = None
        self._memo: dict[str, list[np.ndarray]] = {}
        self._pending: str | None = None
        self.evaluations = {"computed": 0, "reused": 0}

    @property
    def tags(self) -> dict:
        return {"split_seed": self.split_seed, "train_seed": self.train_seed}

    def seed(self, *names) -> int:
        """The training seed of one piece of work (a model's fine-tuning), see :mod:`dvlib.seeds`."""
        return derive(self.train_seed, *names)

    def path(self, tag: str):
        return self.run.model_path(self.split_seed, self.train_seed, tag)

    @cached_property
    def cache(self):
        """Every image of the split decoded once (shared by later replicates of the same images, and
        by later processes through ``<run>/cache/``)."""
        from dvlib.loader import cache_size_for

        images = sorted(self.manifest["image"])
        key = (self.index.name, str(self.index.root), cache_size_for(self.p.image_size), tuple(images), str(self.device))
        if key not in _CACHES:
            _CACHES.clear()
            _CACHES[key] = decoded_images(self.index, images, cache_size_for(self.p.image_size), self.device,
                                          None if plain() else self.run.dir / "cache")
        return _CACHES[key]

    def local(self, hospital: int | None) -> LocalData:
        """A simulated hospital (``None``: all hospitals' images, for Full Training)."""
        return from_manifest(self.index, self.manifest, hospital, classes=self.classes, cache=self.cache,
                             source=str(self.run.manifest_path(self.split_seed)))

    def target(self, name: str) -> LocalData:
        """``hospital_<i>`` or ``full``."""
        return self.local(None if name == "full" else int(name.split("_")[1]))

    def pretrained(self) -> tuple[dict, str]:
        """(pretrained state dict, its sha256): the head is seeded by the training seed, the same at
        every hospital of the replicate."""
        key = (self.p.arch, self.p.weights, self.p.head, len(self.classes), self.train_seed)
        if key not in _PRETRAINED:
            m = stages.pretrained_model(self.settings, len(self.classes), self.train_seed)
            _PRETRAINED.clear()
            _PRETRAINED[key] = ({k: v.detach().clone() for k, v in m.state_dict().items()}, m.pretrained_sha256)
        return _PRETRAINED[key]

    def model_from(self, state: dict, fresh: bool = False) -> models.DVNet:
        """A network holding ``state``: by default one network reused for every model of the replicate
        (building one costs more than loading), put back as built apart from the weights; ``fresh`` for
        one of its own (e.g. to change it by hand in a notebook)."""
        if fresh or self._template is None:
            net = models.build(self.p.arch, len(self.classes), weights="random", head=self.p.head)
            net.pretrained_sha256 = self.pretrained()[1]
            if fresh:
                net.load_state_dict(state, strict=True)
                return net
            self._template = net
            self._momenta = [(m, m.momentum) for m in net.modules() if hasattr(m, "momentum")]
        for m, momentum in self._momenta:  # a BatchNorm's momentum is not in the state dict
            m.momentum = momentum
        self._template.load_state_dict(state, strict=True)
        self._template.train(False)
        return self._template

    def pretrained_model(self) -> models.DVNet:
        return self.model_from(self.pretrained()[0])

    def test_shards(self) -> list:
        return [self.local(h).shard("test", self.p.image_size, self.device) for h in self.hospitals]

    def train_shards(self) -> list:
        return [self.local(h).shard("train", self.p.image_size, self.device) for h in self.hospitals]

    def evaluate(self, net, **tags) -> tuple[list[dict], pd.DataFrame]:
        """Every hospital's test split and all test images together, tagged with the replicate.
        Weights evaluated before (in this run, by any process) are scored from their stored
        probabilities (see the module docstring); ``evaluations`` counts both kinds."""
        shards = self.test_shards()
        probs = self._stored_probs(net, shards)
        if probs is None:
            probs = stages.predict_shards(net, shards, size=self.p.image_size, batch_size=self.p.eval_batch_size,
                                          device=self.device)
            self._store_probs(probs)
            kind = "computed"
        else:
            kind = "reused"
        self.evaluations[kind] += 1
        _EVALUATIONS[kind] += 1
        rows, preds = stages.score(shards, probs, net.num_classes)
        tags = {**self.tags, **tags}
        patient = self.manifest.set_index("image")["patient"]
        return [{**tags, **r} for r in rows], preds.assign(**tags, patient=preds["image"].map(patient).to_numpy())


    # --- evaluations of the same weights, done once ---------------------------------------------

    @cached_property
    def _eval_context(self) -> str:
        """What a test-set forward pass depends on besides the weights: code, settings, images."""
        from dvlib.train import use_channels_last

        h = hashlib.sha256(_code_fingerprint().encode())
        h.update(repr((torch.__version__, torch.get_num_threads(), str(self.device), use_channels_last(self.device),
                       self.p.arch, self.p.head, len(self.classes), self.p.image_size, self.p.eval_batch_size)).encode())
        for sh in self.test_shards():
            h.update(repr((sh.name, [sh.cache.images[int(r)] for r in sh.rows])).encode())
            h.update(np.ascontiguousarray(sh.cache.data.index_select(0, sh.rows.to(sh.cache.data.device)).cpu().numpy()))
        return h.hexdigest()

    def _probs_key(self, net) -> str:
        h = hashlib.sha256(self._eval_context.encode())
        for k, v in net.state_dict().items():
            t = v.detach().cpu().contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    def _probs_path(self, key: str) -> Path:
        return self.run.dir / "cache" / "predictions" / f"{key[:32]}.npz"

    def _stored_probs(self, net, shards) -> list[np.ndarray] | None:
        self._pending = None
        if plain():
            return None
        key = self._probs_key(net)
        if key in self._memo:
            return self._memo[key]
        path = self._probs_path(key)
        if path.exists():
            try:
                with np.load(path) as z:
                    if str(z["key"]) == key:
                        probs = [z[f"p{i}"] for i in range(len(shards))]
                        if all(p.shape == (len(sh), net.num_classes) for p, sh in zip(probs, shards)):
                            self._memo[key] = probs
                            return probs
            except (OSError, ValueError, KeyError):  # unreadable or foreign: recompute (and rewrite)
                pass
        self._pending = key
        return None

    def _store_probs(self, probs: list[np.ndarray]) -> None:
        key, self._pending = self._pending, None
        if key is None:
            return
        self._memo[key] = probs
        from dvlib.io import atomic_path

        path = self._probs_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), **{f"p{i}": p for i, p in enumerate(probs)})


def plain() -> bool:
    from dvlib.train import plain as _plain

    return _plain()


_FINGERPRINT: list[str] = []
_EVALUATIONS = {"computed": 0, "reused": 0}


def evaluation_counts() -> dict[str, int]:
    """Evaluations this process's replicates computed and scored from stored probabilities."""
    return dict(_EVALUATIONS)


def _code_fingerprint() -> str:
    """sha256 of the source of the modules a forward pass runs through, and the versions: a stored
    result is reused only by the code that made it."""
    if not _FINGERPRINT:
        import importlib

        from dvlib import __version__

        h = hashlib.sha256(f"{__version__}|{torch.__version__}".encode())
        for name in ("dvlib.loader", "dvlib.train", "dvlib.models", "dvlib.stages", "dvlib.data.base"):
            h.update(Path(importlib.import_module(name).__file__).read_bytes())
        _FINGERPRINT.append(h.hexdigest())
    return _FINGERPRINT[0]


def decoded_images(index, images: list[str], side: int, device, folder: Path | None):
    """:meth:`dvlib.loader.ImageCache.build`, kept in ``folder`` for later processes (None: decode).

    Only for datasets of image files (a generated dataset such as ``synthetic`` is decoded). The key
    covers the dataset, the image list, each file's size and modification time, the side and the
    decoding code, so a changed image or decoder means decoding afresh."""
    from dvlib.loader import ImageCache

    if folder is None or index.loader is not None:
        return ImageCache.build(index, images, side, device=device)
    paths = index.records.set_index("image").loc[images, "path"]
    h = hashlib.sha256(_code_fingerprint().encode())
    h.update(repr((index.name, str(index.root), side, list(images))).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    path = Path(folder) / f"images_{side}px_{h.hexdigest()[:24]}.npy"
    if path.exists():
        try:
            data = np.load(path)
            if data.dtype == np.uint8 and data.shape == (len(images), 3, side, side):
                return ImageCache.from_nchw(data, images, device)
        except (OSError, ValueError):  # unreadable: decode again (and rewrite)
            pass
    cache = ImageCache.build(index, images, side, device=device)
    from dvlib.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npy", mode=0o600) as tmp:  # decoded patient images: their owner's only
        with open(tmp, "wb") as f:
            np.save(f, cache.data.cpu().numpy())
    return cache


_REPLICATES: dict[tuple, Replicate] = {}


def replicate(run: Run, split_seed: int, train_seed: int, device=None) -> Replicate:
    """The process's :class:`Replicate` for (run, seeds, device): consecutive steps share its
    decoded images and reusable network (a changed manifest makes a new one)."""
    path = run.manifest_path(split_seed)
    key = (str(run.dir.resolve()), repr(sorted(run.settings.items())), split_seed, train_seed, str(device or run.device),
           path.stat().st_mtime_ns if path.exists() else 0)
    if key not in _REPLICATES:
        _REPLICATES.clear()
        _REPLICATES[key] = Replicate(run, split_seed, train_seed, device)
    return _REPLICATES[key]
