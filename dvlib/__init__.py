"""dvlib: merge medical image classifiers fine-tuned separately at several hospitals.

The method (data vectors, Tian et al.): every hospital fine-tunes the same pretrained CNN, sends
``tau_i = theta_i - theta_pre``; the coordinator forms ``theta_pre + lam * sum(tau_i)`` (new heads
averaged) and restores the BatchNorm state.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "merge", "DvlibError"]

from dvlib.io import DvlibError


def merge(pretrained, finetuned, method="data_vector", lam=0.5, bn_buffers="mean", seed=0, **opts):
    """Merge fine-tuned state dicts of one model; see :func:`dvlib.merging.merge`."""
    from dvlib.merging import merge as _merge

    return _merge(pretrained, finetuned, method=method, lam=lam, bn_buffers=bn_buffers, seed=seed, **opts)
