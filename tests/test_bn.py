"""dvlib.bn.recalibrate_bn against torch.optim.swa_utils.update_bn."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from dvlib.bn import bn_modules, recalibrate_bn
from dvlib.io import DvlibError



def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 3))
    # stale statistics, as after merging
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(5, 9)
            m.num_batches_tracked.fill_(77)
    return net


def _hospitals(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sizes = [[5, 5, 2], [7], [4, 3, 6, 1 + 1]]  # uneven batches; last batch of 2 keeps BatchNorm1d happy
    return [[(1.5 * i + torch.randn(n, 3, 10, 10, generator=g), torch.zeros(n, dtype=torch.long)) for n in hosp]
            for i, hosp in enumerate(sizes)]


def _stats(net):
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bn_modules(net)]


def test_equals_update_bn_over_the_concatenation():
    net, hosp = _net(), _hospitals()
    ref = copy.deepcopy(net)
    update_bn([b for h in hosp for b in h], ref)
    net.eval()
    net[4].train()  # a sub-module in its own mode: must come back as it was
    counts = recalibrate_bn(net, [iter(h) for h in hosp])
    assert counts == [12, 7, 15]
    for (m1, v1, n1), (m2, v2, n2) in zip(_stats(net), _stats(ref)):
        torch.testing.assert_close(m1, m2, rtol=0, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-5)
        assert int(n1) == int(n2) == 8
    assert [m.momentum for m in bn_modules(net)] == [0.3, 0.1, 0.1]
    assert not net.training and net[4].training and not net[1].training
    # the statistics really moved away from the stale ones
    assert float(bn_modules(net)[0].running_var.max()) < 5


def test_plain_tensor_batches_and_device():
    net, hosp = _net(), _hospitals()
    ref = copy.deepcopy(net)
    xs = [[x for x, _ in h] for h in hosp]
    update_bn([x for h in xs for x in h], ref)
    net.train()
    assert recalibrate_bn(net, (iter(h) for h in xs), device="cpu") == [12, 7, 15]
    assert net.training
    for a, b in zip(_stats(net), _stats(ref)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_failures_leave_statistics_and_modes_unchanged():
    net = _net()
    before = _stats(net)
    net.eval()
    with pytest.raises(DvlibError, match="no images"):
        recalibrate_bn(net, [[], iter([])])
    with pytest.raises(DvlibError, match="a batch must be a tensor or an \\(x, y\\) tuple, got dict"):
        recalibrate_bn(net, [[torch.randn(4, 3, 10, 10), {"x": 1}]])
    with pytest.raises(RuntimeError):
        recalibrate_bn(net, [[torch.randn(4, 5, 10, 10)]])  # wrong channel count, from torch
    for a, b in zip(_stats(net), before):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert not net.training and [m.momentum for m in bn_modules(net)] == [0.3, 0.1, 0.1]


def test_no_batchnorm_and_untracked_batchnorm():
    lin = nn.Sequential(nn.Linear(3, 2))
    assert recalibrate_bn(lin, [[torch.randn(2, 3)], []]) == [0, 0]
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.BatchNorm1d(4))
    ref = copy.deepcopy(net)
    batches = [torch.randn(6, 3), torch.randn(4, 3)]
    update_bn(batches, ref)
    assert recalibrate_bn(net, [batches[:1], batches[1:]]) == [6, 4]
    torch.testing.assert_close(net[2].running_var, ref[2].running_var, rtol=0, atol=1e-5)
    assert net[1].running_mean is None


# --- fold_bn: BatchNorm folded into the convolutions, for inference --------------------------------

FOLD_ATOL = 1e-4  # logits of the folded copy against the network's, relative to the largest logit
PROB_ATOL = 1e-5  # class probabilities through dvlib.train.predict, folded against not


def _randomise_bn(net: nn.Module, seed: int = 0) -> None:
    """Statistics and affine parameters far from their initial values, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in bn_modules(net):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        if m.affine:
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


def test_fold_bn_arithmetic():
    from dvlib.bn import fold_bn

    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=True), nn.BatchNorm2d(3, eps=1e-3))
    _randomise_bn(net)
    conv, bn = net[0], net[1]
    folded, n = fold_bn(net, torch.rand(1, 2, 6, 6))
    assert n == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + 1e-3)
    assert torch.equal(folded[0].weight, (conv.weight.double() * s.view(-1, 1, 1, 1)).float())
    assert torch.equal(folded[0].bias, ((conv.bias.double() - bn.running_mean.double()) * s + bn.bias.double()).float())
    assert isinstance(net[1], nn.BatchNorm2d) and net.training  # the network itself is untouched


@pytest.mark.parametrize("arch", ["smallcnn", "efficientnet_lite0", "resnet50"])
def test_fold_bn_same_function(arch):
    """Every BatchNorm of the three architectures is folded (timm's BatchNormAct2d keeps its
    activation); logits and predict's probabilities stay within float rounding; weights untouched."""
    from dvlib import models
    from dvlib.bn import fold_bn
    from dvlib.loader import ImageCache

    net = models.build(arch, 4, weights="random", seed=0)
    _randomise_bn(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folded, n = fold_bn(net, x[:1])
    assert n == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net.eval()
    with torch.no_grad():
        ref, out = net(x), folded(x)
    assert float((out - ref).abs().max()) < FOLD_ATOL * float(ref.abs().max())
    if arch == "resnet50":
        return
    from dvlib.train import predict

    cache = ImageCache((x * 255).to(torch.uint8), [f"im{i}" for i in range(3)])
    rows = torch.arange(3)
    p0, p1 = (predict(net, cache, rows, size=56, batch_size=2, device="cpu", fold=f) for f in (False, True))
    assert abs(p0 - p1).max() < PROB_ATOL and (p0.argmax(1) == p1.argmax(1)).all()
    assert abs(p0 - p1).max() > 0  # the fold did run (it rounds differently)


class _ReadTwice(nn.Module):
    """A convolution's output read by its BatchNorm and again by a residual sum: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return (y + self.bn(y)).mean((2, 3))


def test_fold_bn_leaves_what_it_cannot_fold():
    from dvlib.bn import fold_bn

    risky = _ReadTwice()
    _randomise_bn(risky)
    out, n = fold_bn(risky, torch.rand(1, 3, 5, 5))
    assert n == 0 and out is risky and isinstance(out.bn, nn.BatchNorm2d) and not out.training
    net = _net()  # BatchNorm1d after a Linear is not a convolution's: kept
    folded, n = fold_bn(net, torch.randn(1, 3, 10, 10))
    assert n == 2 and sum(isinstance(m, nn.BatchNorm1d) for m in folded.modules()) == 1
    x = torch.randn(4, 3, 10, 10)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5)


def test_fold_bn_reuses_checked_pairs_only_for_the_same_modules():
    """A network folded once is folded again by the same pairs for new weights (equal to folding a
    fresh copy); a network whose modules changed is checked again."""
    from dvlib.bn import fold_bn

    net = _net()
    x = torch.randn(1, 3, 10, 10)
    fold_bn(net, x)
    _randomise_bn(net, seed=5)  # new weights, same network
    again, n = fold_bn(net, x)
    fresh, m = fold_bn(copy.deepcopy(net), x)
    assert n == m == 2
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fresh.state_dict().values()))
    net[1] = nn.Identity()  # the first BatchNorm gone: only the second conv's is left
    _, n = fold_bn(net, x)
    assert n == 1
    risky = _ReadTwice()
    _randomise_bn(risky)
    assert fold_bn(risky, torch.rand(1, 3, 5, 5))[1] == 0
    _randomise_bn(risky, seed=3)
    out, n = fold_bn(risky, torch.rand(1, 3, 5, 5))  # remembered: not folded, not checked again
    assert n == 0 and out is risky
