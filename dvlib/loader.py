"""Fast image batches: decode every image once into a uint8 tensor cache, augment whole batches.

The cache holds each image resized (shorter side) and centre-cropped to ``cache_size`` square,
uint8, NCHW — on the GPU when it fits. Training batches take a random ``size`` crop plus random
horizontal/vertical flips and a mild brightness/contrast jitter, all drawn from a seeded CPU
generator and applied to the whole batch with one gather on the device (no per-image Python work,
no host synchronisation). Evaluation batches take the centre crop.

Per epoch, :func:`batches` draws the permutation and every batch's augmentation parameters up
front on the CPU (the same generator calls, in the same order, as drawing them batch by batch),
and sends them to the device in a few pinned, non-blocking copies; each batch then only slices
device tensors. The CPU generator keeps augmentations identical on every device for a given seed.

:func:`augment_reference` applies the same random draws one image at a time with torchvision's
functional ops; tests check both paths give identical tensors.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from dvlib import device as hw  # the channels_last policy ("device" names the torch.device here)
from dvlib.data.base import DatasetIndex

CACHE_RATIO = 1.143  # cache side / crop side, rounded up: 224 -> 257, 128 -> 147 (ImageNet's 256/224)


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


def _fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except Exception:  # pragma: no cover - cannot ask: put it on the GPU, as always before
        return True
    return nbytes < 0.5 * free


class ImageCache:
    """All images of a run, decoded once: ``data`` is uint8 [N, 3, S, S]; ``row[image]`` its row."""

    def __init__(self, data: torch.Tensor, images: Sequence[str]):
        self.data = data
        self.images = list(images)
        self.row = {im: i for i, im in enumerate(self.images)}

    @classmethod
    def build(cls, index: DatasetIndex, images: Sequence[str], side: int, workers: int | None = None,
              device: str | torch.device = "cpu") -> "ImageCache":
        """Decode ``images`` (threads: PIL releases the GIL) into a uint8 cache on ``device``.

        On a CUDA device the cache stays in (pinned) host memory if it would take more than half
        of the free GPU memory; :func:`batches` then sends each batch's uint8 crops asynchronously.
        """
        images = list(images)
        workers = workers or min(16, os.cpu_count() or 4)
        out = np.empty((len(images), side, side, 3), np.uint8)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, arr in enumerate(pool.map(lambda im: _decode_resize(index, im, side), images)):
                out[i] = arr
        data = torch.from_numpy(out)
        device = torch.device(device)
        if device.type == "cuda" and not _fits_on_gpu(data.numel(), device):
            data = data.permute(0, 3, 1, 2).contiguous()  # batches() gathers each batch into pinned memory
        else:  # NHWC -> NCHW on the target device (fast on a GPU)
            data = data.to(device).permute(0, 3, 1, 2).contiguous()
        return cls(data, images)

    @classmethod
    def from_nchw(cls, data, images: Sequence[str], device: str | torch.device = "cpu") -> "ImageCache":
        """A cache from uint8 NCHW data (e.g. :attr:`data` saved earlier), placed as :meth:`build`
        places it."""
        data = torch.as_tensor(data)
        device = torch.device(device)
        if device.type == "cuda" and not _fits_on_gpu(data.numel(), device):
            return cls(data.contiguous(), images)
        return cls(data.to(device).contiguous(), images)

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
    """Centre ``size`` crop of a uint8 batch -> float in [0, 1], offset ``(side - size) // 2``.

    (torchvision's ``center_crop`` rounds half to even instead; the two differ by one pixel when
    ``side - size`` is odd. We keep the floor so that results stay comparable across dvlib runs.)"""
    side = batch.shape[-1]
    o = (side - size) // 2
    return batch[:, :, o:o + size, o:o + size].float().div_(255.0)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host (pinned staging on CUDA); no-op on the same device."""
    if t.device == device:
        return t
    if device.type != "cuda":  # to the host: a plain (synchronous) copy, safe to read at once
        return t.to(device)
    if t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def batches(cache: ImageCache, rows: torch.Tensor, labels: torch.Tensor | None, batch_size: int, size: int,
            train: bool, generator: torch.Generator | None = None, device=None,
            channels_last: bool | None = None, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (x, y) batches. Training: shuffled (seeded) and augmented; evaluation: in order, centre crop.

    Everything random is drawn at the start of the epoch (see the module docstring); the loop itself
    never waits for the device. ``channels_last`` None: as dvlib runs networks on the device
    (:func:`dvlib.device.use_channels_last`).
    """
    device = torch.device(device) if device is not None else cache.data.device
    if channels_last is None:
        channels_last = hw.use_channels_last(device)
    n = len(rows)
    if train and generator is None:
        raise ValueError("training batches need a seeded torch.Generator")
    rows = torch.as_tensor(rows).cpu()
    perm = torch.randperm(n, generator=generator) if train else torch.arange(n)
    order = rows[perm]
    lab = None
    if labels is not None:
        lab = torch.as_tensor(labels)
        lab = lab[perm.to(lab.device)]
    # drop_last drops only a trailing batch of one image (BatchNorm cannot train on it)
    stop = n - 1 if (drop_last and n % batch_size == 1 and n > 1) else n
    starts = list(range(0, stop, batch_size))
    if not starts:
        return
    cache_dev = cache.data.device
    # where batches are cropped and augmented: on the cache's device, or on the target GPU when the
    # cache is in host memory (the uint8 crops travel, 4x smaller than float images)
    work_dev = device if (cache_dev.type == "cpu" and device.type == "cuda") else cache_dev
    params = None
    if train:  # same generator calls, same order, as drawing them batch by batch
        ps = [draw_params(min(batch_size, n - s), cache.side, size, generator) for s in starts]
        ints = torch.stack([torch.cat([getattr(p, k).to(torch.int64) for p in ps])
                            for k in ("top", "left", "hflip", "vflip")])
        floats = torch.stack([torch.cat([getattr(p, k) for p in ps]) for k in ("bright", "contrast")])
        ints, floats = _to(ints, work_dev), _to(floats, work_dev)
        params = AugParams(ints[0], ints[1], ints[2].bool(), ints[3].bool(), floats[0], floats[1])
    order_c = _to(order[:stop], cache_dev)  # indices into the cache, where the cache lives
    lab_d = _to(lab[:stop], device) if lab is not None else None
    for s in starts:
        e = min(s + batch_size, n)
        if work_dev != cache_dev:  # gather the uint8 rows into pinned memory, send asynchronously
            raw = torch.empty((e - s, *cache.data.shape[1:]), dtype=cache.data.dtype, pin_memory=True)
            torch.index_select(cache.data, 0, order_c[s:e], out=raw)
            raw = raw.to(work_dev, non_blocking=True)
        else:
            raw = cache.data.index_select(0, order_c[s:e])
        if train:
            p = AugParams(*(getattr(params, k)[s:e] for k in ("top", "left", "hflip", "vflip", "bright", "contrast")))
            x = augment(raw, p, size)
        else:
            x = center_crop(raw, size)
        x = _to(x, device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = lab_d[s:e] if lab_d is not None else None
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
