"""Label-free BatchNorm restore (paper section 3.5, "recalibrate"): recompute running statistics.

:func:`recalibrate_bn` resets every BatchNorm's running statistics and sets ``momentum=None``
(cumulative average over batches), then runs forward passes in train mode without gradients over each
hospital's batches in turn. Fed the same batches it equals ``torch.optim.swa_utils.update_bn`` over their
concatenation. Only images leave a hospital's loader; no labels, no gradients.

:func:`fold_bn` is for inference only: a copy of a network in which each BatchNorm that reads a
convolution's output is folded into that convolution (in eval mode a BatchNorm is an affine map per
channel). It computes the same function up to float rounding, with one pass over each activation fewer.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from dvlib import device as hw  # work counters ("device" names the torch.device here)
from dvlib.io import DvlibError

__all__ = ["recalibrate_bn", "bn_modules", "fold_bn"]


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
        hw.count_work("recalibration", sum(counts), nb)
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


FOLD_RTOL = 1e-2  # folded against unfolded logits on the example, relative to the largest: a wrong fold is O(1)


class _AfterNorm(nn.Module):
    """What a folded BatchNorm still does after its affine map: timm's BatchNormAct2d drop and act."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _conv_bn_pairs(net: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Names of (convolution, BatchNorm) pairs in which the BatchNorm's input is the very tensor the
    convolution returned, seen in one forward pass of ``example`` (each module called once in it)."""
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    fed: list[tuple[nn.Module, nn.Module]] = []

    def after_conv(m, _inp, out):
        calls[m] = calls.get(m, 0) + 1
        produced[id(out)] = (m, out)  # the tensor is kept, so its id is not reused during the pass

    def before_bn(m, inp):
        calls[m] = calls.get(m, 0) + 1
        conv, out = produced.get(id(inp[0]), (None, None))
        if out is inp[0]:
            fed.append((conv, m))

    names = {m: n for n, m in net.named_modules()}
    hooks = [m.register_forward_hook(after_conv) for m in names if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_bn) for m in bn_modules(net) if isinstance(m, nn.BatchNorm2d)]
    try:
        net(example)
    finally:
        for h in hooks:
            h.remove()
    return [(names[c], names[b]) for c, b in fed if calls[c] == 1 and calls[b] == 1 and c.out_channels == b.num_features]


def _fold(net: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each named BatchNorm of ``net`` into its named convolution, in place."""
    for conv_name, bn_name in pairs:
        conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
        s = (bn.weight.double() if bn.affine else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)
        w = conv.weight.double() * s.view(-1, *([1] * (conv.weight.dim() - 1)))
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
        b = (b - bn.running_mean.double()) * s + (bn.bias.double() if bn.affine else 0.0)
        fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        conv.weight = nn.Parameter(w.to(conv.weight.dtype).contiguous(memory_format=fmt), requires_grad=False)
        conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
        parent, _, name = bn_name.rpartition(".")
        setattr(net.get_submodule(parent), name, _AfterNorm(bn))


def _structure(model: nn.Module) -> tuple:
    return tuple((n, type(m)) for n, m in model.named_modules())


# network -> (its structure, the pairs checked on it, None if it cannot be folded): the experiment
# evaluates many weights through one network, and finding and checking pairs costs two forward passes
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def fold_bn(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """(a copy of ``model`` in eval mode with BatchNorms folded into the convolutions they follow,
    how many were folded); ``model`` is left as it is.

    Per output channel, with s = gamma / sqrt(running_var + eps): w' = w * s and
    b' = (b - running_mean) * s + beta, computed in float64. Pairs are found by running ``example``
    (one batch of the model's input) and folding only a BatchNorm whose input is the tensor a
    convolution returned (one image is enough; every convolution's output is kept during that pass).
    The copy is checked on ``example``: if its logits differ from the model's by more than
    ``FOLD_RTOL`` of the largest one (a convolution's output also read elsewhere, say), nothing is
    folded: ``model`` itself is returned, in eval mode, with 0. (The check sees what ``example``
    and these weights show: a BatchNorm near the identity hides a second reader.) Pairs found and
    checked once are reused for later weights of the same network, as long as its modules are the same.
    """
    structure = _structure(model)
    seen, pairs = _CHECKED.get(model, (None, None))
    if seen != structure:
        pairs = _checked_pairs(model, example)
        _CHECKED[model] = (structure, pairs)
    if pairs is None:
        return model.eval(), 0
    net = copy.deepcopy(model).eval()
    _fold(net, pairs)
    return net, len(pairs)


def _checked_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]] | None:
    """:func:`_conv_bn_pairs` of ``model``, if folding them keeps its logits on ``example`` within
    ``FOLD_RTOL``; else None."""
    was_training = model.training
    model.eval()
    try:
        ref = model(example).float()
    finally:
        model.train(was_training)
    net = copy.deepcopy(model).eval()
    pairs = _conv_bn_pairs(net, example)
    _fold(net, pairs)
    out = net(example).float()
    ok = torch.isfinite(out).all() and float((out - ref).abs().max()) <= FOLD_RTOL * float(ref.abs().max().clamp_min(1.0))
    return pairs if ok else None
