"""A learnable, procedurally generated image set for tests and smoke runs (no files, no download).

Four classes of 'lesions' drawn on a skin-toned, noisy background: ``disc`` (filled blob), ``ring``,
``bar`` (elongated, any angle) and ``spots`` (a cluster of small dots). Position, size, colour and
background vary per image; each patient has 1-3 images of one class and a patient-specific skin
tone. Every image is a pure function of its id, so the set is identical on every machine.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from dvlib.data.base import DatasetIndex, register

CLASSES = ["bar", "disc", "ring", "spots"]


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def render(label: str, patient: int, k: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Draw one image of class ``label`` (uint8, size x size x 3)."""
    pr = _rng("patient", seed, patient)
    skin = pr.uniform([150, 100, 80], [230, 180, 150])
    r = _rng("image", seed, patient, k)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = r.uniform(0.35, 0.65, 2)
    rad = r.uniform(0.14, 0.24)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    if label == "disc":
        mask = np.clip((rad - d) * size / 2, 0, 1)
    elif label == "ring":
        mask = np.clip((0.045 - np.abs(d - rad)) * size / 2, 0, 1)
    elif label == "bar":
        a = r.uniform(0, np.pi)
        u = (yy - cy) * np.cos(a) + (xx - cx) * np.sin(a)
        v = -(yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
        mask = np.clip((rad * 1.4 - np.abs(u)) * size / 2, 0, 1) * np.clip((0.05 - np.abs(v)) * size / 2, 0, 1)
    else:  # spots
        mask = np.zeros_like(d)
        for _ in range(r.integers(5, 9)):
            sy, sx = cy + r.uniform(-rad, rad), cx + r.uniform(-rad, rad)
            ds = np.sqrt((yy - sy) ** 2 + (xx - sx) ** 2)
            mask = np.maximum(mask, np.clip((0.035 - ds) * size / 2, 0, 1))
    lesion = skin * r.uniform(0.25, 0.55) + r.uniform(-15, 15, 3)
    img = skin[None, None, :] * (1 - mask[..., None]) + lesion[None, None, :] * mask[..., None]
    img = img + r.normal(0, 10, img.shape) + 12 * np.sin(6 * np.pi * (xx + r.uniform()))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@register("synthetic", "procedural 4-class 'lesion' images for tests and smoke runs (no files)",
          needs_root=False)
def load_synthetic(n_patients: int = 160, size: int = 64, seed: int = 0) -> DatasetIndex:
    r = _rng("index", seed)
    rows = []
    for p in range(n_patients):
        label = CLASSES[p % len(CLASSES)]
        for k in range(int(r.integers(1, 4))):
            rows.append({"image": f"syn_p{p:04d}_{k}", "patient": f"P{p:04d}", "label": label, "path": ""})
    records = pd.DataFrame(rows)
    info = {"generator_seed": seed, "size": size}

    def loader(row: pd.Series) -> np.ndarray:
        p, k = row["image"][5:].split("_")
        return render(row["label"], int(p), int(k), size=size, seed=seed)

    return DatasetIndex("synthetic", list(CLASSES), records, root=None, info=info, loader=loader)
