"""Layer-wise cosine similarity of data vectors (the paper's Figure 2).

For each layer key, ``cos(theta - theta_pre, theta_ref - theta_pre)``: how well a model's movement
from the pretrained weights points along the reference's (Full Training's) movement.
"""
from __future__ import annotations

from typing import Sequence

import torch

from dvlib.io import DvlibError


def layerwise_cosine(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     pretrained: dict[str, torch.Tensor], keys: Sequence[str]) -> list[dict]:
    """One row per key in ``keys`` order: layer_index, layer, cosine, and both vectors' norms."""
    rows = []
    for i, k in enumerate(keys):
        for name, sd in (("state", state), ("reference", reference), ("pretrained", pretrained)):
            if k not in sd:
                raise DvlibError(f"layer {k!r} missing from the {name} state dict")
        a = (state[k].double() - pretrained[k].double()).flatten()
        b = (reference[k].double() - pretrained[k].double()).flatten()
        na, nb = a.norm(), b.norm()
        cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")
        rows.append({"layer_index": i, "layer": k, "cosine": cos, "norm": float(na), "reference_norm": float(nb)})
    return rows
