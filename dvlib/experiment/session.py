"""One replicate of a run in memory: its dataset, split, decoded images and pretrained model.

What it keeps so as not to repeat work (decoded images, pretrained weights, evaluations, one shared
network) is :mod:`dvlib.experiment.cache`'s, with the contract of each store.
"""
from __future__ import annotations

import os
from functools import cached_property

import pandas as pd

from dvlib import device as hw  # the device policy and DVLIB_PLAIN
from dvlib import models, stages
from dvlib.data import load_dataset
from dvlib.experiment.cache import (PredictionStore, SharedNetwork, count_evaluation, decoded_images,
                                   forward_context, kept)
from dvlib.local import LocalData, from_manifest
from dvlib.runs import Run
from dvlib.seeds import derive
from dvlib.split import load_manifest


def dataset_index(run: Run):
    """The run's dataset index (what is on disk, with labels and patients)."""
    p = run.preset
    key = (p.dataset, p.n_patients, os.environ.get("DVLIB_DATA", ""))
    return kept("dataset index", key, lambda: load_dataset(
        p.dataset, **({"n_patients": p.n_patients} if p.dataset == "synthetic" else {})))


class Replicate:
    """(split seed, training seed) of a run: hospitals as :class:`LocalData`, the pretrained model."""

    def __init__(self, run: Run, split_seed: int, train_seed: int, device=None, index=None):
        self.run, self.split_seed, self.train_seed = run, int(split_seed), int(train_seed)
        self.p = run.preset
        self.settings = stages.TrainSettings.from_preset(self.p)
        self.device = hw.resolve_device(device or run.device)
        self.index = index if index is not None else dataset_index(run)
        self.classes = list(self.index.classes)
        self.manifest = load_manifest(run.manifest_path(split_seed), self.classes)
        self.hospitals = sorted(int(h) for h in self.manifest["hospital"].unique())
        self._shared = SharedNetwork(self._new_network)
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
        side = cache_size_for(self.p.image_size)
        key = (self.index.name, str(self.index.root), side, tuple(images), str(self.device))
        folder = None if hw.plain() else self.run.dir / "cache"
        return kept("decoded images", key, lambda: decoded_images(self.index, images, side, self.device, folder))

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
        def make():
            m = stages.pretrained_model(self.settings, len(self.classes), self.train_seed)
            return {k: v.detach().clone() for k, v in m.state_dict().items()}, m.pretrained_sha256

        key = (self.p.arch, self.p.weights, self.p.head, len(self.classes), self.train_seed)
        return kept("pretrained weights", key, make)

    def _new_network(self) -> models.DVNet:
        net = models.build(self.p.arch, len(self.classes), weights="random", head=self.p.head)
        net.pretrained_sha256 = self.pretrained()[1]
        return net

    def model_from(self, state: dict, shared: bool = False) -> models.DVNet:
        """A new network holding ``state``, in eval mode. ``shared=True``: the replicate's one reused
        network instead (:class:`dvlib.experiment.cache.SharedNetwork`; faster, but the next
        ``model_from(..., shared=True)`` overwrites it)."""
        if shared:
            return self._shared.holding(state)
        net = self._new_network()
        net.load_state_dict(state, strict=True)
        return net.train(False)

    def pretrained_model(self, shared: bool = False) -> models.DVNet:
        return self.model_from(self.pretrained()[0], shared=shared)

    def test_shards(self) -> list:
        return [self.local(h).shard("test", self.p.image_size, self.device) for h in self.hospitals]

    def train_shards(self) -> list:
        return [self.local(h).shard("train", self.p.image_size, self.device) for h in self.hospitals]

    @cached_property
    def predictions(self) -> PredictionStore:
        """The run's stored class probabilities on this replicate's test shards."""
        p = self.p
        settings = (p.arch, p.head, len(self.classes), p.image_size, p.eval_batch_size)
        context = forward_context(self.device, settings, self.test_shards())
        return PredictionStore(self.run.dir / "cache" / "predictions", context)

    def evaluate(self, net, **tags) -> tuple[list[dict], pd.DataFrame]:
        """Every hospital's test split and all test images together, tagged with the replicate.
        Weights evaluated before (in this run, by any process) are scored from their stored
        probabilities (:class:`dvlib.experiment.cache.PredictionStore`; not with ``DVLIB_PLAIN=1``);
        ``evaluations`` counts both kinds."""
        shards = self.test_shards()
        key = None if hw.plain() else self.predictions.key(net)
        probs = None if key is None else self.predictions.load(key, [(len(sh), net.num_classes) for sh in shards])
        kind = "computed" if probs is None else "reused"
        if probs is None:
            probs = stages.predict_shards(net, shards, size=self.p.image_size, batch_size=self.p.eval_batch_size,
                                          device=self.device)
            if key is not None:
                self.predictions.save(key, probs)
        self.evaluations[kind] += 1
        count_evaluation(kind)
        rows, preds = stages.score(shards, probs, net.num_classes)
        tags = {**self.tags, **tags}
        patient = self.manifest.set_index("image")["patient"]
        return [{**tags, **r} for r in rows], preds.assign(**tags, patient=preds["image"].map(patient).to_numpy())


def replicate(run: Run, split_seed: int, train_seed: int, device=None) -> Replicate:
    """The process's :class:`Replicate` for (run, seeds, device): consecutive steps share its
    decoded images and shared network (a changed manifest makes a new one)."""
    path = run.manifest_path(split_seed)
    key = (str(run.dir.resolve()), repr(sorted(run.settings.items())), split_seed, train_seed, str(device or run.device),
           path.stat().st_mtime_ns if path.exists() else 0)
    return kept("replicate", key, lambda: Replicate(run, split_seed, train_seed, device))
