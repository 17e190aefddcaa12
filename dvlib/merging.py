"""The coordinator's merge: the hospitals' data vectors in, one model's state dict out.

``merge(theta_pre, taus, method)`` (also ``dvlib.merge``) runs the registered method
(:mod:`dvlib.methods`), applies the result to the pretrained weights, sets the BatchNorm statistics
by ``bn_buffers`` and checks the output: a merge that overflows (``lam=1e308``) or drives a running
variance negative is refused with the keys named, never written. The inputs are checked where they
are made (:func:`dvlib.files.load_vector`, :meth:`DataVector.from_models`) and by the vectors'
own arithmetic, not again here.

``bn_buffers``: ``mean`` (average of the hospitals' statistics; restore them afterwards),
``pretrained`` (the pretrained statistics), ``arithmetic`` (the method's own formula applied to the
statistics as if they were weights; kept to show the failure: negative variances).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch

from dvlib import methods
from dvlib.checks import StateDict, fail, integer, negative_variance_keys, nonfinite_keys
from dvlib.io import DvlibError
from dvlib.vectors import COUNTER, DataVector, Kind, keys_of

BN_MODES = methods.BN_MODES

__all__ = ["merge", "BN_MODES"]


@torch.no_grad()
def merge(pretrained: StateDict, models: Sequence[DataVector] | Sequence[StateDict], method: str = "data_vector",
          lam: float | None = None, bn_buffers: str = "mean", seed: int = 0,
          weights: Sequence[float] | None = None, names: Sequence[str] | None = None,
          allow_negative_var: bool = False, **opts: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge the hospitals' models onto ``pretrained``; returns (state dict, report of what was done).

    ``models``: their data vectors, or their fine-tuned state dicts (each turned into its vector by
    :meth:`DataVector.from_models`, ``names`` labelling them in its errors, e.g. file names). The
    state dict has ``pretrained``'s keys in its order, then any new head key it lacks. ``lam``
    defaults to the method's (0.5 for the data vector, 1.0 for TIES); ``weights`` are for
    ``weighted`` (e.g. sample counts); ``allow_negative_var`` keeps negative running variances
    (``bn_buffers="arithmetic"``) instead of refusing them, for the ablation that shows them.
    """
    spec = methods.get(method)
    if bn_buffers not in BN_MODES:
        raise DvlibError(f"unknown bn_buffers {bn_buffers!r}; valid: {', '.join(BN_MODES)}")
    seed = integer(seed, "seed")
    lam, opts = spec.resolve(lam, weights, opts)
    models = models if isinstance(models, Mapping) else list(models)  # one state dict alone: refused as such
    taus = (models if models and all(isinstance(m, DataVector) for m in models)
            else DataVector.from_models(models, pretrained, names))
    if bn_buffers == "arithmetic":
        taus = [t.with_bn_moved(pretrained) for t in taus]
    state = spec.fn(taus, lam=lam, seed=seed, weights=weights, **opts).apply_to(pretrained)
    kinds = taus[0].kinds
    if bn_buffers == "pretrained":
        bn_keys = [k for k in state if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
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
