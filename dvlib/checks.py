"""Problem collectors: every check returns readable lines, and :func:`fail` raises them all at once.

One place for the validation that every path passes (state dicts, numbers, metadata), in the habit
of fusion_bench's shared validator: a user sees every problem of an input in one message.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from dvlib.io import DvlibError

StateDict = Mapping[str, torch.Tensor]


def fail(problems: Iterable[str], header: str) -> None:
    """Raise one :class:`DvlibError` listing every problem (nothing if there is none)."""
    problems = list(problems)
    if problems:
        raise DvlibError(f"{header} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - "
                         + "\n  - ".join(problems))


def finite_number(x: Any, what: str, low: float | None = None, high: float | None = None) -> float:
    """``x`` as a float, or a DvlibError naming ``what`` (booleans, NaN/Inf, out of [low, high])."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise DvlibError(f"{what} must be a finite number, got {x!r}")
    if (low is not None and x < low) or (high is not None and x > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise DvlibError(f"{what} must be in {bounds}, got {x!r}")
    return float(x)


def integer(x: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise DvlibError(f"{what} must be an integer, got {x!r}")
    if low is not None and x < low:
        raise DvlibError(f"{what} must be >= {low}, got {x!r}")
    if high is not None and x > high:
        raise DvlibError(f"{what} must be <= {high}, got {x!r}")
    return int(x)


MAX_SEED = 2**31 - 1        # split seeds also seed scikit-learn (< 2**32, plus per-hospital offsets)
MAX_BUILD_SEED = 2**63 - 1  # torch.manual_seed
MAX_IMAGE_SIZE = 4096       # a crop side; larger would decode every image at that size
MAX_COUNT = 2**53           # exact as a float
MAX_NAME = 200              # class names and site labels


def label_problem(value: Any, what: str, max_len: int = MAX_NAME) -> str | None:
    """Why ``value`` is not a printable name (a class or site label), or None."""
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string, got {value!r}"
    if len(value) > max_len:
        return f"{what} must be at most {max_len} characters, got {len(value)}"
    if any(not ch.isprintable() for ch in value):
        return f"{what} must be printable (no control characters), got {value!r}"
    return None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (the same spelling resolved, or a link to it)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def distinct_outputs(outputs: Mapping[str, str | os.PathLike | None],
                     inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse a command whose output would replace one of its inputs, or another of its outputs.

    ``outputs``/``inputs``: ``{what: path}`` (e.g. ``{"--out": ..., "--save-split": ...}``); None skipped."""
    outs = [(w, Path(p)) for w, p in outputs.items() if p is not None]
    ins = [(w, Path(p)) for w, p in inputs.items() if p is not None]
    problems = []
    for i, (w, out) in enumerate(outs):
        for wi, inp in ins:
            if same_file(out, inp):
                problems.append(f"{out}: {w} is also the input {wi} ({inp}); it would be overwritten, "
                                "write to another file")
        for w2, other in outs[i + 1:]:
            if same_file(out, other):
                problems.append(f"{out}: {w} and {w2} are the same file")
    if problems:
        raise DvlibError(problems[0] if len(problems) == 1 else
                         "outputs collide:\n  - " + "\n  - ".join(problems))


@torch.no_grad()
def nonfinite_keys(state_dict: StateDict) -> dict[str, str]:
    """``{key: "3 NaN, 1 Inf"}`` for floating tensors holding NaN/Inf (a float64-sum screen first)."""
    keys = [k for k, t in state_dict.items() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not keys:
        return {}
    sums = torch.stack([state_dict[k].detach().sum(dtype=torch.float64).cpu() for k in keys])
    out = {}
    for k, ok in zip(keys, torch.isfinite(sums).tolist()):
        if ok:  # a float64 sum of finite float32/16 values cannot overflow, so this is exact
            continue
        t = state_dict[k].detach()
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if n_nan or n_inf:  # float64 tensors can overflow the screen without holding NaN/Inf
            out[k] = ", ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if s)
    return out


def finite_problems(state_dict: StateDict, name: str, word: str = "key ") -> list[str]:
    """``"<name>: key '<k>' holds 2 NaN"`` for every tensor holding NaN/Inf (``word``: before the key)."""
    return [f"{name}: {word}'{k}' holds {what}" for k, what in nonfinite_keys(state_dict).items()]


def layout_problems(state_dicts: Sequence[StateDict], names: Sequence[str],
                    skip: frozenset[str] = frozenset()) -> list[str]:
    """Every key, tensor type, shape and dtype mismatch of each state dict against the first."""
    problems: list[str] = []
    ref, ref_name = state_dicts[0], names[0]
    for sd, name in zip(state_dicts, names):
        bad = {k for k, t in sd.items() if not isinstance(t, torch.Tensor)}
        problems += [f"{name}: '{k}' is not a tensor ({type(sd[k]).__name__})" for k in sorted(bad)]
        if sd is ref:
            continue
        problems += [f"{name}: missing key '{k}' (present in {ref_name})" for k in ref if k not in sd and k not in skip]
        problems += [f"{name}: extra key '{k}' (not in {ref_name})" for k in sd if k not in ref and k not in skip]
        for k, t in sd.items():
            r = ref.get(k)
            if k in skip or k in bad or not isinstance(r, torch.Tensor):
                continue
            if t.shape != r.shape:
                problems.append(f"{name}: key '{k}' has shape {tuple(t.shape)}, {ref_name} has {tuple(r.shape)}")
            if t.dtype != r.dtype:
                problems.append(f"{name}: key '{k}' has dtype {t.dtype}, {ref_name} has {r.dtype}")
    return problems


def negative_variance_keys(state_dict: StateDict) -> dict[str, float]:
    """``{key: min value}`` for every ``*.running_var`` holding a negative value (or NaN).

    Exactly zero is allowed: pretrained networks have dead channels (EfficientNet-Lite0's ImageNet
    weights have zero running variances in 28 BatchNorm layers), and eps keeps them finite."""
    out = {}
    for k, t in state_dict.items():
        if k.rsplit(".", 1)[-1] == "running_var" and t.numel():
            lo = float(t.detach().min())
            if not lo >= 0:
                out[k] = lo
    return out


def bare_name(value: Any, what: str) -> str:
    """A file name with no folder part: metadata may name a file, never a path to open."""
    s = value if isinstance(value, str) else ""
    if (not s or s in (".", "..") or "/" in s or "\\" in s or "\x00" in s or s.startswith("~")
            or len(s) > 255 or not s.isprintable()):
        shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:120] + "..."
        raise DvlibError(f"{what} must be a bare file name (no folders), got {shown}")
    return s
