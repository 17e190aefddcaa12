"""Fast image batches: decode every image once into a uint8 tensor cache, augment whole batches.

The cache holds each image resized (shorter side) and centre-cropped to ``cache_size`` square,
uint8, NCHW — on the GPU when it fits. Training batches take a random ``size`` crop plus random
horizontal/vertical flips and a mild brightness/contrast jitter, all drawn from a seeded CPU
generator and applied to the whole batch with one gather on the device (no per-image Python work,
no host synchronisation). Evaluation batches take the centre crop.

:func:`augment_reference` applies the same random draws one image at a time with torchvision's
functional ops; tests check both paths give identical tensors.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from dvlib.data.base import DatasetIndex

CACHE_RATIO = 1.143  # cache side / crop side (224 -> 256, as ImageNet's resize-then-crop)


def cache_size_for(size: int) -> int:
    return int(math.ceil(size * CACHE_RATIO))


def _decode_resize(index: DatasetIndex, image: str, side: int) -> np.ndarray:
    arr = index.load_image(image)
    im = Image.fromarray(arr)
    w, h = im.size
    s = side / min(w, h)
    nw, nh = max(side, round(w * s)), max(side, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=2.0)
    left, top = (nw - side) // 2, (nh - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)))


class ImageCache:
    """All images of a run, decoded once: ``data`` is uint8 [N, 3, S, S]; ``row[image]`` its row."""

    def __init__(self, data: torch.Tensor, images: Sequence[str]):
        self.data = data
        self.images = list(images)
        self.row = {im: i for i, im in enumerate(self.images)}

    @classmethod
    def build(cls, index: DatasetIndex, images: Sequence[str], side: int, workers: int = 4,
              device: str | torch.device = "cpu") -> "ImageCache":
        images = list(images)
        out = np.empty((len(images), side, side, 3), np.uint8)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, arr in enumerate(pool.map(lambda im: _decode_resize(index, im, side), images)):
                out[i] = arr
        data = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(device)
        return cls(data, images)

    @property
    def side(self) -> int:
        return int(self.data.shape[-1])

    def rows(self, images: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.row[i] for i in images], dtype=torch.long)

    def to(self, device) -> "ImageCache":
        return ImageCache(self.data.to(device), self.images)


@dataclass
class AugParams:
    top: torch.Tensor      # [B] int
    left: torch.Tensor     # [B] int
    hflip: torch.Tensor    # [B] bool
    vflip: torch.Tensor    # [B] bool
    bright: torch.Tensor   # [B] float, additive
    contrast: torch.Tensor # [B] float, multiplicative


def draw_params(n: int, side: int, size: int, generator: torch.Generator, jitter: float = 0.1) -> AugParams:
    span = side - size + 1
    return AugParams(
        top=torch.randint(0, span, (n,), generator=generator),
        left=torch.randint(0, span, (n,), generator=generator),
        hflip=torch.rand(n, generator=generator) < 0.5,
        vflip=torch.rand(n, generator=generator) < 0.5,
        bright=(torch.rand(n, generator=generator) * 2 - 1) * jitter,
        contrast=1 + (torch.rand(n, generator=generator) * 2 - 1) * jitter,
    )


def augment(batch: torch.Tensor, p: AugParams, size: int) -> torch.Tensor:
    """Crop/flip/jitter a uint8 batch [B,3,S,S] -> float [B,3,size,size] in [0,1], in one gather."""
    dev = batch.device
    b = batch.shape[0]
    ar = torch.arange(size, device=dev)
    rows = p.top.to(dev)[:, None] + ar
    cols = p.left.to(dev)[:, None] + ar
    rows = torch.where(p.vflip.to(dev)[:, None], rows.flip(1), rows)
    cols = torch.where(p.hflip.to(dev)[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None]
    x = batch.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B,size,size,3]
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = p.contrast.to(dev).view(-1, 1, 1, 1)
    x = (x - mean) * c + mean + p.bright.to(dev).view(-1, 1, 1, 1)
    return x.clamp_(0.0, 1.0)


def augment_reference(batch: torch.Tensor, p: AugParams, size: int) -> torch.Tensor:
    """The same transform, one image at a time with torchvision ops (the plain path, for tests)."""
    import torchvision.transforms.v2.functional as F

    out = []
    for i in range(batch.shape[0]):
        img = F.crop(batch[i], int(p.top[i]), int(p.left[i]), size, size)
        if p.hflip[i]:
            img = F.horizontal_flip(img)
        if p.vflip[i]:
            img = F.vertical_flip(img)
        x = img.float() / 255.0
        m = x.mean()
        x = (x - m) * float(p.contrast[i]) + m + float(p.bright[i])
        out.append(x.clamp(0.0, 1.0))
    return torch.stack(out)


def center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    side = batch.shape[-1]
    o = (side - size) // 2
    return batch[:, :, o:o + size, o:o + size].float().div_(255.0)


def batches(cache: ImageCache, rows: torch.Tensor, labels: torch.Tensor | None, batch_size: int, size: int,
            train: bool, generator: torch.Generator | None = None, device=None,
            channels_last: bool = False, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (x, y) batches. Training: shuffled (seeded) and augmented; evaluation: in order, centre crop."""
    device = device or cache.data.device
    n = len(rows)
    if train and generator is None:
        raise ValueError("training batches need a seeded torch.Generator")
    perm = torch.randperm(n, generator=generator) if train else torch.arange(n)
    order = rows[perm]
    lab = labels[perm] if labels is not None else None
    # drop_last drops only a trailing batch of one image (BatchNorm cannot train on it)
    stop = n - 1 if (drop_last and n % batch_size == 1 and n > 1) else n
    for s in range(0, stop, batch_size):
        idx = order[s:s + batch_size]
        raw = cache.data[idx.to(cache.data.device)]
        if train:
            p = draw_params(len(idx), cache.side, size, generator)
            x = augment(raw, p, size)
        else:
            x = center_crop(raw, size)
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = lab[s:s + batch_size].to(device, non_blocking=True) if lab is not None else None
        yield x, y


@dataclass
class Shard:
    """One hospital's (or the pooled) images: rows of ``cache`` and integer labels."""

    name: str
    cache: ImageCache
    rows: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)
