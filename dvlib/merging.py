"""Merging fine-tuned state dicts of one architecture (paper sections 3.3-3.4 and the baselines of 4.2).

``merge(pretrained, finetuned, method=...)`` returns a full state dict. Keys are handled by kind
(:mod:`dvlib.vectors`):

- PARAM keys: by ``method`` (registry :data:`METHODS`, one function per method, all with the signature
  ``(pretrained, finetuned, *, kinds, lam, seed, weights, **opts) -> {PARAM key: merged tensor}``).
- HEAD keys: averaged over the fine-tuned models (weighted by ``weights`` for ``weighted``); the new head
  has no pretrained value (paper 4.1).
- BN_STAT keys: by ``bn_buffers``: ``"mean"`` (average of the models' buffers, weighted for
  ``weighted``), ``"pretrained"`` (copied), ``"arithmetic"`` (the method's own formula, as if they were
  weights; kept to show the failure: a non-positive ``running_var`` raises unless
  ``allow_negative_var=True``).
- COUNTER keys: max over the fine-tuned models (the pretrained value with ``bn_buffers="pretrained"``),
  same integer dtype.

Methods and what ``lam`` means for each (with ``tau_i = theta_i - theta_pre``):

- ``data_vector`` (the paper): ``theta_pre + lam * sum_i tau_i``; paper default ``lam = 0.5``.
- ``params_mean`` ("Params Mean"): ``mean_i theta_i``; ``lam`` ignored.
- ``weighted``: ``sum_i w_i theta_i`` with ``w = weights / sum(weights)`` (e.g. sample counts);
  ``lam`` ignored.
- ``random_vector`` (the paper's control): each ``tau_i`` replaced, key by key, by Gaussian noise with the
  same per-key L2 norm; then ``theta_pre + lam * sum``. See :func:`random_vectors`.
- ``ties`` (Yadav et al. 2023): trim each ``tau_i`` to its top ``density`` fraction by magnitude,
  elect a sign per element (sign of the sum of trimmed values), disjoint mean over entries agreeing with
  it; ``theta_pre + lam * merged``. Note ``lam`` scales a *mean* here, so ``lam = 1`` is the TIES paper's
  setting (pass ``lam=1.0``); the default 0.5 halves it. Options: ``density`` (0.2),
  ``scope`` (``"per_key"``: top-k per tensor, like mergekit, the default; ``"global"``: per model over all
  PARAM keys together, like the TIES reference code).
- ``dare`` (Yu et al. 2024): drop each element of each ``tau_i`` with probability ``p`` (0.5), rescale
  survivors by ``1 / (1 - p)``; ``theta_pre + lam * sum``.

Randomness (``random_vector``, ``dare``) comes from ``torch.Generator().manual_seed(seed)`` on the CPU,
drawn key by key in state-dict order and, within a key, model by model, in float32.

Arithmetic runs per key in float32 (float64 stays float64; half types are upcast and cast back).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

from dvlib.io import DvlibError
from dvlib.vectors import (BN_STAT, COUNTER, HEAD, PARAM, Kind, StateDict, _check_finite_number,
                           _compat_problems, _prefixes, key_kinds, keys_of, nonfinite_keys)

MethodFn = Callable[..., dict[str, torch.Tensor]]
METHODS: dict[str, MethodFn] = {}
BN_MODES = ("mean", "pretrained", "arithmetic")

__all__ = ["merge", "METHODS", "BN_MODES", "negative_variance_keys", "random_vectors", "params_mean",
           "data_vector", "random_vector", "ties", "dare", "weighted"]


def _register(name: str) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn
    return deco


# ------------------------------------------------------------------------------------------- helpers

def _work(t: torch.Tensor) -> torch.Tensor:
    """The tensor in a dtype fit for accumulation (no copy for float32/float64)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _opts(opts: Mapping[str, Any], defaults: dict[str, Any], method: str) -> dict[str, Any]:
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise DvlibError(f"method {method!r} got unknown option(s) {unknown}; its options: {valid}")
    return {**defaults, **opts}


def _normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        raise DvlibError("method 'weighted' needs weights= (e.g. the hospitals' sample counts), one per model")
    w = list(weights)
    if len(w) != n:
        raise DvlibError(f"weights: got {len(w)} values for {n} fine-tuned models")
    for i, x in enumerate(w):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0:
            raise DvlibError(f"weights[{i}] must be a finite number >= 0, got {x!r}")
    total = float(sum(w))
    if total <= 0:
        raise DvlibError(f"weights must not all be zero, got {w}")
    return [float(x) / total for x in w]


@torch.no_grad()
def _mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """(Weighted) mean of same-shaped tensors, accumulated in float32+, returned in the input dtype."""
    dtype = tensors[0].dtype
    if weights is None:
        acc = _work(tensors[0]).clone()
        for t in tensors[1:]:
            acc.add_(_work(t))
        acc.div_(len(tensors))
    else:
        acc = torch.mul(_work(tensors[0]), weights[0])
        for t, w in zip(tensors[1:], weights[1:]):
            acc.add_(_work(t), alpha=w)
    return acc.to(dtype)


def _tau(ft: torch.Tensor, pre: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.sub(_work(ft), _work(pre), out=out) if out is not None else torch.sub(_work(ft), _work(pre))


def _sum_taus(pretrained: StateDict, finetuned: Sequence[StateDict], key: str, lam: float,
              transform: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """``pre + lam * sum_i f(tau_i)`` for one key, with one scratch buffer (cache friendly)."""
    pre = _work(pretrained[key])
    acc = _tau(finetuned[0][key], pre)
    if transform is not None:
        transform(acc)
    if len(finetuned) > 1:
        tmp = torch.empty_like(acc)
        for ft in finetuned[1:]:
            _tau(ft[key], pre, out=tmp)
            if transform is not None:
                transform(tmp)
            acc.add_(tmp)
    acc.mul_(lam).add_(pre)
    return acc.to(pretrained[key].dtype)


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


# ------------------------------------------------------------------------------------------- methods

@_register("params_mean")
@torch.no_grad()
def params_mean(pretrained: StateDict, finetuned: Sequence[StateDict], *, kinds: Mapping[str, Kind],
                lam: float = 0.5, seed: int = 0, weights: Sequence[float] | None = None,
                **opts: Any) -> dict[str, torch.Tensor]:
    """Uniform average of the fine-tuned models ("Params Mean"); ``lam`` ignored."""
    _opts(opts, {}, "params_mean")
    return {k: _mean([ft[k] for ft in finetuned]) for k in keys_of(kinds, PARAM)}


@_register("data_vector")
@torch.no_grad()
def data_vector(pretrained: StateDict, finetuned: Sequence[StateDict], *, kinds: Mapping[str, Kind],
                lam: float = 0.5, seed: int = 0, weights: Sequence[float] | None = None,
                **opts: Any) -> dict[str, torch.Tensor]:
    """``theta_pre + lam * sum_i (theta_i - theta_pre)`` (the paper's method)."""
    _opts(opts, {}, "data_vector")
    return {k: _sum_taus(pretrained, finetuned, k, float(lam)) for k in keys_of(kinds, PARAM)}


def _random_like(tau: torch.Tensor, gen: torch.Generator) -> None:
    """Replace ``tau`` in place by seeded Gaussian noise with the same L2 norm."""
    norm = torch.linalg.vector_norm(tau, dtype=torch.float64)
    g = torch.randn(tau.shape, generator=gen, dtype=torch.float32)
    gnorm = torch.linalg.vector_norm(g, dtype=torch.float64)
    if float(gnorm) > 0:
        g = (g.double() * (norm / gnorm)).to(tau.dtype)
    tau.copy_(g)


@torch.no_grad()
def random_vectors(pretrained: StateDict, finetuned: Sequence[StateDict], *, kinds: Mapping[str, Kind],
                   seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The random stand-ins for each ``tau_i`` that ``random_vector`` sums (same norms per key)."""
    gen = torch.Generator().manual_seed(int(seed))
    out: list[dict[str, torch.Tensor]] = [{} for _ in finetuned]
    for k in keys_of(kinds, PARAM):
        for i, ft in enumerate(finetuned):
            tau = _tau(ft[k], pretrained[k])
            _random_like(tau, gen)
            out[i][k] = tau
    return out


@_register("random_vector")
@torch.no_grad()
def random_vector(pretrained: StateDict, finetuned: Sequence[StateDict], *, kinds: Mapping[str, Kind],
                  lam: float = 0.5, seed: int = 0, weights: Sequence[float] | None = None,
                  **opts: Any) -> dict[str, torch.Tensor]:
    """``theta_pre + lam * sum_i r_i``, ``r_i`` Gaussian with the per-key norms of ``tau_i`` (paper's control)."""
    _opts(opts, {}, "random_vector")
    gen = torch.Generator().manual_seed(int(seed))
    return {k: _sum_taus(pretrained, finetuned, k, float(lam), lambda t: _random_like(t, gen))
            for k in keys_of(kinds, PARAM)}


@_register("dare")
@torch.no_grad()
def dare(pretrained: StateDict, finetuned: Sequence[StateDict], *, kinds: Mapping[str, Kind],
         lam: float = 0.5, seed: int = 0, weights: Sequence[float] | None = None,
         **opts: Any) -> dict[str, torch.Tensor]:
    """DARE: keep each element of each ``tau_i`` where ``torch.rand(...) >= p`` (seeded), rescale by
    ``1 / (1 - p)``; ``theta_pre + lam * sum``. Option ``p`` (drop probability, default 0.5)."""
    p = _opts(opts, {"p": 0.5}, "dare")["p"]
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise DvlibError(f"dare: drop probability p must be in [0, 1), got {p!r}")
    p = float(p)
    gen = torch.Generator().manual_seed(int(seed))

    def drop(t: torch.Tensor) -> None:
        keep = torch.rand(t.shape, generator=gen, dtype=torch.float32) >= p
        t.mul_(keep.to(t.device)).div_(1.0 - p)

    return {k: _sum_taus(pretrained, finetuned, k, float(lam), drop) for k in keys_of(kinds, PARAM)}


def _ties_threshold(abs_rows: torch.Tensor, density: float) -> torch.Tensor:
    """Per row, the k-th largest value, ``k = ceil(density * n)`` (at least 1); shape (rows, 1)."""
    n = abs_rows.shape[1]
    k = min(n, max(1, math.ceil(round(density * n, 6))))
    return abs_rows.kthvalue(n - k + 1, dim=1, keepdim=True).values


def _ties_trim_elect(taus: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trimmed taus (rows below their threshold zeroed) and the elected sign per column (0 if tied)."""
    trimmed = taus * (taus.abs() >= thr)
    return trimmed, torch.sign(trimmed.sum(0))


def _ties_disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    agree = trimmed * sign > 0  # same non-zero sign as elected; nothing agrees with a 0 sign
    total = (trimmed * agree).sum(0)
    return total / agree.sum(0).clamp(min=1).to(total.dtype)


@_register("ties")
@torch.no_grad()
def ties(pretrained: StateDict, finetuned: Sequence[StateDict], *, kinds: Mapping[str, Kind],
         lam: float = 0.5, seed: int = 0, weights: Sequence[float] | None = None,
         **opts: Any) -> dict[str, torch.Tensor]:
    """TIES-merging: trim (top ``density`` by magnitude, ties at the threshold kept), elect sign (sign of
    the sum of trimmed values; a zero sum takes the majority of the elected signs in the scope, as in
    the reference code), disjoint mean; ``theta_pre + lam * merged``. Options ``density`` (0.2) and
    ``scope`` (``"per_key"`` | ``"global"``)."""
    o = _opts(opts, {"density": 0.2, "scope": "per_key"}, "ties")
    density, scope = o["density"], o["scope"]
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
        raise DvlibError(f"ties: density must be in (0, 1], got {density!r}")
    if scope not in ("per_key", "global"):
        raise DvlibError(f"ties: scope must be 'per_key' or 'global', got {scope!r}")
    keys = keys_of(kinds, PARAM)
    lam = float(lam)

    def finish(k: str, merged: torch.Tensor) -> torch.Tensor:
        pre = _work(pretrained[k])
        return torch.add(pre, merged.view(pre.shape), alpha=lam).to(pretrained[k].dtype)

    def stacked(k: str) -> torch.Tensor:
        return torch.stack([_tau(ft[k], pretrained[k]).reshape(-1) for ft in finetuned])

    out: dict[str, torch.Tensor] = {}
    if scope == "per_key":
        for k in keys:
            taus = stacked(k)
            trimmed, sign = _ties_trim_elect(taus, _ties_threshold(taus.abs(), float(density)))
            sign[sign == 0] = torch.sign(sign.sum())
            out[k] = finish(k, _ties_disjoint_mean(trimmed, sign))
        return out
    if not keys:
        return out
    taus = {k: stacked(k) for k in keys}
    thr = _ties_threshold(torch.cat([t.abs() for t in taus.values()], dim=1), float(density))
    elected = {k: _ties_trim_elect(t, thr) for k, t in taus.items()}
    majority = torch.sign(sum(s.sum() for _, s in elected.values()))
    for k, (trimmed, sign) in elected.items():
        sign[sign == 0] = majority
        out[k] = finish(k, _ties_disjoint_mean(trimmed, sign))
    return out


@_register("weighted")
@torch.no_grad()
def weighted(pretrained: StateDict, finetuned: Sequence[StateDict], *, kinds: Mapping[str, Kind],
             lam: float = 0.5, seed: int = 0, weights: Sequence[float] | None = None,
             **opts: Any) -> dict[str, torch.Tensor]:
    """``sum_i w_i theta_i``, ``w = weights / sum(weights)`` (required, e.g. sample counts); ``lam`` ignored."""
    _opts(opts, {}, "weighted")
    w = _normalize_weights(weights, len(finetuned))
    return {k: _mean([ft[k] for ft in finetuned], w) for k in keys_of(kinds, PARAM)}


# ----------------------------------------------------------------------------------------- entry point

def _pretrained_problems(pretrained: StateDict, ref: StateDict, ref_name: str,
                         prefixes: tuple[str, ...], head_keys: set[str]) -> list[str]:
    """The pretrained state dict against the first fine-tuned one, head keys ignored."""
    skip = lambda k: k in head_keys or k.startswith(prefixes)  # noqa: E731
    problems = [f"pretrained: missing key '{k}' (present in {ref_name})" for k in ref
                if not skip(k) and k not in pretrained]
    problems += [f"pretrained: extra key '{k}' (not in {ref_name})" for k in pretrained
                 if not skip(k) and k not in ref]
    common = {}
    for k, t in pretrained.items():
        if skip(k) or k not in ref:
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"pretrained: key '{k}' is not a tensor ({type(t).__name__})")
            continue
        common[k] = t
        r = ref[k]
        if t.shape != r.shape:
            problems.append(f"pretrained: key '{k}' has shape {tuple(t.shape)}, {ref_name} has {tuple(r.shape)}")
        if t.dtype != r.dtype:
            problems.append(f"pretrained: key '{k}' has dtype {t.dtype}, {ref_name} has {r.dtype}")
    problems += [f"pretrained: key '{k}' holds {what}" for k, what in nonfinite_keys(common).items()]
    return problems


@torch.no_grad()
def merge(pretrained: StateDict, finetuned: Sequence[StateDict], method: str = "data_vector",
          lam: float = 0.5, bn_buffers: str = "mean", seed: int = 0, weights: Sequence[float] | None = None,
          head_prefixes: str | Sequence[str] = ("head.",), kinds: Mapping[str, Kind] | None = None,
          **opts: Any) -> dict[str, torch.Tensor]:
    """Merge fine-tuned state dicts into one full state dict (keys and dtypes of the fine-tuned models).

    ``kinds`` defaults to :func:`dvlib.vectors.key_kinds` by name with ``head_prefixes``. Extra options:
    the method's own (``density``/``scope`` for ties, ``p`` for dare), ``allow_negative_var`` (with
    ``bn_buffers="arithmetic"``: warn instead of raising), ``names`` (labels for the fine-tuned models
    in error messages, e.g. file paths) and ``report`` (a dict, filled with what was done).
    """
    report = opts.pop("report", None)
    allow_negative_var = bool(opts.pop("allow_negative_var", False))
    names = opts.pop("names", None)
    if method not in METHODS:
        raise DvlibError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if bn_buffers not in BN_MODES:
        raise DvlibError(f"unknown bn_buffers {bn_buffers!r}; valid: {', '.join(BN_MODES)}")
    _check_finite_number(lam, "lam")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DvlibError(f"seed must be an integer, got {seed!r}")
    if isinstance(finetuned, Mapping):
        raise DvlibError("finetuned must be a list of state dicts, got a single state dict")
    finetuned = list(finetuned)
    if not finetuned:
        raise DvlibError("need at least 1 fine-tuned state dict to merge, got 0")
    names = [f"finetuned[{i}]" for i in range(len(finetuned))] if names is None else [str(n) for n in names]
    if len(names) != len(finetuned):
        raise DvlibError(f"names: {len(names)} names for {len(finetuned)} fine-tuned state dicts")
    if weights is not None and method != "weighted":
        raise DvlibError(f"weights are only used by method 'weighted', not {method!r}")
    w = _normalize_weights(weights, len(finetuned)) if method == "weighted" else None
    prefixes = _prefixes(head_prefixes)
    ref = finetuned[0]
    kinds = key_kinds(ref, head_prefixes=prefixes) if kinds is None else dict(kinds)
    problems = [f"kinds: no kind for key '{k}'" for k in ref if k not in kinds]
    problems += [f"kinds: key '{k}' is not in {names[0]}" for k in kinds if k not in ref]
    problems += _compat_problems(finetuned, names)
    problems += _pretrained_problems(pretrained, ref, names[0], prefixes, set(keys_of(kinds, HEAD)))
    if problems:
        raise DvlibError(f"cannot merge ({len(problems)} problems):\n  - " + "\n  - ".join(problems))

    fn = METHODS[method]
    merged: dict[str, torch.Tensor] = fn(pretrained, finetuned, kinds=kinds, lam=lam, seed=seed, weights=w, **opts)
    merged.update({k: _mean([ft[k] for ft in finetuned], w) for k in keys_of(kinds, HEAD)})
    bn_keys, counter_keys = keys_of(kinds, BN_STAT), keys_of(kinds, COUNTER)
    if bn_buffers == "mean":
        bn = {k: _mean([ft[k] for ft in finetuned], w) for k in bn_keys}
    elif bn_buffers == "pretrained":
        bn = {k: pretrained[k].detach().clone() for k in bn_keys}
    else:
        bn = fn(pretrained, finetuned, kinds={k: PARAM for k in bn_keys}, lam=lam, seed=seed, weights=w, **opts)
    negative = negative_variance_keys(bn)
    if negative:
        lines = [f"{k}: min {v:.6g}" for k, v in negative.items()]
        msg = (f"bn_buffers={bn_buffers!r} with method {method!r} gives negative running_var in "
               f"{len(negative)} BatchNorm layer(s):\n  - " + "\n  - ".join(lines))
        if not allow_negative_var:
            raise DvlibError(msg + "\nuse bn_buffers='mean' or 'pretrained' (then restore BN statistics), "
                                   "or pass allow_negative_var=True to keep them")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    merged.update(bn)
    for k in counter_keys:
        if bn_buffers == "pretrained":
            merged[k] = pretrained[k].detach().clone()
        else:
            merged[k] = torch.stack([ft[k].detach() for ft in finetuned]).amax(0)
    if report is not None:
        report.update({"method": method, "lam": float(lam), "bn_buffers": bn_buffers, "seed": int(seed),
                       "n_models": len(finetuned), "weights": w, "options": dict(opts),
                       "negative_variance": negative,
                       "keys": {kd.value: len(keys_of(kinds, kd)) for kd in Kind}})
    return {k: merged[k] for k in ref}
