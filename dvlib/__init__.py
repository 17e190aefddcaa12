"""dvlib: merge medical image classifiers fine-tuned separately at several hospitals.

The method (data vectors, Tian et al. 2024, arXiv:2408.13038): every hospital fine-tunes the same
pretrained CNN and sends ``tau_i = theta_i - theta_pre`` (:class:`dvlib.vectors.DataVector`); the
coordinator forms ``theta_pre + lam * sum(tau_i)`` (new heads averaged, :mod:`dvlib.merging`) and the
model's BatchNorm state is restored at the hospitals (:mod:`dvlib.restore`).
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "merge", "DvlibError"]

from dvlib.io import DvlibError


def merge(pretrained, finetuned, method="data_vector", lam=None, bn_buffers="mean", seed=0, **opts):
    """Merge fine-tuned state dicts of one model; see :func:`dvlib.merging.merge_state_dicts`."""
    from dvlib.merging import merge_state_dicts

    return merge_state_dicts(pretrained, finetuned, method=method, lam=lam, bn_buffers=bn_buffers, seed=seed, **opts)
