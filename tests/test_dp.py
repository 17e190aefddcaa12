"""dvlib.studies.privacy.dp: per-image convolution gradients, accounting against Opacus' RDP accountant, frozen
BatchNorm, clean unwrapping, and that DP-SGD still learns when epsilon is huge (small CNN, seconds)."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

pytest.importorskip("opacus")
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.grad_sample.conv import compute_conv_grad_sample  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

from dvlib.data import load_dataset  # noqa: E402
from dvlib.studies.privacy.dp import epsilon, fit_dp, freeze_batchnorm, noise_multiplier, select_trainable  # noqa: E402
from dvlib.studies.privacy.grad_sample import conv2d_grad_sample, grad_sample_hooks  # noqa: E402
from dvlib.io import DvlibError  # noqa: E402
from dvlib.loader import ImageCache, cache_size_for, center_crop  # noqa: E402
from dvlib.models import build  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def data():
    index = load_dataset("synthetic", n_patients=24, size=40)
    rec = index.records
    cache = ImageCache.build(index, rec["image"], cache_size_for(SIZE), workers=1)
    labels = torch.tensor([index.classes.index(c) for c in rec["label"]])
    return cache, cache.rows(rec["image"]), labels


def _model(seed: int = 0):
    model = build("smallcnn", 4, weights="random", head="append", seed=seed)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # "pretrained" statistics and affine parameters, not the defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(100)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _train_loss(model, cache, rows, labels) -> float:
    model.eval()
    with torch.no_grad():
        x = center_crop(cache.data.index_select(0, rows), SIZE)
        return float(nn.functional.cross_entropy(model(x), labels))


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".features." in k and
            isinstance(model.get_submodule(k.rsplit(".", 1)[0]), nn.BatchNorm2d)}


def _conv_same(*args, **kw):
    timm_layers = pytest.importorskip("timm.layers")
    return timm_layers.Conv2dSame(*args, **kw)


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(6, 8, 3, padding=1),
    lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False),  # depthwise
    lambda: nn.Conv2d(6, 12, (3, 5), stride=(2, 1), padding=(1, 2), groups=3, dilation=(1, 2)),
    lambda: nn.Conv2d(6, 8, 1),
    lambda: nn.Conv2d(6, 8, 1, stride=2, bias=False),
    lambda: _conv_same(6, 6, 5, stride=2, groups=6),
    lambda: _conv_same(6, 4, 3, stride=2),
])
def test_conv_grad_sample_equals_per_image_autograd(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(5, 6, 11, 13)
    out = layer(x)
    bp = torch.randn_like(out)
    got = conv2d_grad_sample(layer, [x], bp)
    # channels-last activations, as dvlib.loader.augment makes them (Opacus 1.6.0's sampler is wrong there)
    got_cl = conv2d_grad_sample(layer, [x.contiguous(memory_format=torch.channels_last)],
                                bp.contiguous(memory_format=torch.channels_last))
    for p in layer.parameters():
        ref = torch.stack([torch.autograd.grad(layer(x[i:i + 1]), p, bp[i:i + 1])[0] for i in range(5)])
        torch.testing.assert_close(got[p], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_cl[p], ref, rtol=1e-4, atol=1e-5)
        if type(layer) is nn.Conv2d:  # and Opacus' own sampler agrees on contiguous inputs
            torch.testing.assert_close(compute_conv_grad_sample(layer, [x], bp)[p], ref, rtol=1e-4, atol=1e-5)


def test_epsilon_bn_and_state_dict_after_training(data):
    cache, rows, labels = data
    model = _model()
    keys, bn = list(model.state_dict()), _bn_state(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # q = 4 / n: Opacus' RDP search takes seconds at q ~ 0.3 (fractional orders, pure Python)
    hist = fit_dp(model, cache, rows, labels, epochs=2, batch_size=4, lr=1e-3, size=SIZE, seed=0,
                  target_epsilon=3.0, max_grad_norm=1.0)
    n = len(rows)
    assert [h["epoch"] for h in hist] == [1, 2] and hist[0]["delta"] == pytest.approx(1 / n)
    h = hist[-1]
    acc = RDPAccountant()
    acc.history = [(h["noise_multiplier"], 4 / n, 2 * h["steps"])]
    assert h["epsilon"] == pytest.approx(acc.get_epsilon(delta=1 / n), rel=1e-9)
    assert h["epsilon"] == pytest.approx(epsilon(h["noise_multiplier"], 4 / n, 2 * h["steps"], 1 / n))
    assert 3.0 - 0.02 < h["epsilon"] <= 3.0 and hist[0]["epsilon"] < h["epsilon"]  # the noise is not wasted
    after = model.state_dict()
    assert list(after) == keys  # no "_module." prefix, nothing added
    for k, v in bn.items():  # running statistics, counters and affine parameters untouched
        assert torch.equal(after[k], v), k
    changed = [k for k in keys if not torch.equal(after[k], before[k])]
    assert changed and all(k not in bn for k in changed)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    for m in model.modules():  # a plain module again: no Opacus hooks or attributes
        assert not m._forward_hooks and not m._backward_hooks and not hasattr(m, "activations")
    for p in model.parameters():
        assert not any(hasattr(p, a) for a in ("grad_sample", "_forward_counter", "summed_grad"))


def test_huge_epsilon_learns(data):
    cache, rows, labels = data
    model = build("smallcnn", 4, weights="random", head="append", seed=0)
    for m in model.modules():  # "pretrained" statistics: those of the training images
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(center_crop(cache.data.index_select(0, rows), SIZE))
    start = _train_loss(model, cache, rows, labels)
    hist = fit_dp(model, cache, rows, labels, epochs=5, batch_size=8, lr=3e-3, size=SIZE, seed=0,
                  target_epsilon=1e7, max_grad_norm=5.0)
    assert hist[-1]["noise_multiplier"] < 0.05
    assert _train_loss(model, cache, rows, labels) < 0.85 * start  # 0.50-0.77 over seeds 0-5


def test_empty_batches_are_noisy_steps_and_samplers_agree(data):
    cache, rows, labels = data
    n = len(rows)
    models = []
    for sampler in ("dvlib", "opacus", "functorch"):
        model = _model()
        # batch 1 of ~n: about a third of the Poisson batches are empty; each must still be a step
        hist = fit_dp(model, cache, rows, labels, epochs=1, batch_size=1, lr=1e-3, size=SIZE, seed=3,
                      target_epsilon=8.0, trainable=("backbone.features.9", "backbone.fc", "head."),
                      grad_sampler=sampler)
        h = hist[0]
        assert h["steps"] == n and h["empty_batches"] > 5
        assert h["epsilon"] == pytest.approx(epsilon(h["noise_multiplier"], 1 / n, n, 1 / n))
        models.append(model.state_dict())
    for other in models[1:]:  # same batches, same noise: the same model whichever computes the gradients
        for k, v in models[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-4, atol=1e-5)


def test_head_only_and_bad_arguments(data):
    cache, rows, labels = data
    model = _model()
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    fit_dp(model, cache, rows, labels, epochs=1, batch_size=4, lr=1e-2, size=SIZE, seed=0, target_epsilon=5.0,
           trainable="head")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    kw = dict(epochs=1, batch_size=4, lr=1e-3, size=SIZE, seed=0, target_epsilon=1.0)
    for bad, match in [(dict(batch_size=10 ** 6), "batch_size"), (dict(target_epsilon=0), "target_epsilon"),
                       (dict(trainable="everything"), "trainable"), (dict(trainable=("nope.",)), "selects no"),
                       (dict(delta=2.0), "delta"), (dict(grad_sampler="ghost"), "grad_sampler")]:
        with pytest.raises(DvlibError, match=match):
            fit_dp(_model(), cache, rows, labels, **{**kw, **bad})


def test_an_infinite_epsilon_or_a_vacuous_delta_trains_nothing(data):
    """Opacus' noise search returns its starting noise for epsilon = inf, which would be labelled inf."""
    cache, rows, labels = data
    n, model = len(rows), _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(epochs=1, batch_size=4, lr=1e-3, size=SIZE, seed=0)
    for bad, match in [(dict(target_epsilon=math.inf), "target_epsilon must be a finite number > 0, got inf"),
                       (dict(target_epsilon=math.nan), "target_epsilon must be a finite number > 0, got nan"),
                       (dict(target_epsilon=1.0, delta=2 / n), f"delta {2 / n!r} is at least 2/n"),
                       (dict(target_epsilon=1.0, delta=1.0), "delta must be a finite number in (0, 1), got 1.0")]:
        with pytest.raises(DvlibError, match=re.escape(match)):
            fit_dp(model, cache, rows, labels, **kw, **bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    with pytest.raises(DvlibError, match="target_epsilon must be a finite number > 0, got inf"):
        noise_multiplier(math.inf, 0.01, 0.1, 10)


def test_a_given_delta_is_the_one_accounted(data):
    cache, rows, labels = data
    n, delta = len(rows), 0.25 / len(rows)
    hist = fit_dp(_model(), cache, rows, labels, epochs=1, batch_size=4, lr=1e-3, size=SIZE, seed=0,
                  target_epsilon=3.0, delta=delta)
    h = hist[-1]
    assert h["delta"] == delta
    assert h["epsilon"] == pytest.approx(epsilon(h["noise_multiplier"], 4 / n, h["steps"], delta), rel=1e-12)
    assert 3.0 - 0.02 < h["epsilon"] <= 3.0
    assert h["noise_multiplier"] > noise_multiplier(3.0, 1 / n, 4 / n, h["steps"])  # a smaller delta costs noise


def test_opacus_blind_spots_that_fit_dp_covers():
    """Why fit_dp freezes BatchNorm itself instead of trusting Opacus' validator."""
    model = _model()
    for m in model.modules():  # frozen parameters but still in train mode: batch statistics
        if isinstance(m, nn.BatchNorm2d):
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    model.train()
    assert ModuleValidator.validate(model) == []  # not flagged, although images see each other
    assert freeze_batchnorm(model) and not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    timm_layers = pytest.importorskip("timm.layers")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.BatchNormAct2d(4)).train()
    assert ModuleValidator.validate(net) == []  # a BatchNorm subclass is not recognised as BatchNorm
    with pytest.raises(DvlibError, match="trainable layer with buffers"):
        grad_sample_hooks(net, "dvlib")
    assert select_trainable(net) == ["0.weight", "0.bias"]  # ... which select_trainable never trains
