"""Fine-tuning and evaluation: :func:`fit` and :func:`predict`.

Adam, weighted cross-entropy (inverse class frequency of the hospital's training split, :func:`class_weights`),
batched augmentation (:mod:`dvlib.loader`), seeded. Where and how the network runs (device, channels_last,
autocast, BatchNorm folded for evaluation, ``torch.compile``) is :mod:`dvlib.device`'s, one ``hw.`` line
where each is used. :func:`fit` never waits for the device while training: losses are summed on the
device and epochs timed with CUDA events, all read back once at the end.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from dvlib import device as hw  # the device policy and speed knobs ("device" names the torch.device here)
from dvlib.bn import fold_bn
from dvlib.io import DvlibError
from dvlib.loader import ImageCache, batches


def class_weights(labels, num_classes: int, allow_missing: bool = False) -> torch.Tensor:
    """w_c = n / (C * n_c) (inverse class frequency, mean 1 over a balanced set).

    A class with no samples gets an error, or weight 0 with ``allow_missing``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any() and not allow_missing:
        raise DvlibError(f"class index(es) {np.flatnonzero(counts == 0).tolist()} have no training samples; "
                         "weighted cross-entropy needs every class")
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                   device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """Adam; the fused (single-kernel) implementation on CUDA."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


class _EpochClock:
    """Epoch durations without host synchronisation: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))  # the device trained on, not the current one
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Durations between consecutive marks (waits for the last CUDA event)."""
        if self.cuda and self.marks:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def fit(model: nn.Module, cache: ImageCache, rows: torch.Tensor, labels: torch.Tensor, *, epochs: int,
        batch_size: int, lr: float, size: int, seed: int, device: torch.device | str = "auto",
        weight_decay: float = 0.0, class_weight: torch.Tensor | None = None, progress: bool = True,
        desc: str = "train", compile: bool | str | None = None) -> list[dict]:
    """Fine-tune ``model`` in place on ``rows`` of ``cache``; returns per-epoch loss and throughput.

    No host synchronisation until the last epoch has been queued: per-epoch losses stay on the device
    and are read back together at the end (on a CPU they are shown in the progress bar as they come).
    ``compile`` (default: ``$DVLIB_COMPILE``; see :func:`dvlib.device.compile_mode`) trains through
    ``torch.compile(model, mode=...)``, which shares ``model``'s parameters; the first batches of each
    new shape pay the compilation.
    """
    device = hw.resolve_device(device)
    if len(rows) == 0:
        raise DvlibError(f"{desc}: no training images")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    hw.prepare(model, device)
    model.train()
    net, graphs = hw.training_net(model, compile, device)
    opt = make_optimizer(model, lr, weight_decay, device)
    crit = nn.CrossEntropyLoss(weight=None if class_weight is None else class_weight.to(device))
    totals, counts = [], []
    clock = _EpochClock(device)
    clock.mark()
    from dvlib.progress import Bar

    bar = Bar(epochs, desc, enabled=progress)
    for _ in range(epochs):
        total = torch.zeros((), device=device)
        n = 0
        for x, y in batches(cache, rows, labels, batch_size, size, train=True, generator=gen, device=device,
                            channels_last=hw.use_channels_last(device), drop_last=True):
            if graphs:  # a new training step: the previous replay's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with hw.autocast(device):
                loss = crit(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(y)
            n += len(y)
        clock.mark()
        hw.count_work("train", n, -(-n // batch_size))
        totals.append(total)
        counts.append(n)
        if progress and device.type != "cuda":  # free on a CPU; on a GPU it would wait every epoch
            dt = clock.marks[-1] - clock.marks[-2]
            bar.step(loss=float(total) / max(n, 1), img_per_s=round(n / dt) if dt > 0 else 0)
        elif progress:
            bar.step()
    bar.close()
    seconds = clock.seconds()
    losses = torch.stack(totals).tolist() if totals else []  # the one read-back
    history = []
    for epoch, (tot, n, dt) in enumerate(zip(losses, counts, seconds)):
        history.append({"epoch": epoch + 1, "loss": tot / max(n, 1), "images": n, "seconds": dt,
                        "img_per_s": n / dt if dt > 0 else float("nan")})
    model.eval()
    return history


def predict(model: nn.Module, cache: ImageCache, rows: torch.Tensor, *, size: int, batch_size: int = 256,
            device: torch.device | str = "auto", fold: bool | None = None) -> np.ndarray:
    """Class probabilities [N, C] (centre crop, eval mode); ``fold`` (default :func:`dvlib.device.use_folded_bn`):
    through a copy with BatchNorm folded into the convolutions."""
    device = hw.resolve_device(device)
    # outside inference mode: moving the model to a GPU makes new parameter tensors, which inference
    # mode would mark as inference tensors (no later load_state_dict, training or BN recalibration)
    hw.prepare(model, device)
    model.eval()
    net = model
    if (hw.use_folded_bn(device) if fold is None else fold) and len(rows):
        example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        if hw.use_channels_last(device):
            example = example.contiguous(memory_format=torch.channels_last)
        net, _ = fold_bn(model, example)  # a copy: the model's own weights are never changed
    outs = []
    with torch.inference_mode():
        for x, _ in batches(cache, rows, None, batch_size, size, train=False, device=device,
                            channels_last=hw.use_channels_last(device)):
            with hw.autocast(device):
                outs.append(net(x).float())
        hw.count_work("forward", len(rows), len(outs))
        if not outs:
            return np.zeros((0, getattr(model, "num_classes", 0)), np.float32)
        return torch.cat(outs).softmax(-1).cpu().numpy()
