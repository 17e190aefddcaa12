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


def __getattr__(name: str):
    # dvlib.merge is dvlib.merging.merge, imported on first use: `import dvlib` stays free of torch
    if name == "merge":
        from dvlib.merging import merge

        return merge
    raise AttributeError(f"module 'dvlib' has no attribute {name!r}")
