"""One replicate of a run in memory: its dataset, split, decoded images and pretrained model.

Decoding images and building networks cost more than most steps, so a process keeps the last image
cache and pretrained model (:func:`reset_caches` drops them, e.g. between benchmark repeats).
"""
from __future__ import annotations

from functools import cached_property

import pandas as pd

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
        """Every image of the split decoded once (shared by later replicates of the same images)."""
        from dvlib.loader import ImageCache, cache_size_for

        images = sorted(self.manifest["image"])
        key = (self.index.name, str(self.index.root), cache_size_for(self.p.image_size), tuple(images), str(self.device))
        if key not in _CACHES:
            _CACHES.clear()
            _CACHES[key] = ImageCache.build(self.index, images, cache_size_for(self.p.image_size), device=self.device)
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
        """Every hospital's test split and all test images together, tagged with the replicate."""
        rows, preds = stages.evaluate(net, self.test_shards(), size=self.p.image_size,
                                      batch_size=self.p.eval_batch_size, device=self.device)
        tags = {**self.tags, **tags}
        patient = self.manifest.set_index("image")["patient"]
        return [{**tags, **r} for r in rows], preds.assign(**tags, patient=preds["image"].map(patient).to_numpy())


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
