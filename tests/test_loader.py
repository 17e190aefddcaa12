"""dvlib.loader: the cached, batched path against plain per-image references, and the epoch contract
of ``batches()`` (seeded order, every image once, last-batch rule); fit reads nothing back per step."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dvlib import device, loader, train
from dvlib.data.base import DatasetIndex
from dvlib.loader import (AugParams, ImageCache, augment, augment_reference, batches, cache_size_for, center_crop,
                          draw_params)

TOL = 1e-6


def _cache(n: int = 12, side: int = 20, seed: int = 0) -> ImageCache:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    return ImageCache(data, [f"im{i:03d}" for i in range(n)])


# --- augmentation: batched == per-image reference ----------------------------------------------------

@pytest.mark.parametrize("side,size", [(20, 16), (37, 32), (16, 16), (74, 64)])
def test_augment_matches_reference(side, size):
    c = _cache(n=9, side=side, seed=side)
    g = torch.Generator().manual_seed(123 + size)
    p = draw_params(len(c.images), side, size, g, jitter=0.3)
    a = augment(c.data, p, size)
    b = augment_reference(c.data, p, size)
    assert a.shape == b.shape == (9, 3, size, size)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_augment_reference_covers_every_branch():
    """Both flips, crops at both extremes, clamping: the reference path is exercised, not trivial."""
    c = _cache(n=4, side=10)
    p = AugParams(top=torch.tensor([0, 2, 0, 2]), left=torch.tensor([2, 0, 0, 2]),
                  hflip=torch.tensor([True, False, True, False]), vflip=torch.tensor([False, True, True, False]),
                  bright=torch.tensor([0.5, -0.5, 0.0, 0.05]), contrast=torch.tensor([1.5, 0.5, 1.0, 0.9]))
    a, b = augment(c.data, p, 8), augment_reference(c.data, p, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    # image 2: flipped both ways, no jitter: exactly the rotated crop
    ref = torch.flip(c.data[2, :, 0:8, 0:8], dims=(1, 2)).float() / 255
    torch.testing.assert_close(a[2], ref, rtol=0, atol=TOL)
    assert a.min() >= 0 and a.max() <= 1


# --- evaluation centre crop ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 56, 64, 128, 160, 224])
def test_center_crop_is_the_floor_centred_crop(size):
    side = cache_size_for(size)
    c = _cache(n=3, side=side, seed=size)
    ours = center_crop(c.data, size)
    o = (side - size) // 2
    for i in range(3):
        ref = TF.crop(c.data[i], o, o, size, size).float() / 255.0
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=0)
        if (side - size) % 2 == 0:  # where the centre is unambiguous, torchvision agrees
            torch.testing.assert_close(ours[i], TF.center_crop(c.data[i], [size, size]).float() / 255.0,
                                       rtol=0, atol=0)


def test_eval_batches_are_centre_crops_in_order():
    c = _cache(n=7, side=37)
    rows = torch.tensor([5, 0, 3, 6, 1, 2, 4])
    xs = [x for x, _ in batches(c, rows, None, 3, 32, train=False)]
    assert [len(x) for x in xs] == [3, 3, 1]
    got = torch.cat(xs)
    ref = torch.stack([TF.center_crop(c.data[r], [32, 32]).float() / 255.0 for r in rows.tolist()])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# --- decoding into the cache ---------------------------------------------------------------------

def _pil_reference(arr: np.ndarray, side: int) -> np.ndarray:
    """The documented transform, straight from PIL: bicubic resize of the shorter side to ``side``,
    then the centred ``side`` x ``side`` box."""
    im = Image.fromarray(arr)
    w, h = im.size
    s = side / min(w, h)
    nw, nh = max(side, round(w * s)), max(side, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=2.0)
    left, top = (nw - side) // 2, (nh - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)))


def test_image_cache_matches_pil_resize_and_centre_crop(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    shapes = [(40, 30), (30, 40), (64, 64), (301, 200), (17, 90)]  # (w, h): landscape, portrait, square, odd
    paths = []
    for i, (w, h) in enumerate(shapes):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    records = pd.DataFrame({"image": [f"img{i}" for i in range(len(shapes))], "patient": ["p"] * len(shapes),
                            "label": ["a"] * len(shapes), "path": [str(p) for p in paths]})
    index = DatasetIndex("t", ["a"], records)
    side = 24
    images = list(reversed(records["image"]))  # an order other than the index's
    cache = ImageCache.build(index, images, side, workers=3)
    assert cache.data.shape == (len(shapes), 3, side, side) and cache.data.dtype == torch.uint8
    assert cache.data.is_contiguous()
    for im in images:
        path = records.set_index("image").loc[im, "path"]
        with Image.open(path) as f:
            ref = _pil_reference(np.asarray(f.convert("RGB")), side)
        got = cache.data[cache.row[im]].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, ref)


# --- batches(): the epoch contract -----------------------------------------------------------------

def _epoch(cache, rows, labels, bs, size, seed, drop_last=False):
    g = torch.Generator().manual_seed(seed)
    return [(x.clone(), y.clone()) for x, y in batches(cache, rows, labels, bs, size, train=True, generator=g,
                                                       drop_last=drop_last)]


def test_same_seed_same_sequence_other_seed_other():
    c = _cache(n=23, side=20)
    rows = torch.arange(23)
    a = _epoch(c, rows, rows.clone(), 5, 16, seed=7)
    b = _epoch(c, rows, rows.clone(), 5, 16, seed=7)
    assert len(a) == len(b) == 5
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = _epoch(c, rows, rows.clone(), 5, 16, seed=8)
    assert not all(torch.equal(ya, yo) for (_, ya), (_, yo) in zip(a, other))


def test_every_image_once_per_epoch_and_epochs_differ():
    c = _cache(n=30, side=20)
    rows = torch.tensor([3, 7, 1, 0, 29, 12, 18, 25, 8, 14, 22, 9, 2, 27, 16, 5, 11])  # a subset, any order
    g = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(3):  # consecutive epochs on one generator, as fit does
        ys = [y for _, y in batches(c, rows, rows.clone(), 4, 16, train=True, generator=g)]
        seen = torch.cat(ys)
        assert sorted(seen.tolist()) == sorted(rows.tolist())
        orders.append(seen.tolist())
    assert orders[0] != orders[1] or orders[1] != orders[2]


def test_batches_equal_the_per_image_path_with_the_same_draws():
    """The loader's contract: shuffle, then each batch's parameters drawn in turn from the one
    generator; replaying those draws through the per-image reference gives the same tensors."""
    c = _cache(n=19, side=20)
    rows = torch.arange(19).flip(0)
    labels = rows * 10
    bs, size, seed = 4, 16, 11
    got = _epoch(c, rows, labels, bs, size, seed)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(rows), generator=g)
    order = rows[perm]
    for i, (x, y) in enumerate(got):
        idx = order[i * bs:(i + 1) * bs]
        p = draw_params(len(idx), c.side, size, g)
        torch.testing.assert_close(x, augment_reference(c.data[idx], p, size), rtol=0, atol=TOL)
        assert torch.equal(y, labels[perm][i * bs:(i + 1) * bs])


@pytest.mark.parametrize("n,bs,drop_last,sizes", [
    (33, 32, True, [32]),         # a trailing single image is dropped...
    (33, 32, False, [32, 1]),     # ...only with drop_last
    (34, 32, True, [32, 2]),      # a trailing pair is kept
    (32, 8, True, [8, 8, 8, 8]),
    (9, 4, True, [4, 4]),
    (9, 4, False, [4, 4, 1]),
    (1, 4, True, [1]),            # a lone image is not dropped (nothing would be left)
    (0, 4, True, []),
])
def test_last_batch_rule(n, bs, drop_last, sizes):
    c = _cache(n=40, side=20)
    rows = torch.arange(n)
    for train_mode in (True, False):
        g = torch.Generator().manual_seed(0) if train_mode else None
        got = [len(y) for _, y in batches(c, rows, rows.clone(), bs, 16, train=train_mode, generator=g,
                                          drop_last=drop_last)]
        assert got == sizes
    if drop_last and n % bs == 1 and n > 1:  # the dropped image is a random one, different per seed
        dropped = set()
        for seed in range(6):
            seen = torch.cat([y for _, y in batches(c, rows, rows.clone(), bs, 16, train=True,
                                                    generator=torch.Generator().manual_seed(seed), drop_last=True)])
            dropped |= set(range(n)) - set(seen.tolist())
        assert len(dropped) > 1


def test_training_needs_a_generator():
    c = _cache(n=4)
    with pytest.raises(ValueError, match="seeded"):
        next(batches(c, torch.arange(4), None, 2, 16, train=True))


def test_channels_last_layout():
    c = _cache(n=6, side=20)
    g = torch.Generator().manual_seed(0)
    for x, _ in batches(c, torch.arange(6), None, 4, 16, train=True, generator=g, channels_last=True):
        assert x.is_contiguous(memory_format=torch.channels_last)
    for x, _ in batches(c, torch.arange(6), None, 4, 16, train=False, channels_last=True):
        assert x.is_contiguous(memory_format=torch.channels_last)


# --- fit: no read-back inside the training loop ------------------------------------------------------

READ_BACKS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


def _count_read_backs(monkeypatch, fn) -> list[tuple[str, str, int]]:
    """Run ``fn`` with every tensor -> Python read-back made from dvlib/loader.py, dvlib/train.py or
    dvlib/device.py recorded (on a GPU each one waits for the device)."""
    ours = {loader.__file__, train.__file__, device.__file__}
    calls: list[tuple[str, str, int]] = []
    for name in READ_BACKS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            f = sys._getframe(1)
            if f.f_code.co_filename in ours:
                calls.append((_name, f.f_code.co_name, f.f_lineno))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return calls


def test_fit_reads_back_once_whatever_the_number_of_steps(monkeypatch):
    from dvlib.models import build

    c = _cache(n=30, side=20)
    rows, labels = torch.arange(30), torch.arange(30) % 3

    def run(epochs):
        m = build("smallcnn", 3, weights="random", seed=0)
        return lambda: train.fit(m, c, rows, labels, epochs=epochs, batch_size=4, lr=1e-3, size=16, seed=0,
                                 device="cpu", class_weight=torch.ones(3), progress=False)

    short = _count_read_backs(monkeypatch, run(1))
    long = _count_read_backs(monkeypatch, run(3))  # 3 epochs x 8 steps
    assert len(short) == len(long) <= 1, long


def test_fit_history_and_reproducibility():
    from dvlib.models import build

    c = _cache(n=21, side=20)
    rows, labels = torch.arange(21), torch.arange(21) % 3
    out = []
    for _ in range(2):
        m = build("smallcnn", 3, weights="random", seed=0)
        h = train.fit(m, c, rows, labels, epochs=2, batch_size=5, lr=1e-3, size=16, seed=3, device="cpu",
                      progress=False)
        out.append((h, m.state_dict()))
    (h1, s1), (h2, s2) = out
    assert [e["epoch"] for e in h1] == [1, 2]
    assert all(e["images"] == 20 for e in h1)  # 4 x 5, the trailing single image dropped
    assert all(e["seconds"] > 0 and e["img_per_s"] > 0 and np.isfinite(e["loss"]) for e in h1)
    assert [e["loss"] for e in h1] == [e["loss"] for e in h2]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_model_stays_trainable_after_predict_moves_it(monkeypatch):
    """On a GPU, predict's prepare() makes new parameter tensors (model.to(cuda), channels_last).
    Made inside inference mode they would be inference tensors: the reused evaluation model could not
    load the next state dict, train or recalibrate. Here the move is imitated by a copy."""
    from dvlib import bn
    from dvlib.models import build

    def moving_prepare(model, dev):
        model._apply(lambda t: t.clone())
        return model

    monkeypatch.setattr(device, "prepare", moving_prepare)
    c = _cache(n=12, side=20)
    m = build("smallcnn", 3, weights="random", seed=0)
    other = build("smallcnn", 3, weights="random", seed=1).state_dict()
    train.predict(m, c, torch.arange(12), size=16, batch_size=5, device="cpu")
    assert not any(t.is_inference() for t in [*m.parameters(), *m.buffers()])
    m.load_state_dict(other)  # what Session.model_from does next
    assert torch.equal(m.state_dict()["head.weight"], other["head.weight"])
    bn.recalibrate_bn(m, [x for x, _ in batches(c, torch.arange(12), None, 4, 16, train=False)])
    train.fit(m, c, torch.arange(12), torch.arange(12) % 3, epochs=1, batch_size=4, lr=1e-3, size=16, seed=0,
              device="cpu", progress=False)
