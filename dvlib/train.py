"""Fine-tuning and evaluation.

Adam, weighted cross-entropy (inverse class frequency of the hospital's training split), batched
GPU-friendly augmentation (:mod:`dvlib.loader`), bf16 autocast + channels_last model on CUDA, fp32 on
CPU, seeded. Networks and batches are channels_last on every device (:func:`use_channels_last`: on a
CPU, oneDNN's channels_last convolutions train EfficientNet-Lite0 about 1.4x and run inference about
2x faster than NCHW). :func:`fit` never waits for the device while training: losses are summed on the
device and epochs timed with CUDA events, all read back once at the end. ``torch.compile`` is opt-in
(``fit(compile=True)`` or ``DVLIB_COMPILE=1``).

:func:`predict` runs a copy of the network with its BatchNorms folded into the convolutions before them
(:func:`dvlib.bn.fold_bn`). ``DVLIB_PLAIN=1`` selects the plain paths (NCHW batches on a CPU, BatchNorm
as it is; in :mod:`dvlib.experiment`, every evaluation recomputed and images decoded in every process),
against which tests check the fast ones.
:func:`work` counts the images this process has trained on and run forward (for compute floors).
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch
from torch import nn

from dvlib.bn import fold_bn
from dvlib.io import DvlibError
from dvlib.loader import ImageCache, batches


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DvlibError(f"device {device!r} requested but CUDA is not available")
    return dev


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


def plain() -> bool:
    """``DVLIB_PLAIN=1``: the plain paths, for checking the fast ones (see the module docstring)."""
    return os.environ.get("DVLIB_PLAIN", "").strip().lower() in ("1", "true", "yes", "on")


def use_channels_last(device: torch.device | str) -> bool:
    """Whether dvlib runs networks channels_last on ``device`` (:func:`prepare` converts the model,
    :func:`dvlib.loader.batches` makes channels_last batches): on every device, on a CPU too, where
    oneDNN's channels_last kernels are the fast ones; not in the :func:`plain` path. Results differ
    from NCHW by float rounding only; a channels_last model gives the same bits whatever the layout
    of its input batches."""
    return torch.device(device).type == "cuda" or not plain()


def use_folded_bn(device: torch.device | str) -> bool:
    """Whether :func:`predict` runs a copy of the network with BatchNorm folded into the convolutions
    (:func:`dvlib.bn.fold_bn`): the same function up to float rounding, 1.2-1.6x faster on 2 CPU cores
    (``bench_train.py --knobs``); not in the :func:`plain` path."""
    return not plain()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast(device: torch.device | str):
    """The autocast context of every dvlib forward pass on ``device``: bf16 on CUDA, none (fp32) on a
    CPU, where bf16 is slower without native bf16 instructions (``bench_train.py --knobs`` measures
    it). For the benchmark's raw step, which must run what :func:`fit` runs."""
    return _autocast(torch.device(device))


_WORK = {"train_images": 0, "train_steps": 0, "forward_images": 0, "forward_batches": 0,
         "recalibration_images": 0, "recalibration_batches": 0}


def work() -> dict[str, int]:
    """Images this process has trained on (:func:`fit`), run forward for predictions
    (:func:`predict`) and for BatchNorm recalibration (:func:`dvlib.bn.recalibrate_bn`), and their
    batches: what a compute floor counts. Subtract two snapshots to count a stretch of work."""
    return dict(_WORK)


def count_work(kind: str, images: int, batches: int = 1) -> None:
    """Add to :func:`work` (``kind``: ``train``, ``forward`` or ``recalibration``)."""
    _WORK[f"{kind}_images"] += int(images)
    _WORK[f"{kind}_{'steps' if kind == 'train' else 'batches'}"] += int(batches)


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``, channels_last where :func:`use_channels_last` says so."""
    model.to(device)
    if use_channels_last(device):
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                   device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """Adam; the fused (single-kernel) implementation on CUDA."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: bool | str | None = None) -> str | None:
    """The ``torch.compile`` mode :func:`fit` uses, or None for eager. ``value`` None means
    ``$DVLIB_COMPILE``; True, "1", "true" mean "default"; False, "", "0" mean eager; "reduce-overhead"
    (CUDA graphs: no per-kernel launch cost, for small batches) and the other torch modes as named."""
    if value is None:
        value = os.environ.get("DVLIB_COMPILE", "")
    if isinstance(value, bool):
        return "default" if value else None
    v = str(value).strip().lower()
    if v in ("", "0", "false", "no", "off", "eager"):
        return None
    if v in ("1", "true", "yes", "on"):
        return "default"
    if v not in COMPILE_MODES:
        raise DvlibError(f"compile mode {value!r} (DVLIB_COMPILE or compile=) is not one of "
                         f"eager, {', '.join(COMPILE_MODES)}")
    return v


def training_net(model: nn.Module, compile: bool | str | None, device: torch.device) -> tuple[nn.Module, bool]:
    """The module a training step calls (``model``, or ``torch.compile(model, mode=...)``, sharing its
    parameters) and whether it replays CUDA graphs, in which case each step must first call
    ``torch.compiler.cudagraph_mark_step_begin()``."""
    mode = compile_mode(compile)
    graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    return (torch.compile(model, mode=mode) if mode else model), graphs


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
    ``compile`` (default: ``$DVLIB_COMPILE``; see :func:`compile_mode`) trains through
    ``torch.compile(model, mode=...)``, which shares ``model``'s parameters; the first batches of each
    new shape pay the compilation.
    """
    device = resolve_device(device)
    if len(rows) == 0:
        raise DvlibError(f"{desc}: no training images")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prepare(model, device)
    model.train()
    net, graphs = training_net(model, compile, device)
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
                            channels_last=use_channels_last(device), drop_last=True):
            if graphs:  # a new training step: the previous replay's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device):
                loss = crit(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(y)
            n += len(y)
        clock.mark()
        count_work("train", n, -(-n // batch_size))
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
    """Class probabilities [N, C] (centre crop, eval mode); ``fold`` (default :func:`use_folded_bn`):
    through a copy with BatchNorm folded into the convolutions."""
    device = resolve_device(device)
    # outside inference mode: moving the model to a GPU makes new parameter tensors, which inference
    # mode would mark as inference tensors (no later load_state_dict, training or BN recalibration)
    prepare(model, device)
    model.eval()
    net = model
    if (use_folded_bn(device) if fold is None else fold) and len(rows):
        example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        if use_channels_last(device):
            example = example.contiguous(memory_format=torch.channels_last)
        net, _ = fold_bn(model, example)  # a copy: the model's own weights are never changed
    outs = []
    with torch.inference_mode():
        for x, _ in batches(cache, rows, None, batch_size, size, train=False, device=device,
                            channels_last=use_channels_last(device)):
            with autocast(device):
                outs.append(net(x).float())
        count_work("forward", len(rows), len(outs))
        if not outs:
            return np.zeros((0, getattr(model, "num_classes", 0)), np.float32)
        return torch.cat(outs).softmax(-1).cpu().numpy()
