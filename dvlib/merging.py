"""The coordinator's merge: the hospitals' data vectors in, one model's state dict out.

``merge(theta_pre, taus, method)`` runs the registered method (:mod:`dvlib.methods`), applies the
result to the pretrained weights, sets the BatchNorm statistics by ``bn_buffers`` and checks the
output: a merge that overflows (``lam=1e308``) or drives a running variance negative is refused
with the keys named, never written.

``bn_buffers``: ``mean`` (average of the hospitals' statistics; restore them afterwards),
``pretrained`` (the pretrained statistics), ``arithmetic`` (the method's own formula applied to the
statistics as if they were weights; kept to show the failure: negative variances).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch

from dvlib import methods
from dvlib.checks import (StateDict, fail, finite_problems, integer, layout_problems, negative_variance_keys,
                          nonfinite_keys)
from dvlib.io import DvlibError
from dvlib.vectors import COUNTER, HEAD, DataVector, Kind, key_kinds, keys_of

BN_MODES = methods.BN_MODES

__all__ = ["merge", "merge_state_dicts", "BN_MODES"]


def _input_problems(pretrained: StateDict, taus: Sequence[DataVector], names: Sequence[str]) -> list[str]:
    problems = layout_problems([t.tensors for t in taus], names)
    ref = taus[0]
    problems += [f"{n}: '{k}' is a {t.kinds[k].value} here, a {ref.kinds[k].value} in {names[0]}"
                 for t, n in zip(taus[1:], names[1:]) for k in t.kinds if k in ref.kinds and t.kinds[k] != ref.kinds[k]]
    for t, n in zip(taus, names):
        problems += finite_problems(t.tensors, n)
    body = {k for k, kd in ref.kinds.items() if kd != HEAD}
    problems += [f"pretrained: missing key '{k}' (present in {names[0]})" for k in body if k not in pretrained]
    problems += [f"pretrained: extra key '{k}' (not in {names[0]})" for k in pretrained if k not in ref.kinds]
    problems += [f"pretrained: key '{k}' has shape {tuple(pretrained[k].shape)}, {names[0]} has "
                 f"{tuple(ref.tensors[k].shape)}" for k in body if k in pretrained
                 and pretrained[k].shape != ref.tensors[k].shape]
    problems += finite_problems({k: v for k, v in pretrained.items() if k in body}, "pretrained")
    return problems


@torch.no_grad()
def merge(pretrained: StateDict, taus: Sequence[DataVector], method: str = "data_vector",
          lam: float | None = None, bn_buffers: str = "mean", seed: int = 0,
          weights: Sequence[float] | None = None, names: Sequence[str] | None = None,
          allow_negative_var: bool = False, **opts: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge data vectors onto ``pretrained``; returns (state dict, report of what was done).

    ``lam`` defaults to the method's (0.5 for the data vector, 1.0 for TIES); ``weights`` are for
    ``weighted`` (e.g. sample counts); ``names`` label the vectors in error messages (file names);
    ``allow_negative_var`` keeps negative running variances (``bn_buffers="arithmetic"``) instead of
    refusing them, for the ablation that shows them.
    """
    spec = methods.get(method)
    if bn_buffers not in BN_MODES:
        raise DvlibError(f"unknown bn_buffers {bn_buffers!r}; valid: {', '.join(BN_MODES)}")
    seed = integer(seed, "seed")
    taus = list(taus)
    if not taus:
        raise DvlibError("need at least 1 data vector to merge, got 0")
    names = [f"vector[{i}]" for i in range(len(taus))] if names is None else [str(n) for n in names]
    if len(names) != len(taus):
        raise DvlibError(f"names: {len(names)} names for {len(taus)} data vectors")
    lam, opts = spec.resolve(lam, weights, opts)
    fail(_input_problems(pretrained, taus, names), "cannot merge")
    if bn_buffers == "arithmetic":
        taus = [t.with_bn_moved(pretrained) for t in taus]
    combined = spec.fn(taus, lam=lam, seed=seed, weights=weights, **opts)
    state = combined.apply_to(pretrained)
    kinds = taus[0].kinds
    bn_keys = [k for k in state if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    if bn_buffers == "pretrained":
        state.update({k: pretrained[k].detach().clone() for k in bn_keys + keys_of(kinds, COUNTER)})
    negative = negative_variance_keys(state)
    problems = [f"'{k}' holds {what} (method {method}, lam={lam})" for k, what in nonfinite_keys(state).items()
                if k not in negative]
    fail(problems, "the merged model is not finite; nothing was written")
    if negative:
        header = (f"bn_buffers={bn_buffers!r} with method {method!r} gives negative running_var in BatchNorm layers; "
                  "use --bn-buffers mean or pretrained (bn_buffers=...), then restore the statistics")
        lines = [f"{k}: min {v:.6g}" for k, v in negative.items()]
        if not allow_negative_var:
            fail(lines, header)
        warnings.warn(header + ":\n  - " + "\n  - ".join(lines), RuntimeWarning, stacklevel=2)
    report = {"method": method, "lam": lam, "bn_buffers": bn_buffers, "seed": seed, "n_models": len(taus),
              "weights": methods.normalize_weights(weights, len(taus)) if method == "weighted" else None,
              "options": opts, "negative_variance_layers": len(negative), "negative_variance": negative,
              "keys": {kd.value: len(keys_of(kinds, kd)) for kd in Kind}}
    return state, report


def merge_state_dicts(pretrained: StateDict, finetuned: Sequence[StateDict], method: str = "data_vector",
                      lam: float | None = None, bn_buffers: str = "mean", seed: int = 0,
                      weights: Sequence[float] | None = None, kinds: Mapping[str, Kind] | None = None,
                      head_prefixes: str | Sequence[str] = ("head.",), names: Sequence[str] | None = None,
                      report: dict | None = None, **opts: Any) -> dict[str, torch.Tensor]:
    """:func:`merge` for fine-tuned state dicts (each turned into its data vector first); keys of
    the first fine-tuned state dict, in its order."""
    if isinstance(finetuned, Mapping):
        raise DvlibError("finetuned must be a list of state dicts, got a single state dict")
    finetuned = list(finetuned)
    if not finetuned:
        raise DvlibError("need at least 1 fine-tuned state dict to merge, got 0")
    names = [f"finetuned[{i}]" for i in range(len(finetuned))] if names is None else [str(n) for n in names]
    ref = finetuned[0]
    kinds = key_kinds(ref, head_prefixes=head_prefixes) if kinds is None else dict(kinds)
    problems = [f"kinds: no kind for '{k}'" for k in ref if k not in kinds]
    problems += [f"kinds: '{k}' is not in {names[0]}" for k in kinds if k not in ref]
    problems += layout_problems(finetuned, names)
    problems += [line for ft, n in zip(finetuned, names) for line in finite_problems(ft, n)]
    body = {k: v for k, v in pretrained.items() if kinds.get(k) != HEAD}  # a new head has no pretrained value
    problems += layout_problems([{k: v for k, v in ref.items() if kinds.get(k) != HEAD}, body], [names[0], "pretrained"])
    fail(problems, "cannot merge")
    taus = [DataVector.between(ft, body, kinds) for ft in finetuned]
    state, rep = merge(body, taus, method, lam, bn_buffers, seed, weights, names, **opts)
    if report is not None:
        report.update(rep)
    return {k: state[k] for k in ref}
