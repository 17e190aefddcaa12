"""Data vectors: key kinds and the DataVector value type (tau = theta_i - theta_pre, +, *, sum)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dvlib.io import DvlibError
from dvlib.vectors import BN_STAT, COUNTER, HEAD, PARAM, DataVector, key_kinds, keys_of




# ------------------------------------------------------------------------------------------- kinds

def test_key_kinds_from_model_and_by_name_agree(net):
    sd = net.state_dict()
    by_model, by_name = key_kinds(sd, model=net), key_kinds(sd)
    assert by_model == by_name
    assert list(by_model) == list(sd)
    assert by_model["head.weight"] == HEAD and by_model["head.bias"] == HEAD
    assert by_model["backbone.features.1.running_var"] == BN_STAT
    assert by_model["backbone.features.1.num_batches_tracked"] == COUNTER
    assert by_model["backbone.features.1.weight"] == PARAM  # BN affine weight is a pretrained parameter
    assert by_model["backbone.fc.weight"] == PARAM
    assert sum(k == COUNTER for k in by_model.values()) == 4


def test_key_kinds_never_by_dtype():
    sd = {"a.weight": torch.ones(2), "a.num_batches_tracked": torch.tensor(3.0),
          "my_head.w": torch.ones(2), "bn.running_mean": torch.zeros(2)}
    kinds = key_kinds(sd, head_prefixes="my_head.")
    assert kinds == {"a.weight": PARAM, "a.num_batches_tracked": COUNTER, "my_head.w": HEAD,
                     "bn.running_mean": BN_STAT}
    with pytest.raises(DvlibError, match=r"a\.steps: param tensor has non-floating dtype torch\.int64") as e:
        key_kinds({"a.steps": torch.tensor(3), "b.mask": torch.tensor([True]), "w": torch.ones(1)})
    assert "b.mask" in str(e.value)  # every problem at once


def test_key_kinds_model_rejects_unknown_buffers_and_strays():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.bn = nn.BatchNorm1d(2)
            self.register_buffer("ema_scale", torch.ones(1))
            self.register_buffer("tmp", torch.ones(1), persistent=False)

    m = M()
    sd = m.state_dict()
    assert "tmp" not in sd
    with pytest.raises(DvlibError, match="ema_scale: buffer of M is neither a BatchNorm statistic"):
        key_kinds(sd, model=m)
    del sd["ema_scale"]
    kinds = key_kinds(sd, model=m)
    assert kinds["bn.running_mean"] == BN_STAT and kinds["bn.num_batches_tracked"] == COUNTER
    with pytest.raises(DvlibError, match="extra.w: not a parameter or buffer of M"):
        key_kinds({**sd, "extra.w": torch.ones(1)}, model=m)
    sd.pop("lin.bias")
    with pytest.raises(DvlibError, match="lin.bias: parameter of M missing"):
        key_kinds(sd, model=m)


# -------------------------------------------------------------------------------------- arithmetic

def test_between_holds_movements_and_carries_the_rest(pair):
    pre, ft = pair
    kinds = key_kinds(ft)
    tau = DataVector.between(ft, pre)
    assert list(tau.params) == keys_of(kinds, PARAM)
    for k, t in tau.params.items():
        assert torch.equal(t, ft[k] - pre[k])
    for k in keys_of(kinds, HEAD, BN_STAT, COUNTER):
        assert torch.equal(tau.tensors[k], ft[k])
    back = tau.apply_to(pre)
    assert list(back) == list(pre)
    for k in pre:
        if kinds[k] == PARAM:
            torch.testing.assert_close(back[k], ft[k], rtol=0, atol=1e-6)
        else:  # head, BN statistics and counters: the fine-tuned model's own (a copy)
            assert torch.equal(back[k], ft[k]) and back[k].data_ptr() != ft[k].data_ptr()
    half = (0.5 * tau).apply_to(pre)
    for k in tau.params:
        torch.testing.assert_close(half[k].double(), pre[k].double() + 0.5 * tau.params[k].double(), rtol=0, atol=1e-7)
    body = {k: v for k, v in pre.items() if kinds[k] != HEAD}
    with pytest.raises(DvlibError, match="missing from the pretrained state dict"):
        DataVector.between(ft, {k: v for k, v in body.items() if k != "backbone.fc.weight"})
    with pytest.raises(DvlibError, match="scaling factor must be a finite number"):
        math.nan * tau
    with pytest.raises(DvlibError, match="in the pretrained state dict but not in the vector"):
        DataVector({k: t for k, t in tau.tensors.items() if k != "backbone.fc.bias"},
                   {k: kd for k, kd in tau.kinds.items() if k != "backbone.fc.bias"}).apply_to(pre)


def _vec(g, **kinds):
    shapes = {"x": (3, 4), "y": (7,), "head.w": (2, 3), "bn.running_mean": (3,), "bn.num_batches_tracked": ()}
    out = {}
    for k, kd in kinds.items():
        out[k] = torch.randint(0, 50, (), generator=g) if kd == COUNTER else torch.randn(shapes[k], generator=g)
    return DataVector(out, kinds)


def test_plus_times_sum_weighted_norms_cosine():
    g = torch.Generator().manual_seed(0)
    kinds = {"x": PARAM, "y": PARAM, "head.w": HEAD, "bn.running_mean": BN_STAT, "bn.num_batches_tracked": COUNTER}
    a, b, c = (_vec(g, **kinds) for _ in range(3))
    ab = a + b
    assert all(torch.equal(ab.tensors[k], a.tensors[k] + b.tensors[k]) for k in ("x", "y", "head.w"))
    assert torch.equal(ab.tensors["bn.num_batches_tracked"], torch.maximum(a.tensors["bn.num_batches_tracked"],
                                                                            b.tensors["bn.num_batches_tracked"]))
    scaled = -2.5 * a
    assert all(torch.equal(scaled.params[k], a.params[k] * -2.5) for k in a.params)
    assert torch.equal(scaled.tensors["head.w"], a.tensors["head.w"])  # lambda scales the movement only
    s = sum([a, b, c])
    assert s.weight == 3
    assert all(torch.allclose(s.params[k], a.params[k] + b.params[k] + c.params[k], atol=1e-6) for k in a.params)
    mean_head = (a.tensors["head.w"] + b.tensors["head.w"] + c.tensors["head.w"]) / 3
    torch.testing.assert_close(s.part(HEAD)["head.w"], mean_head, rtol=0, atol=1e-6)
    w = a.weighted(3.0) + b.weighted(1.0)
    torch.testing.assert_close(w.params["x"], 3 * a.params["x"] + b.params["x"], rtol=0, atol=1e-6)
    torch.testing.assert_close(w.part(HEAD)["head.w"], (3 * a.tensors["head.w"] + b.tensors["head.w"]) / 4,
                               rtol=0, atol=1e-6)
    norms = a.norms()
    for k in a.params:
        assert norms[k] == pytest.approx(math.sqrt(sum(float(v) ** 2 for v in a.params[k].reshape(-1).tolist())),
                                         rel=1e-12)
    cos = a.cosine(b)
    for k in a.params:
        x, y = a.params[k].reshape(-1).tolist(), b.params[k].reshape(-1).tolist()
        exp = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
        assert cos[k] == pytest.approx(exp, rel=1e-12)
    assert a.cosine(a)["x"] == pytest.approx(1.0)
    assert a.cosine(-1 * a)["y"] == pytest.approx(-1.0)
    assert math.isnan(a.cosine(0 * a)["x"])
    with pytest.raises(DvlibError, match=r"right: missing key 'y' \(present in left\)"):
        a + DataVector({k: v for k, v in b.tensors.items() if k != "y"}, {k: v for k, v in b.kinds.items() if k != "y"})
    with pytest.raises(DvlibError, match=r"key 'x' has shape \(12,\), left has \(3, 4\)"):
        sum([a, DataVector({**b.tensors, "x": b.tensors["x"].reshape(-1)}, b.kinds)])
    with pytest.raises(DvlibError, match="'x': param on the left, head on the right"):
        a + DataVector(b.tensors, {**b.kinds, "x": HEAD})


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.floats(0, 2), st.integers(0, 10**6))
def test_sum_then_apply_is_the_papers_formula(n, lam, seed):
    """(lam * sum(taus)).apply_to(pre) == pre + lam * sum(theta_i - pre) for parameters, mean heads."""
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64)}
    thetas = [{"w": pre["w"] + torch.randn(4, 3, generator=g, dtype=torch.float64),
               "head.w": torch.randn(2, generator=g, dtype=torch.float64)} for _ in range(n)]
    taus = [DataVector.between(t, pre, {"w": PARAM, "head.w": HEAD}) for t in thetas]
    out = (lam * sum(taus)).apply_to(pre)
    ref = pre["w"] + lam * sum(t["w"] - pre["w"] for t in thetas)
    torch.testing.assert_close(out["w"], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["head.w"], torch.stack([t["head.w"] for t in thetas]).mean(0), rtol=1e-12, atol=1e-12)
