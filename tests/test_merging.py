"""dvlib.merging: every method against its formula on a real torchvision model, hand-computed tiny
TIES/DARE cases, head/BN/counter handling, validation."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dvlib import merge
from dvlib.checks import negative_variance_keys
from dvlib.io import DvlibError
from dvlib.methods import BN_MODES, METHODS, random_like
from dvlib.vectors import BN_STAT, COUNTER, HEAD, PARAM, DataVector, key_kinds, keys_of


def layer_norms(sd: dict) -> dict:
    return {k: float(torch.linalg.vector_norm(t, dtype=torch.float64)) for k, t in sd.items()}


def random_vectors(pre, fts, kinds, seed):
    """The documented recipe of random_vector: one CPU generator, model by model, key by key."""
    gen = torch.Generator().manual_seed(seed)
    return [{k: random_like(ft[k] - pre[k], gen) for k in keys_of(kinds, PARAM)} for ft in fts]

ATOL = 1e-6



class Net(nn.Module):
    """ResNet18 backbone + new head, keys ``backbone.*`` and ``head.*`` (like dvlib.models.DVNet)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.backbone = torchvision.models.resnet18(weights=None)
        self.head = nn.Linear(1000, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def _perturbed(pre: dict, i: int) -> dict:
    g = torch.Generator().manual_seed(100 + i)
    ft = {}
    for k, v in pre.items():
        if k.endswith("num_batches_tracked"):
            ft[k] = v + 10 * (i + 1)
        elif k.endswith("running_var"):
            ft[k] = v * torch.exp(0.1 * torch.randn(v.shape, generator=g))
        elif k.startswith("head."):
            ft[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            ft[k] = v + 0.01 * torch.randn(v.shape, generator=g)
    return ft


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(1)
    pre = {}
    for k, v in net.state_dict().items():
        if k.endswith("running_mean"):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            v = torch.tensor(1000)
        pre[k] = v.detach().clone()
    fts = [_perturbed(pre, i) for i in range(3)]
    return net, pre, fts


def _close(actual: torch.Tensor, expected: torch.Tensor, key: str = "") -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=ATOL, msg=lambda m: f"{key}: {m}")


def _params(sd: dict) -> list[str]:
    return keys_of(key_kinds(sd), PARAM)


# ------------------------------------------------------------------------------------- formulas

@pytest.mark.parametrize("lam", [0.5, 0.3])
def test_data_vector_formula(models, lam):
    net, pre, fts = models
    out, _ = merge(pre, fts, method="data_vector", lam=lam)
    assert list(out) == list(pre)
    for k in _params(pre):
        expected = pre[k].double() + lam * sum(ft[k].double() - pre[k].double() for ft in fts)
        _close(out[k], expected, k)


def test_params_mean_formula_and_data_vector_with_lam_1_over_n(models):
    _, pre, fts = models
    mean, _ = merge(pre, fts, method="params_mean")
    dv, _ = merge(pre, fts, method="data_vector", lam=1 / len(fts))
    for k in _params(pre):
        expected = sum(ft[k].double() for ft in fts) / len(fts)
        _close(mean[k], expected, k)
        _close(dv[k], mean[k], k)


def test_weighted_formula_head_and_bn(models):
    _, pre, fts = models
    counts = [100, 300, 600]
    out, _ = merge(pre, fts, method="weighted", weights=counts)
    w = [c / sum(counts) for c in counts]
    kinds = key_kinds(pre)
    for k in keys_of(kinds, PARAM, HEAD, BN_STAT):
        _close(out[k], sum(wi * ft[k].double() for wi, ft in zip(w, fts)), k)
    # uniform weights give params_mean
    uni, _ = merge(pre, fts, method="weighted", weights=[1, 1, 1])
    mean, _ = merge(pre, fts, method="params_mean")
    for k in _params(pre):
        _close(uni[k], mean[k], k)


def test_weighted_needs_valid_weights(models):
    _, pre, fts = models
    with pytest.raises(DvlibError, match="needs weights"):
        merge(pre, fts, method="weighted")
    with pytest.raises(DvlibError, match="2 values for 3"):
        merge(pre, fts, method="weighted", weights=[1, 2])
    with pytest.raises(DvlibError, match=r"weights\[1\]"):
        merge(pre, fts, method="weighted", weights=[1, -2, 3])
    with pytest.raises(DvlibError, match="only used by method 'weighted'"):
        merge(pre, fts, method="data_vector", weights=[1, 2, 3])


def test_random_vector_norms_formula_and_seed(models):
    _, pre, fts = models
    kinds = key_kinds(pre)
    rv = random_vectors(pre, fts, kinds=kinds, seed=7)
    for i, ft in enumerate(fts):
        tau_norms = layer_norms({k: ft[k] - pre[k] for k in _params(pre)})
        got = layer_norms(rv[i])
        assert set(got) == set(tau_norms)
        for k in tau_norms:
            assert got[k] == pytest.approx(tau_norms[k], rel=1e-6), k
    out, _ = merge(pre, fts, method="random_vector", lam=0.5, seed=7)
    for k in _params(pre):
        _close(out[k], pre[k].double() + 0.5 * sum(r[k].double() for r in rv), k)
    # the random directions are unrelated to the real ones
    k = "backbone.layer4.1.conv2.weight"
    tau = (fts[0][k] - pre[k]).reshape(-1).double()
    cos = float(torch.dot(tau, rv[0][k].reshape(-1).double()) / (tau.norm() * rv[0][k].double().norm()))
    assert abs(cos) < 0.01
    again, _ = merge(pre, fts, method="random_vector", lam=0.5, seed=7)
    other, _ = merge(pre, fts, method="random_vector", lam=0.5, seed=8)
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(out[k], other[k])


def _ties_reference(pre: dict, fts: list, keys: list, density: float, lam: float, scope: str) -> dict:
    """Independent TIES: sort-based top-k in float64 (taus rounded to float32 like the inputs)."""
    taus = {k: torch.stack([(ft[k] - pre[k]).reshape(-1) for ft in fts]).double() for k in keys}

    def threshold(rows):
        n = rows.shape[1]
        k = max(1, math.ceil(round(density * n, 6)))
        return rows.abs().sort(dim=1, descending=True).values[:, k - 1:k]

    if scope == "global":
        thr = threshold(torch.cat(list(taus.values()), dim=1))
    trimmed, signs = {}, {}
    for k, t in taus.items():
        th = thr if scope == "global" else threshold(t)
        trimmed[k] = torch.where(t.abs() >= th, t, torch.zeros_like(t))
        signs[k] = torch.sign(trimmed[k].sum(0))
    if scope == "global":
        majority = {k: torch.sign(sum(s.sum() for s in signs.values())) for k in keys}
    else:
        majority = {k: torch.sign(s.sum()) for k, s in signs.items()}
    out = {}
    for k in keys:
        s = torch.where(signs[k] == 0, majority[k], signs[k])
        vals = trimmed[k]
        agree = (torch.sign(vals) == s) & (vals != 0)
        cnt = agree.sum(0)
        merged = torch.where(agree, vals, 0).sum(0) / cnt.clamp(min=1)
        out[k] = pre[k].double() + lam * merged.view(pre[k].shape)
    return out


@pytest.mark.parametrize("scope", ["per_key", "global"])
def test_ties_formula(models, scope):
    _, pre, fts = models
    # a slice of ResNet18 (stem, layer1, layer2, fc, head: 1.2M weights) keeps the sort-based reference fast
    part = ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2.", "backbone.fc.", "head.")
    pre = {k: v for k, v in pre.items() if k.startswith(part)}
    fts = [{k: ft[k] for k in pre} for ft in fts]
    keys = _params(pre)
    out, _ = merge(pre, fts, method="ties", lam=1.0, density=0.2, scope=scope)
    ref = _ties_reference(pre, fts, keys, 0.2, 1.0, scope)
    for k in keys:
        _close(out[k], ref[k], k)


def test_dare_formula(models):
    _, pre, fts = models
    p, lam, seed = 0.3, 0.5, 11
    out, _ = merge(pre, fts, method="dare", lam=lam, seed=seed, p=p)
    gen = torch.Generator().manual_seed(seed)  # documented recipe: model by model, then key by key
    kept = total = 0
    acc = {k: torch.zeros(pre[k].shape, dtype=torch.float64) for k in _params(pre)}
    for ft in fts:
        for k in _params(pre):
            keep = torch.rand(pre[k].shape, generator=gen, dtype=torch.float32) >= p
            kept, total = kept + int(keep.sum()), total + keep.numel()
            acc[k] += torch.where(keep, (ft[k] - pre[k]).double() / (1 - p), 0.0)
    for k in _params(pre):
        _close(out[k], pre[k].double() + lam * acc[k], k)
    assert abs(kept / total - (1 - p)) < 1e-3


# ----------------------------------------------------------------------------- hand-computed cases

def test_ties_hand_computed_trim_elect_disjoint_mean():
    pre = {"w": torch.ones(5)}
    taus = [torch.tensor([3.0, -1.0, 0.5, -4.0, 2.0]),   # top-2 by |.|: 3, -4
            torch.tensor([-2.0, 5.0, 1.0, -1.0, 0.5]),   # top-2: -2, 5
            torch.tensor([4.0, 1.0, -6.0, 2.0, -3.0])]   # top-2: 4, -6
    fts = [{"w": pre["w"] + t} for t in taus]
    # trimmed sums [5, 5, -6, -4, 0] -> signs [+, +, -, -, 0]; zero sign -> majority sign(+1+1-1-1) = 0
    # disjoint means: (3+4)/2, 5, -6, -4, nothing -> 0
    out, _ = merge(pre, fts, method="ties", lam=1.0, density=0.4)
    assert torch.equal(out["w"], torch.tensor([4.5, 6.0, -5.0, -3.0, 1.0]))
    half, _ = merge(pre, fts, method="ties", lam=0.5, density=0.4)
    assert torch.equal(half["w"], 1 + 0.5 * torch.tensor([3.5, 5.0, -6.0, -4.0, 0.0]))


def test_ties_hand_computed_zero_sign_takes_majority():
    pre = {"b": torch.zeros(4)}
    fts = [{"b": torch.tensor([1.0, -2.0, 1.0, 3.0])},
           {"b": torch.tensor([-1.0, -1.0, 2.0, 1.0])},
           {"b": torch.zeros(4)}]
    # density 1 keeps all; sums [0, -3, 3, 4] -> signs [0, -, +, +]; majority sign(0-1+1+1) = +
    # element 0 takes +: only 1.0 agrees -> 1; element 1: (-2-1)/2; element 2: (1+2)/2; element 3: (3+1)/2
    out, _ = merge(pre, fts, method="ties", lam=1.0, density=1.0)
    assert torch.equal(out["b"], torch.tensor([1.0, -1.5, 1.5, 2.0]))


def test_ties_hand_computed_global_vs_per_key():
    pre = {"a": torch.zeros(3), "b": torch.zeros(3)}
    fts = [{"a": torch.tensor([1.0, -5.0, 2.0]), "b": torch.tensor([0.5, 4.0, -3.0])},
           {"a": torch.tensor([-2.0, 1.0, 6.0]), "b": torch.tensor([3.0, 2.0, -1.0])}]
    # global, density 0.5 of 6 -> k=3 per model. model 1 keeps -5, 4, -3; model 2: 6, 3 and the tie at
    # |2| (a[0]=-2, b[1]=2) -> keeps 6, 3, -2, 2. a: sums [-2,-5,6] -> [-2,-5,6]; b: [3, (4+2)/2, -3]
    g, _ = merge(pre, fts, method="ties", lam=1.0, density=0.5, scope="global")
    assert torch.equal(g["a"], torch.tensor([-2.0, -5.0, 6.0]))
    assert torch.equal(g["b"], torch.tensor([3.0, 3.0, -3.0]))
    # per key, k = ceil(1.5) = 2 of 3: a: [0,-5,2] and [-2,0,6] -> [-2, -5, (2+6)/2]; b: [0,4,-3], [3,2,0]
    p, _ = merge(pre, fts, method="ties", lam=1.0, density=0.5, scope="per_key")
    assert torch.equal(p["a"], torch.tensor([-2.0, -5.0, 4.0]))
    assert torch.equal(p["b"], torch.tensor([3.0, 3.0, -3.0]))


def test_dare_hand_computed():
    pre = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "v": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])}
    fts = [{"w": torch.tensor([2.0, 2.0, 1.0, 4.5]), "v": torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5, 1.0])},
           {"w": torch.tensor([0.0, 3.0, 3.0, 5.0]), "v": torch.tensor([-2.0, 1.0, 1.0, 1.0, 0.5, -1.0])}]
    p, seed = 0.5, 3
    gen = torch.Generator().manual_seed(seed)
    draws = [{k: torch.rand(pre[k].shape, generator=gen) >= p for k in ("w", "v")} for _ in fts]  # model, then key
    masks = {k: [d[k] for d in draws] for k in ("w", "v")}
    out, _ = merge(pre, fts, method="dare", lam=0.5, seed=seed, p=p)
    # survivors doubled (1 / (1 - 0.5)), summed, halved (lam): pre + sum of surviving taus
    taus_w = [torch.tensor([1.0, 0.0, -2.0, 0.5]), torch.tensor([-1.0, 1.0, 0.0, 1.0])]
    taus_v = [fts[0]["v"], fts[1]["v"]]
    for k, taus in (("w", taus_w), ("v", taus_v)):
        expected = pre[k] + sum(torch.where(m, t, 0.0) for m, t in zip(masks[k], taus))
        assert torch.equal(out[k], expected), (k, masks[k])
    assert any(not m.all() for ms in masks.values() for m in ms)  # something was dropped
    # p = 0 drops nothing: data_vector
    assert torch.equal(merge(pre, fts, method="dare", lam=0.5, p=0.0)[0]["w"], merge(pre, fts, lam=0.5)[0]["w"])


# -------------------------------------------------------------------------- heads, BN, counters

ROBUST = {"median": lambda s: s.median(0).values if len(s) % 2 else s.sort(0).values[len(s) // 2 - 1:][:2].mean(0),
          "trimmed_mean": lambda s: s.sort(0).values[1:-1].mean(0)}  # 3 models, trim 0.2: one cut each end


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(ROBUST)))
def test_every_method_averages_head_keeps_keys_dtypes_and_integer_counters(models, method):
    _, pre, fts = models
    weights = [1, 2, 3] if method == "weighted" else None
    opts = {"density": 0.5} if method == "ties" else {}
    out, _ = merge(pre, fts, method=method, weights=weights, **opts)
    assert list(out) == list(pre)
    assert all(out[k].dtype == pre[k].dtype and out[k].shape == pre[k].shape for k in pre)
    w = [x / sum(weights) for x in weights] if weights else [1 / len(fts)] * len(fts)
    for k in ("head.weight", "head.bias"):
        _close(out[k], sum(wi * ft[k].double() for wi, ft in zip(w, fts)), k)
    for k in keys_of(key_kinds(pre), COUNTER):
        assert out[k].dtype == torch.int64
        assert int(out[k]) == max(int(ft[k]) for ft in fts) == 1030
    assert not any(v.data_ptr() == pre[k].data_ptr() for k, v in out.items())  # fresh tensors


@pytest.mark.parametrize("method", sorted(ROBUST))
def test_robust_methods_take_their_statistic_of_heads_keep_keys_dtypes_and_integer_counters(models, method):
    _, pre, fts = models
    out, _ = merge(pre, fts, method=method)
    assert list(out) == list(pre)
    assert all(out[k].dtype == pre[k].dtype and out[k].shape == pre[k].shape for k in pre)
    for k in ("head.weight", "head.bias", "backbone.bn1.running_var"):
        _close(out[k], ROBUST[method](torch.stack([ft[k].double() for ft in fts])), k)
    for k in _params(pre)[:5]:
        moves = torch.stack([ft[k].double() - pre[k].double() for ft in fts])
        _close(out[k], pre[k].double() + 0.5 * 3 * ROBUST[method](moves), k)
    for k in keys_of(key_kinds(pre), COUNTER):
        assert out[k].dtype == torch.int64 and int(out[k]) == 1030
    assert not any(v.data_ptr() == pre[k].data_ptr() for k, v in out.items())


def _small(w, head, var, count) -> DataVector:
    kinds = {"w": PARAM, "head.bias": HEAD, "bn.running_var": BN_STAT, "bn.num_batches_tracked": COUNTER}
    return DataVector({"w": torch.tensor(w), "head.bias": torch.tensor(head), "bn.running_var": torch.tensor(var),
                       "bn.num_batches_tracked": torch.tensor(count)}, kinds)


SMALL_PRE = {"w": torch.tensor([1.0, 1.0, 1.0]), "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(0)}
SMALL = [_small([1.0, -2.0, 0.0], [0.0, 1.0], [1.0, 2.0], 3), _small([3.0, 5.0, 1000.0], [50.0, 1.0], [4.0, 8.0], 5),
         _small([2.0, 4.0, -1.0], [1.0, 2.0], [2.0, 1e6], 4), _small([0.0, 4.0, 2.0], [2.0, 0.0], [3.0, 4.0], 1)]


def test_median_hand_computed():
    # three sites: movement 1 + 0.5 * 3 * median; head and BN: their median; counter: the largest
    out, _ = merge(SMALL_PRE, SMALL[:3], method="median")
    assert out["w"].tolist() == [1 + 1.5 * 2, 1 + 1.5 * 4, 1 + 1.5 * 0]
    assert out["head.bias"].tolist() == [1.0, 1.0] and out["bn.running_var"].tolist() == [2.0, 8.0]
    assert int(out["bn.num_batches_tracked"]) == 5
    # four sites: the two middle values averaged (w: [1, 2] -> 1.5, [-2, 4, 4, 5] -> 4, [-1, 0, 1000, 2] -> 1)
    out, _ = merge(SMALL_PRE, SMALL, method="median", lam=0.25)
    assert out["w"].tolist() == [1 + 1.0 * 1.5, 1 + 1.0 * 4, 1 + 1.0 * 1]
    assert out["head.bias"].tolist() == [1.5, 1.0] and out["bn.running_var"].tolist() == [2.5, 6.0]


def test_trimmed_mean_hand_computed_and_trim_bounds():
    from dvlib.methods import trim_count

    assert [trim_count(n, 0.2) for n in (2, 3, 4, 5, 6, 10, 11)] == [0, 1, 1, 1, 2, 2, 3]
    assert trim_count(4, 0.0) == 0 and trim_count(3, 0.49) == 1
    out, _ = merge(SMALL_PRE, SMALL, method="trimmed_mean")  # 4 sites, trim 0.2: one cut at each end
    assert out["w"].tolist() == [1 + 0.5 * 4 * 1.5, 1 + 0.5 * 4 * 4.0, 1 + 0.5 * 4 * 1.0]
    assert out["head.bias"].tolist() == [1.5, 1.0]
    out, _ = merge(SMALL_PRE, SMALL, method="trimmed_mean", trim=0.0)  # nothing cut: the data vector
    ref, _ = merge(SMALL_PRE, SMALL, method="data_vector")
    assert torch.equal(out["w"], ref["w"]) and torch.equal(out["head.bias"], ref["head.bias"])
    for bad in (0.5, -0.1, float("nan")):
        with pytest.raises(DvlibError, match="trimmed_mean: trim"):
            merge(SMALL_PRE, SMALL, method="trimmed_mean", trim=bad)


@pytest.mark.parametrize("method", sorted(ROBUST))
@pytest.mark.parametrize("n", [2, 4])
def test_robust_methods_equal_the_data_vector_on_identical_vectors(models, method, n):
    _, pre, fts = models
    taus = DataVector.from_models([fts[0]] * n, pre)
    robust, rep = merge(pre, taus, method=method, lam=0.5)
    plain, _ = merge(pre, taus, method="data_vector", lam=0.5)
    assert list(robust) == list(plain) and all(torch.equal(robust[k], plain[k]) for k in plain), method
    assert rep["lam"] == 0.5 and METHODS[method].lam_from_run


def test_head_missing_from_pretrained_is_fine(models):
    _, pre, fts = models
    no_head = {k: v for k, v in pre.items() if not k.startswith("head.")}
    out, _ = merge(no_head, fts)
    assert list(out) == list(fts[0])
    _close(out["head.bias"], sum(ft["head.bias"].double() for ft in fts) / 3)


def test_bn_buffer_modes(models):
    _, pre, fts = models
    kinds = key_kinds(pre)
    bn_keys, counters = keys_of(kinds, BN_STAT), keys_of(kinds, COUNTER)
    assert len(bn_keys) == 40 and len(counters) == 20
    mean, _ = merge(pre, fts, bn_buffers="mean")
    from_pre, _ = merge(pre, fts, bn_buffers="pretrained")
    arith, _ = merge(pre, fts, bn_buffers="arithmetic", lam=0.5)
    arith_mean, _ = merge(pre, fts, method="params_mean", bn_buffers="arithmetic")
    for k in bn_keys:
        _close(mean[k], sum(ft[k].double() for ft in fts) / 3, k)
        assert torch.equal(from_pre[k], pre[k])
        _close(arith[k], pre[k].double() + 0.5 * sum(ft[k].double() - pre[k].double() for ft in fts), k)
        _close(arith_mean[k], mean[k], k)
    for k in counters:
        assert int(from_pre[k]) == 1000 and from_pre[k].dtype == torch.int64
        assert int(mean[k]) == int(arith[k]) == 1030
    assert set(BN_MODES) == {"mean", "pretrained", "arithmetic"}


def _negative_case():
    pre = {"conv.weight": torch.ones(2, 2), "bn.running_mean": torch.zeros(2),
           "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(5)}
    fts = [{"conv.weight": torch.full((2, 2), 1.0 + 0.1 * i), "bn.running_mean": torch.zeros(2),
            "bn.running_var": torch.full((2,), 0.1), "bn.num_batches_tracked": torch.tensor(7)} for i in range(4)]
    return pre, fts  # arithmetic: 1 + 0.5 * 4 * (0.1 - 1) = -0.8


def test_negative_variance_is_detected_and_raises():
    pre, fts = _negative_case()
    with pytest.raises(DvlibError, match=r"bn\.running_var: min -0\.8"):
        merge(pre, fts, bn_buffers="arithmetic", lam=0.5)
    out, _ = merge(pre, fts, bn_buffers="mean")  # the sane default is fine
    assert torch.allclose(out["bn.running_var"], torch.full((2,), 0.1))


def test_negative_variance_allowed_warns_and_records():
    pre, fts = _negative_case()
    with pytest.warns(RuntimeWarning, match=r"bn\.running_var"):
        out, report = merge(pre, fts, bn_buffers="arithmetic", lam=0.5, allow_negative_var=True)
    assert torch.allclose(out["bn.running_var"], torch.full((2,), -0.8))
    assert negative_variance_keys(out) == {"bn.running_var": pytest.approx(-0.8)}
    assert report["negative_variance"] == {"bn.running_var": pytest.approx(-0.8)}
    assert report["method"] == "data_vector" and report["n_models"] == 4
    # exact zeros are legitimate (dead channels of pretrained networks); negatives and NaN are not
    assert negative_variance_keys({"x.running_var": torch.tensor([1.0, 0.0])}) == {}
    assert negative_variance_keys({"x.running_var": torch.tensor([1.0, -1e-6])}) == {"x.running_var": pytest.approx(-1e-6)}
    assert "x.running_var" in negative_variance_keys({"x.running_var": torch.tensor([1.0, float("nan")])})
    assert negative_variance_keys({"x.running_var": torch.ones(3), "w": -torch.ones(2)}) == {}


# ------------------------------------------------------------------------------------ validation

def test_unknown_method_and_bn_mode_list_valid_ones(models):
    _, pre, fts = models
    with pytest.raises(DvlibError, match="unknown merge method 'avg'.*data_vector.*ties"):
        merge(pre, fts, method="avg")
    with pytest.raises(DvlibError, match="unknown bn_buffers 'reset'.*mean, pretrained, arithmetic"):
        merge(pre, fts, bn_buffers="reset")
    with pytest.raises(DvlibError, match=r"unknown option\(s\) \['densty'\]"):
        merge(pre, fts, method="ties", densty=0.3)


@pytest.mark.parametrize("lam", [math.nan, math.inf, -math.inf, "0.5"])
def test_lam_must_be_finite(lam):
    pre, fts = _negative_case()
    with pytest.raises(DvlibError, match="lam must be a finite number"):
        merge(pre, fts, lam=lam)


def test_lam_must_not_be_negative_and_the_output_must_be_finite():
    pre, fts = _negative_case()
    with pytest.raises(DvlibError, match=r"lam must be in \[0.0, inf\], got -1"):
        merge(pre, fts, lam=-1)
    with pytest.raises(DvlibError, match=r"(?s)the merged model is not finite.*'conv.weight' holds 4 Inf"):
        merge(pre, [{**ft, "conv.weight": torch.full((2, 2), 3e38)} for ft in fts], lam=1.0)
    with pytest.raises(DvlibError, match=r"'conv.weight' holds 4 Inf \(method data_vector, lam=1e\+308\)"):
        merge(pre, fts, lam=1e308)


def test_bad_inputs_named():
    pre, fts = _negative_case()
    with pytest.raises(DvlibError, match="at least 1"):
        merge(pre, [])
    with pytest.raises(DvlibError, match="list of state dicts"):
        merge(pre, fts[0])
    bad = [dict(ft) for ft in fts]
    bad[1]["conv.weight"] = torch.ones(3, 2)
    bad[2]["conv.weight"] = torch.tensor([[1.0, math.nan], [1.0, 1.0]])
    del bad[3]["bn.running_mean"]
    with pytest.raises(DvlibError) as e:
        merge(pre, bad, names=["a.safetensors", "b.safetensors", "c.safetensors", "d.safetensors"])
    msg = str(e.value)
    assert "b.safetensors: key 'conv.weight' has shape (3, 2)" in msg
    assert "c.safetensors: key 'conv.weight' holds 1 NaN" in msg
    assert "d.safetensors: missing key 'bn.running_mean'" in msg
    pre_bad = dict(pre, **{"conv.weight": torch.ones(2, 2, dtype=torch.float64)})
    del pre_bad["bn.running_var"]
    with pytest.raises(DvlibError) as e:
        merge(pre_bad, fts)
    assert "pretrained: key 'conv.weight' has dtype torch.float64" in str(e.value)
    assert "pretrained: missing key 'bn.running_var'" in str(e.value)
    with pytest.raises(DvlibError, match="p must be in"):
        merge(pre, fts, method="dare", p=1.0)
    with pytest.raises(DvlibError, match="density must be in"):
        merge(pre, fts, method="ties", density=0.0)


def test_one_entry_point_for_vectors_and_state_dicts(models):
    import dvlib.merging

    _, pre, fts = models
    assert merge is dvlib.merging.merge
    taus = DataVector.from_models(fts, pre)
    for method in ("data_vector", "ties"):
        from_dicts, rep_dicts = merge(pre, fts, method=method)
        from_vectors, rep_vectors = merge(pre, taus, method=method)
        assert list(from_dicts) == list(from_vectors) == list(pre)
        assert all(torch.equal(from_dicts[k], from_vectors[k]) for k in pre) and rep_dicts == rep_vectors


@pytest.mark.parametrize("method", sorted(METHODS))
def test_vectors_of_another_layout_are_refused_by_their_arithmetic(models, method):
    """Vectors merged in memory are checked by their own arithmetic (no other pass): every method,
    TIES too, names the key instead of failing inside torch."""
    _, pre, fts = models
    taus = DataVector.from_models(fts, pre)
    k = "backbone.fc.bias"
    short = DataVector({**taus[1].tensors, k: taus[1].tensors[k][:10]}, taus[1].kinds)
    weights = [1, 2, 3] if method == "weighted" else None
    with pytest.raises(DvlibError, match=r"key 'backbone\.fc\.bias' has shape \(10,\)"):
        merge(pre, [taus[0], short, taus[2]], method=method, weights=weights)
    no_var = {n: v for n, v in pre.items() if n != "backbone.bn1.running_var"}
    with pytest.raises(DvlibError, match=r"'backbone\.bn1\.running_var': a BatchNorm statistic with no pretrained"):
        merge(no_var, taus, method=method, weights=weights, bn_buffers="arithmetic")


# ------------------------------------------------------------------------------------ properties

@st.composite
def _state_dicts(draw):
    n = draw(st.integers(1, 4))
    shapes = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pre = {f"l{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    pre["head.weight"] = torch.randn(2, 3, generator=g)
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(n)]
    return pre, fts


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_state_dicts(), st.floats(0, 2))
def test_property_identities(case, lam):
    pre, fts = case
    n = len(fts)
    params = [k for k in pre if not k.startswith("head.")]
    mean, _ = merge(pre, fts, method="params_mean")
    dv_n, _ = merge(pre, fts, method="data_vector", lam=1 / n)
    dv, _ = merge(pre, fts, method="data_vector", lam=lam)
    dare0, _ = merge(pre, fts, method="dare", lam=lam, p=0.0, seed=1)
    for k in params:
        _close(dv_n[k], mean[k], k)
        assert torch.equal(dare0[k], dv[k])
    # one model: TIES with density 1 is pre + lam * tau, and so is data_vector
    t1, _ = merge(pre, fts[:1], method="ties", lam=lam, density=1.0)
    for k in params:
        _close(t1[k], pre[k].double() + lam * (fts[0][k].double() - pre[k].double()), k)
    # merging identical copies: params_mean and weighted give the copy back
    same, _ = merge(pre, [fts[0]] * n, method="weighted", weights=list(range(1, n + 1)))
    for k in pre:
        _close(same[k], fts[0][k], k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge(pre, fts, method="random_vector", lam=lam)
