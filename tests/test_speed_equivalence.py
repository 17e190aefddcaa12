"""The fast paths give the plain path's results (issue 16).

- Exactly (bit for bit): what removes repeated work, i.e. decoded images read back from the run's
  cache, evaluations of weights seen before scored from their stored probabilities, and restore modes
  sharing their first round of visits. Both runs below feed the same (channels_last) batches.
- Within float rounding: channels_last networks and batches on a CPU, and evaluation through a copy
  with BatchNorm folded into the convolutions, against the plain NCHW ones (``DVLIB_PLAIN=1``). Stated tolerances, for the same weights: class probabilities within
  ``PROB_ATOL``, gradients within ``GRAD_RTOL``, recalibrated BN statistics within ``BN_RTOL``; merged
  weights from the same vector files: equal. After the whole protocol (training amplifies rounding),
  merged and restored weights and probabilities differ from the plain path's by at most
  ``NOISE_FACTOR`` times what running the plain path with 2 threads instead of 1 makes.
"""
from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import torch

from dvlib import experiment as ex
from dvlib import device, models, stages
from dvlib.files import load_model, read

# three hospitals: with two, params_mean is the data-vector merge at lambda 0.5 (= 1/2) to the bit
SMALL = dict(dataset="pad_ufes_20", image_size=32, epochs=2, batch_size=8, n_hospitals=3, eval_batch_size=64,
             test_frac=0.25)
MODES = ("none", "recalibrate", "finetune_epoch", "recalibrate+finetune_epoch")
METHODS = ("pretrained", "data_vector", "params_mean")
PROB_ATOL = 1e-5      # class probabilities of the same weights, channels_last against NCHW
GRAD_RTOL = 1e-4      # one training step's gradients (relative, per tensor, in norm)
BN_RTOL = 1e-3        # recalibrated BN statistics: means in standard deviations, variances relative
NOISE_FACTOR = 4.0    # whole protocol: fast vs plain at most this times the gap 1 vs 2 threads make
RESULTS = ("finetune_eval", "merge_eval", "lambda_eval", "bn_policy_eval", "restore_eval", "restore_log",
           "layer_cosine")


def _protocol(root, name, pad_root, monkeypatch, plain: bool, arch: str = "smallcnn"):
    """The notebook chain's steps (images and probabilities shared through <run>/cache, as between
    its kernels)."""
    monkeypatch.setenv("DVLIB_DATA", str(pad_root))
    monkeypatch.setenv("DVLIB_PLAIN", "1" if plain else "0")
    ex.reset_caches()
    run = ex.open_run(name, "smoke", seeds=[0], root=root, device="cpu", arch=arch, **SMALL)
    ex.step_split(run)
    ex.step_finetune(run, progress=False)
    ex.reset_caches()  # as the next notebook's kernel: images and probabilities come from <run>/cache
    ex.step_merge(run, methods=METHODS[1:])
    ex.step_lambda(run, (0.0, 0.5, 1.0))
    ex.step_bn_policy(run)
    ex.reset_caches()
    ex.step_restore(run, methods=METHODS, modes=MODES)
    ex.step_similarity(run)
    ex.reset_caches()
    return run


def _models(run):
    return sorted(p.name for p in (run.dir / "split_0" / "train_0" / "models").iterdir())


@pytest.fixture
def fixed_channels_last(monkeypatch):
    """Both runs feed channels_last batches and evaluate through folded BatchNorms, whatever
    DVLIB_PLAIN says: only the removal of repeated work differs between them."""
    monkeypatch.setattr(device, "use_channels_last", lambda dev: True)
    monkeypatch.setattr(device, "use_folded_bn", lambda dev: True)


def test_removing_repeated_work_changes_nothing(tmp_path, pad_root, monkeypatch, fixed_channels_last):
    plain = _protocol(tmp_path, "plain", pad_root, monkeypatch, plain=True)
    fast = _protocol(tmp_path, "fast", pad_root, monkeypatch, plain=False)
    assert not (plain.dir / "cache").exists()
    cache = fast.dir / "cache"
    assert len(list(cache.glob("images_*px_*.npy"))) == 1  # decoded once, read back by the later steps
    # merged_data_vector (lambda 0.5, BN policy mean, restore none) and merged_params_mean (restore
    # none) are evaluated once; lambdas 0 and 1 and the two other BN policies are new weights
    n_eval = len(list((cache / "predictions").glob("*.npz")))
    assert n_eval == 4 + 2 + 2 + 2 + 1 + len(METHODS) * (len(MODES) - 1)
    assert _models(plain) == _models(fast)
    for name in _models(plain):
        (_, a), (_, b) = read(plain.dir / "split_0" / "train_0" / "models" / name), \
            read(fast.dir / "split_0" / "train_0" / "models" / name)
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for step in RESULTS:
        pd.testing.assert_frame_equal(plain.read(step), fast.read(step), check_exact=True, obj=step)
    for step in ("finetune", "merge", "restore"):
        f = f"results/{step}_predictions.csv.gz"
        assert gzip.decompress((plain.dir / f).read_bytes()) == gzip.decompress((fast.dir / f).read_bytes()), f


def test_shared_restore_rounds_equal_separate_ones(tmp_path, pad_root, monkeypatch, fixed_channels_last):
    """recalibrate+finetune_epoch continued from recalibrate's model equals recalibrating again (the
    plain path) bit for bit, visits and log included."""
    run = _protocol(tmp_path, "fast", pad_root, monkeypatch, plain=False)
    log = run.read("restore_log")
    both = log[(log["method"] == "data_vector") & (log["restore"] == "recalibrate+finetune_epoch")]
    assert list(both["mode"]) == ["recalibrate"] * 3 + ["finetune_epoch"] * 3
    recal = log[(log["method"] == "data_vector") & (log["restore"] == "recalibrate")]
    pd.testing.assert_frame_equal(both.iloc[:3].drop(columns="restore").reset_index(drop=True),
                                  recal.drop(columns="restore").reset_index(drop=True))


def test_restore_rounds_are_shared_whatever_the_order_of_modes(tmp_path, pad_root, monkeypatch, fixed_channels_last):
    """The recalibration round of recalibrate and recalibrate+finetune_epoch runs once, whichever is
    listed first, and each mode's model is bit for bit the one its own visits from the start give
    (the plain path, which runs that round for each)."""
    from dvlib.experiment.restoring import restore_source, restored_models

    monkeypatch.setenv("DVLIB_DATA", str(pad_root))
    ex.reset_caches()
    run = ex.open_run("order", "smoke", seeds=[0], root=tmp_path, device="cpu", **SMALL)
    ex.step_split(run)
    r = ex.replicate(run, 0, 0)
    start = restore_source(r, "pretrained")

    def restored(modes, plain: bool):
        monkeypatch.setenv("DVLIB_PLAIN", "1" if plain else "0")
        before = device.work()["recalibration_images"]
        out = {mode: ({k: v.clone() for k, v in model.state_dict().items()}, [v["mode"] for v in m["restore_visits"]])
               for mode, model, m in restored_models(r, *start, modes, "pretrained")}
        return out, device.work()["recalibration_images"] - before

    both = ("recalibrate", "recalibrate+finetune_epoch")
    ref, images_plain = restored(both, plain=True)
    assert ref["recalibrate+finetune_epoch"][1] == ["recalibrate"] * 3 + ["finetune_epoch"] * 3
    for modes in (both, both[::-1]):
        got, images = restored(modes, plain=False)
        assert 2 * images == images_plain > 0, modes
        for mode in both:
            assert got[mode][1] == ref[mode][1]
            assert all(torch.equal(got[mode][0][k], ref[mode][0][k]) for k in ref[mode][0]), (modes, mode)


def test_decoded_images_read_back_bit_for_bit(tmp_path, pad_root, monkeypatch):
    from dvlib.data import load_dataset
    from dvlib.experiment.cache import decoded_images
    from dvlib.loader import ImageCache

    monkeypatch.setenv("DVLIB_DATA", str(pad_root))
    index = load_dataset("pad_ufes_20")
    images = sorted(index.records["image"])
    ref = ImageCache.build(index, images, 37)
    first = decoded_images(index, images, 37, "cpu", tmp_path)
    (path,) = tmp_path.glob("images_37px_*.npy")
    assert path.stat().st_mode & 0o777 == 0o600
    again = decoded_images(index, images, 37, "cpu", tmp_path)
    for c in (first, again):
        assert c.images == ref.images and c.data.is_contiguous() and torch.equal(c.data, ref.data)
    # a changed image file is decoded afresh, under a new key
    victim = index.records.set_index("image").loc[images[0], "path"]
    import os

    st = os.stat(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    decoded_images(index, images, 37, "cpu", tmp_path)
    assert len(list(tmp_path.glob("images_37px_*.npy"))) == 2


def test_channels_last_within_float_rounding(pad_root, monkeypatch):
    """One EfficientNet-Lite0 (random weights), the same images and weights: channels_last against
    NCHW for BN recalibration and one training step's gradients; for evaluation, channels_last with
    BatchNorm folded against NCHW as it is."""
    from dvlib.data import load_dataset
    from dvlib.loader import ImageCache, Shard, batches
    from dvlib.restore import recalibrate_visit

    monkeypatch.setenv("DVLIB_DATA", str(pad_root))
    index = load_dataset("pad_ufes_20")
    images = sorted(index.records["image"])
    cache = ImageCache.build(index, images, 74)
    rows = torch.arange(len(images))
    labels = torch.arange(len(images)) % 6
    shard = Shard("all", cache, rows, labels)
    out = {}
    for plain in ("1", "0"):
        monkeypatch.setenv("DVLIB_PLAIN", plain)
        assert device.use_channels_last("cpu") is (plain == "0")
        net = models.build("efficientnet_lite0", 6, weights="random", seed=0)
        probs = stages.predict_shards(net, [shard], size=64, batch_size=16, device="cpu")[0]
        net.train()
        x, y = next(batches(cache, rows, labels, 16, 64, train=True, generator=torch.Generator().manual_seed(0)))
        torch.nn.functional.cross_entropy(net(x), y).backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        recalibrate_visit(net, shard, size=64, reset=True, device="cpu")
        out[plain] = probs, grads, {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    (p0, g0, bn0), (p1, g1, bn1) = out["1"], out["0"]
    assert np.abs(p0 - p1).max() < PROB_ATOL
    assert (p0.argmax(1) == p1.argmax(1)).all()
    for k in g0:
        assert float((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-30)) < GRAD_RTOL, k
    for k in bn0:  # in units of each channel's standard deviation (some means are ~1e-8 here)
        scale = bn0[k.replace("running_mean", "running_var")].sqrt() if k.endswith("running_mean") else bn0[k]
        assert float(((bn1[k] - bn0[k]).abs() / scale.clamp_min(1e-12)).max()) < BN_RTOL, k


def _gap(a, b) -> tuple[float, float]:
    """(largest weight difference of the merged and restored models, of the probabilities of the true class)."""
    worst = 0.0
    for name in _models(a):
        if name.startswith(("merged_", "restored_")):
            x, y = (load_model(r.dir / "split_0" / "train_0" / "models" / name).state for r in (a, b))
            worst = max([worst] + [float((x[k] - y[k]).abs().max()) for k in x if x[k].is_floating_point()])
    probs = [max(float((pd.read_csv(a.dir / f).p_true - pd.read_csv(b.dir / f).p_true).abs().max())
                 for f in (f"results/{step}_predictions.csv.gz" for step in ("finetune", "merge", "restore")))]
    return worst, probs[0]


def test_fast_protocol_deviates_no_more_than_float_noise(tmp_path, pad_root, monkeypatch):
    """The whole protocol (EfficientNet-Lite0, the quick preset's lr): fast against plain. Adam turns
    rounding differences into steps of +-lr wherever a gradient is near zero, so trained weights differ
    at that scale whatever changes the rounding; the reference is the plain path run with 2 threads
    instead of 1. The fast path may differ from the plain one by at most NOISE_FACTOR times that."""
    settings = dict(arch="efficientnet_lite0")
    monkeypatch.setitem(SMALL, "lr", 2e-4)
    plain = _protocol(tmp_path, "plain", pad_root, monkeypatch, plain=True, **settings)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = _protocol(tmp_path, "plain-2-threads", pad_root, monkeypatch, plain=True, **settings)
    finally:
        torch.set_num_threads(old)
    fast = _protocol(tmp_path, "fast", pad_root, monkeypatch, plain=False, **settings)
    assert _models(plain) == _models(fast)
    (w_fast, p_fast), (w_noise, p_noise) = _gap(plain, fast), _gap(plain, threads)
    assert 0 < w_noise and 0 < p_noise  # the reference is not vacuous
    assert w_fast <= NOISE_FACTOR * w_noise and p_fast <= NOISE_FACTOR * p_noise, (w_fast, w_noise, p_fast, p_noise)
