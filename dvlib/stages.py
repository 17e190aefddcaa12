"""The method's stages, as computations: fine-tune, export the data vector, evaluate.

Merging is :func:`dvlib.merging.merge` and restoring is :func:`dvlib.restore.visit`. Both drivers, the
simulation (:mod:`dvlib.experiment`) and the hospitals' commands (:mod:`dvlib.site`,
:mod:`dvlib.coordinator`), call these and only these, so what the report measures is what a hospital
runs. Nothing here reads or writes files.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from dvlib import models
from dvlib.metrics import compute_metrics
from dvlib.vectors import DataVector, key_kinds


@dataclass(frozen=True)
class TrainSettings:
    """What every hospital of a consortium agrees on, and trains with: the training knobs of a
    :class:`dvlib.presets.Preset`, which builds it (:meth:`from_preset`) and states their defaults."""

    arch: str
    weights: str
    head: str
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    eval_batch_size: int

    @classmethod
    def from_preset(cls, preset) -> "TrainSettings":
        return cls(**{k: getattr(preset, k) for k in cls.__dataclass_fields__})

    def hyperparameters(self, seed: int) -> dict:
        """As recorded in a vector file: the coordinator compares sites' training settings."""
        keep = ("epochs", "batch_size", "lr", "weight_decay", "image_size")
        return {**{k: v for k, v in asdict(self).items() if k in keep}, "seed": int(seed),
                "optimizer": "adam", "loss": "weighted_cross_entropy"}


def pretrained_model(settings: TrainSettings, num_classes: int, build_seed: int) -> models.DVNet:
    """The consortium's starting point: pretrained backbone and a new head seeded by ``build_seed``
    (the same at every hospital, so that the heads can be averaged)."""
    return models.build(settings.arch, num_classes, weights=settings.weights, head=settings.head, seed=build_seed)


def finetune(model: nn.Module, shard, settings: TrainSettings, *, seed: int, device="auto",
             progress: bool = False, desc: str = "train", allow_missing_classes: bool = True) -> list[dict]:
    """Fine-tune ``model`` in place on one hospital's training images: Adam, cross-entropy weighted
    by the inverse class frequency of those images (a class without images gets weight 0)."""
    from dvlib.train import class_weights, fit

    cw = class_weights(shard.labels.numpy(), model.num_classes, allow_missing=allow_missing_classes)
    return fit(model, shard.cache, shard.rows, shard.labels, epochs=settings.epochs, batch_size=settings.batch_size,
               lr=settings.lr, size=settings.image_size, seed=seed, device=device,
               weight_decay=settings.weight_decay, class_weight=cw, progress=progress, desc=desc)


def export(model: nn.Module, pretrained: Mapping[str, torch.Tensor]) -> DataVector:
    """The hospital's data vector ``tau = theta - theta_pre`` (kinds from the model's module types)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return DataVector.between(state, pretrained, key_kinds(state, model))


def predict_shards(model: nn.Module, shards: Sequence, *, size: int, batch_size: int = 128,
                   device="auto") -> list[np.ndarray]:
    """Class probabilities [n_i, C] of each shard's images, in shard order; shards sharing a cache are
    predicted in one pass (one batch sequence over their rows together)."""
    from dvlib.train import predict

    probs: dict[int, np.ndarray] = {}
    for cache_id in dict.fromkeys(id(s.cache) for s in shards):
        group = [s for s in shards if id(s.cache) == cache_id]
        p = predict(model, group[0].cache, torch.cat([s.rows for s in group]), size=size, batch_size=batch_size,
                    device=device)
        for s, part in zip(group, np.split(p, np.cumsum([len(s) for s in group])[:-1])):
            probs[id(s)] = part
    return [probs[id(s)] for s in shards]


def score(shards: Sequence, probs: Sequence[np.ndarray], num_classes: int,
          pooled: bool = True) -> tuple[list[dict], pd.DataFrame]:
    """:func:`evaluate`'s metrics and per-image rows from the probabilities of each shard."""
    classes = list(range(num_classes))
    parts = [(s.name, s.labels.numpy(), p) for s, p in zip(shards, probs)]
    if pooled and len(shards) > 1:
        parts.append(("pooled", np.concatenate([y for _, y, _ in parts]), np.concatenate([p for _, _, p in parts])))
    rows = []
    for name, y, p in parts:
        met = compute_metrics(y, p, [str(c) for c in classes])
        rows.append({"eval_on": name, **{k: v for k, v in met.items() if k != "confusion"},
                     "confusion": json.dumps(met["confusion"])})
    preds = pd.concat([pd.DataFrame({"eval_on": s.name, "image": [s.cache.images[int(r)] for r in s.rows],
                                     "label": y, "pred": p.argmax(1), "p_true": p[np.arange(len(y)), y]})
                       for s, (_, y, p) in zip(shards, parts)], ignore_index=True)
    return rows, preds


def evaluate(model: nn.Module, shards: Sequence, *, size: int, batch_size: int = 128, device="auto",
             pooled: bool = True) -> tuple[list[dict], pd.DataFrame]:
    """Metrics of ``model`` on each shard (``eval_on`` = the shard's name) and on all together
    (``pooled``); plus one row per image (eval_on, image id, label, prediction, probability of the
    true class) for paired statistics. Images sharing a cache are predicted in one pass
    (:func:`predict_shards`, then :func:`score`)."""
    probs = predict_shards(model, shards, size=size, batch_size=batch_size, device=device)
    return score(shards, probs, model.num_classes, pooled)
