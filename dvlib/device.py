"""Where and how dvlib runs a network: the device, and each speed knob beside its plain twin.

Every knob is one function, read on one line where it is used (``hw.autocast(device)`` in
:func:`dvlib.train.fit`, ``hw.use_channels_last(device)`` in :func:`dvlib.loader.batches`, ...):

- :func:`use_channels_last`: networks and batches channels_last (oneDNN's fast kernels on a CPU);
- :func:`use_folded_bn`: evaluation through a copy with BatchNorm folded into the convolutions;
- :func:`autocast`: bf16 on CUDA, fp32 on a CPU;
- :func:`compile_mode`: ``torch.compile``, opt-in (``DVLIB_COMPILE``).

``DVLIB_PLAIN=1`` (:func:`plain`) turns the first two off (and, in :mod:`dvlib.experiment`, every
cache), for the tests that check each fast path against the plain one. :func:`work` counts the images
this process trained on and ran forward, for compute floors.

Imports only torch and :mod:`dvlib.io` (for :class:`DvlibError`), so that :mod:`dvlib.bn`,
:mod:`dvlib.loader` and :mod:`dvlib.train` can all import it.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from dvlib.io import DvlibError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DvlibError(f"device {device!r} requested but CUDA is not available")
    return dev


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
    """Whether :func:`dvlib.train.predict` runs a copy of the network with BatchNorm folded into the
    convolutions (:func:`dvlib.bn.fold_bn`): the same function up to float rounding, faster on a CPU
    (``bench_train.py --knobs`` measures it); not in the :func:`plain` path."""
    return not plain()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast(device: torch.device | str):
    """The autocast context of every dvlib forward pass on ``device``: bf16 on CUDA, none (fp32) on a
    CPU, where bf16 is slower without native bf16 instructions (``bench_train.py --knobs`` measures
    it)."""
    return _autocast(torch.device(device))


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``, channels_last where :func:`use_channels_last` says so."""
    model.to(device)
    if use_channels_last(device):
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: bool | str | None = None) -> str | None:
    """The ``torch.compile`` mode :func:`dvlib.train.fit` uses, or None for eager. ``value`` None means
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


_WORK = {"train_images": 0, "train_steps": 0, "forward_images": 0, "forward_batches": 0,
         "recalibration_images": 0, "recalibration_batches": 0}


def work() -> dict[str, int]:
    """Images this process has trained on (:func:`dvlib.train.fit`), run forward for predictions
    (:func:`dvlib.train.predict`) and for BatchNorm recalibration (:func:`dvlib.bn.recalibrate_bn`),
    and their batches: what a compute floor counts. Subtract two snapshots to count a stretch of work."""
    return dict(_WORK)


def count_work(kind: str, images: int, batches: int = 1) -> None:
    """Add to :func:`work` (``kind``: ``train``, ``forward`` or ``recalibration``)."""
    _WORK[f"{kind}_images"] += int(images)
    _WORK[f"{kind}_{'steps' if kind == 'train' else 'batches'}"] += int(batches)
