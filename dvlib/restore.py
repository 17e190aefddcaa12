"""Restore the model state after merging (paper section 3.5).

Merging moves BatchNorm running statistics away from what the merged weights produce. Modes:

- ``none``: use the merged model as is.
- ``recalibrate`` (label-free, beyond the paper): reset the running statistics and run forward passes
  without gradients over each hospital's training images in turn, with a cumulative average. Hospitals
  share statistics only: no labels, no gradients.
- ``finetune_epoch`` (the paper's section 4.1): one epoch of training on each hospital's data in turn,
  as if the model visited the hospitals one after another.
- ``recalibrate+finetune_epoch``: both, in that order.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from dvlib.bn import recalibrate_bn
from dvlib.io import DvlibError
from dvlib.loader import Shard, batches
from dvlib.train import class_weights, fit, prepare, resolve_device

MODES = ("none", "recalibrate", "finetune_epoch", "recalibrate+finetune_epoch")


def recalibrate(model: nn.Module, shards: Sequence[Shard], *, size: int, batch_size: int = 64,
                device="auto") -> list[int]:
    """Label-free BN restore over every shard's images (centre crops), hospital after hospital."""
    device = resolve_device(device)
    prepare(model, device)
    iters = [(x for x, _ in batches(s.cache, s.rows, None, batch_size, size, train=False, device=device,
                                   channels_last=device.type == "cuda")) for s in shards]
    return recalibrate_bn(model, iters, device=device)


def finetune_epoch(model: nn.Module, shards: Sequence[Shard], *, size: int, batch_size: int, lr: float,
                   seed: int, epochs: int = 1, num_classes: int, device="auto", progress: bool = False) -> list[dict]:
    """Train ``epochs`` epoch(s) at each hospital in turn (fresh Adam at each, its own class weights)."""
    history = []
    for i, s in enumerate(shards):
        cw = class_weights(s.labels.numpy(), num_classes, allow_missing=True)
        h = fit(model, s.cache, s.rows, s.labels, epochs=epochs, batch_size=batch_size, lr=lr, size=size,
                seed=seed + 7919 * (i + 1), device=device, class_weight=cw, progress=progress,
                desc=f"restore@{s.name}")
        history += [{**e, "shard": s.name} for e in h]
    return history


def restore(model: nn.Module, mode: str, shards: Sequence[Shard], *, size: int, batch_size: int, lr: float,
            seed: int, num_classes: int, epochs: int = 1, device="auto", progress: bool = False) -> dict:
    """Apply restore ``mode`` in place; returns a small log (images seen per shard, training loss)."""
    if mode not in MODES:
        raise DvlibError(f"unknown restore mode {mode!r}; valid: {', '.join(MODES)}")
    log: dict = {"mode": mode}
    if mode in ("recalibrate", "recalibrate+finetune_epoch"):
        log["recalibrated_images"] = recalibrate(model, shards, size=size, device=device)
    if mode in ("finetune_epoch", "recalibrate+finetune_epoch"):
        log["history"] = finetune_epoch(model, shards, size=size, batch_size=batch_size, lr=lr, seed=seed,
                                        epochs=epochs, num_classes=num_classes, device=device, progress=progress)
    model.eval()
    return log
