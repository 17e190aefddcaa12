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
