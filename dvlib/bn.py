"""Label-free BatchNorm restore (paper section 3.5, "recalibrate"): recompute running statistics.

:func:`recalibrate_bn` resets every BatchNorm's running statistics and sets ``momentum=None``
(cumulative average over batches), then runs forward passes in train mode without gradients over each
hospital's batches in turn. Fed the same batches it equals ``torch.optim.swa_utils.update_bn`` over their
concatenation. Only images leave a hospital's loader; no labels, no gradients.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from dvlib.io import DvlibError

__all__ = ["recalibrate_bn", "bn_modules"]


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm modules that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _images(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise DvlibError(f"recalibrate_bn: a batch must be a tensor or an (x, y) tuple, got {type(batch).__name__}")
    return x


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batch_iterables: Sequence[Iterable[Any]],
                   device: torch.device | str | None = None, reset: bool = True) -> list[int]:
    """Recompute BatchNorm running statistics from ``batch_iterables`` (one per hospital), in place.

    Batches are tensors or ``(x, y, ...)`` tuples (only ``x`` is used), moved to ``device`` if given.
    Momenta, per-module train/eval flags are restored afterwards; if anything fails (or no image is
    seen) the original statistics are put back and the error re-raised. Returns images seen per iterable.
    A model without BatchNorm is left as is (zeros returned, iterables not consumed).
    ``reset=False`` continues the cumulative average from ``num_batches_tracked`` instead of starting
    afresh (a later hospital adding its images to statistics gathered elsewhere).
    """
    iterables = list(batch_iterables)
    bns = bn_modules(model)
    if not bns:
        return [0] * len(iterables)
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(),
              None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    modes = [(m, m.training) for m in model.modules()]
    counts: list[int] = []
    nb = 0
    ok = False
    try:
        for m in bns:
            if reset:
                m.reset_running_stats()
            m.momentum = None
        model.train()
        for it in iterables:
            n = 0
            for batch in it:
                x = _images(batch)
                if device is not None:
                    x = x.to(device)
                model(x)
                n += int(x.shape[0])
                nb += 1
            counts.append(n)
        if sum(counts) == 0:
            raise DvlibError("recalibrate_bn: no images in any of the "
                             f"{len(iterables)} batch iterable(s); BatchNorm statistics left unchanged")
        ok = True
        from dvlib.train import count_work

        count_work("recalibration", sum(counts), nb)
    finally:
        for m, (momentum, mean, var, nbt) in zip(bns, saved):
            m.momentum = momentum
            if not ok:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)
        for m, training in modes:
            m.training = training
    return counts
