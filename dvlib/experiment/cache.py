"""What the experiment keeps so as not to repeat work, and the contract of each store.

In this process, one of each kind, the last one asked for (:func:`kept`): the dataset index, the
decoded images, the pretrained weights and the replicate; :func:`reset_caches` forgets them all
(e.g. between benchmark repeats). A replicate's :class:`SharedNetwork` is the one network its steps
load weight after weight into, when they ask for it (``model_from(state, shared=True)``).

Under ``<run>/cache/`` (safe to delete), for the later steps' processes (each notebook has its kernel):

- the decoded images, ``images_<side>px_<key>.npy`` (:func:`decoded_images`), bit for bit what
  decoding gives;
- every evaluation's class probabilities, ``predictions/<key>.npz`` (:class:`PredictionStore`): weights
  evaluated before (``merged_data_vector`` as lambda 0.5, and again before its restore) are scored
  from the stored probabilities, which are the ones recomputing would give.

A key is the sha256 of what the entry was computed from: the image files (size, modification time)
or the weights' bytes, the settings, library versions and :data:`CACHE_VERSION`. ``DVLIB_PLAIN=1``
(:func:`dvlib.device.plain`) turns both stores off.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dvlib import device as hw  # the speed knobs a forward pass depends on
from dvlib.io import atomic_path
from dvlib.models import state_dict_sha256

# bump by hand whenever decoding (dvlib.loader) or a forward pass (models, train.predict, bn.fold_bn)
# computes something else: no entry stored by older code is reused after that
CACHE_VERSION = 1

_KEPT: dict[str, dict] = {"dataset index": {}, "decoded images": {}, "pretrained weights": {}, "replicate": {}}
_EVALUATIONS = {"computed": 0, "reused": 0}


def kept(kind: str, key: tuple, make: Callable[[], object]):
    """This process's ``kind`` for ``key``: made by ``make()`` when first asked for, kept until another
    key of the same kind is (one of each kind, so that consecutive steps share it)."""
    box = _KEPT[kind]
    if key not in box:
        box.clear()  # the old one goes first: decoded images can be large
        box[key] = make()
    return box[key]


def reset_caches() -> None:
    """Forget the dataset index, decoded images, pretrained weights and replicate kept by this process."""
    for box in _KEPT.values():
        box.clear()


def count_evaluation(kind: str) -> None:
    """One evaluation ``computed`` or ``reused`` (scored from stored probabilities)."""
    _EVALUATIONS[kind] += 1


def evaluation_counts() -> dict[str, int]:
    """Evaluations this process's replicates computed and scored from stored probabilities."""
    return dict(_EVALUATIONS)


class SharedNetwork:
    """One network reused for many weights (building one costs more than loading weights into it).

    :meth:`holding` puts it back as built apart from the weights (eval mode, BatchNorm momenta), so
    that it computes what a new network holding them would; the next call overwrites it."""

    def __init__(self, build: Callable[[], nn.Module]):
        self._build = build
        self._net: nn.Module | None = None
        self._momenta: list = []

    def holding(self, state: dict) -> nn.Module:
        if self._net is None:
            self._net = self._build()
            self._momenta = [(m, m.momentum) for m in self._net.modules() if hasattr(m, "momentum")]
        for m, momentum in self._momenta:  # a BatchNorm's momentum is not in the state dict
            m.momentum = momentum
        self._net.load_state_dict(state, strict=True)
        return self._net.train(False)


def decoded_images(index, images: list[str], side: int, device, folder: Path | None):
    """:meth:`dvlib.loader.ImageCache.build`, kept in ``folder`` for later processes (None: decode).

    Only for datasets of image files (a generated dataset such as ``synthetic`` is decoded). The key
    covers :data:`CACHE_VERSION`, Pillow's version, the dataset, the image list, each file's size and
    modification time and the side, so a changed image or decoder means decoding afresh."""
    from PIL import __version__ as pillow_version

    from dvlib.loader import ImageCache

    if folder is None or index.loader is not None:
        return ImageCache.build(index, images, side, device=device)
    h = hashlib.sha256(repr((CACHE_VERSION, pillow_version, index.name, str(index.root), side, list(images))).encode())
    for p in index.records.set_index("image").loc[images, "path"]:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    path = Path(folder) / f"images_{side}px_{h.hexdigest()[:24]}.npy"
    if path.exists():
        try:
            data = np.load(path)
            if data.dtype == np.uint8 and data.shape == (len(images), 3, side, side):
                return ImageCache.from_nchw(data, images, device)
        except (OSError, ValueError):  # unreadable: decode again (and rewrite)
            pass
    cache = ImageCache.build(index, images, side, device=device)
    with atomic_path(path, suffix=".npy", mode=0o600) as tmp:  # decoded patient images: their owner's only
        with open(tmp, "wb") as f:
            np.save(f, cache.data.cpu().numpy())
    return cache


def forward_context(device: torch.device, settings: tuple, shards) -> str:
    """sha256 of what a forward pass over ``shards`` depends on besides the weights and dvlib's code
    (:data:`CACHE_VERSION`): torch and its threads, the device and its knobs, ``settings``, and the
    test images' names and pixels."""
    h = hashlib.sha256(repr((torch.__version__, torch.get_num_threads(), str(device), hw.use_channels_last(device),
                             hw.use_folded_bn(device), settings)).encode())
    for sh in shards:
        h.update(repr((sh.name, [sh.cache.images[int(r)] for r in sh.rows])).encode())
        h.update(np.ascontiguousarray(sh.cache.data.index_select(0, sh.rows.to(sh.cache.data.device)).cpu().numpy()))
    return h.hexdigest()


class PredictionStore:
    """Class probabilities (one array per test shard) of the weights evaluated so far, in memory and
    as ``<key>.npz`` files in ``folder``; ``context``: :func:`forward_context` of the test shards."""

    def __init__(self, folder: Path, context: str):
        self.folder, self.context = Path(folder), context
        self._memo: dict[str, list[np.ndarray]] = {}

    def key(self, net: nn.Module) -> str:
        """The key of ``net``'s weights: sha256 of CACHE_VERSION, the context and the weights' sha256."""
        text = f"{CACHE_VERSION}|{self.context}|{state_dict_sha256(net.state_dict())}"
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key[:32]}.npz"

    def load(self, key: str, shapes: list[tuple[int, int]]) -> list[np.ndarray] | None:
        """The probabilities stored under ``key``, if there are some of these ``shapes``; else None."""
        if key in self._memo:
            return self._memo[key]
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                if str(z["key"]) != key:
                    return None
                probs = [z[f"p{i}"] for i in range(len(shapes))]
        except (OSError, ValueError, KeyError):  # unreadable or foreign: recomputed (and rewritten)
            return None
        if [p.shape for p in probs] != [tuple(s) for s in shapes]:
            return None
        self._memo[key] = probs
        return probs

    def save(self, key: str, probs: list[np.ndarray]) -> None:
        self._memo[key] = probs
        with atomic_path(self.path(key), suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), **{f"p{i}": p for i, p in enumerate(probs)})
