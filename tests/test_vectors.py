"""dvlib.vectors: key kinds, vector arithmetic, compatibility checks, vector files."""
from __future__ import annotations

import json
import math
import pickle
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from dvlib import __version__
from dvlib.io import DvlibError
from dvlib.models import build, state_dict_sha256
from dvlib.vectors import (BN_STAT, COUNTER, FORMAT_VERSION, HEAD, PARAM, VectorFile, add, apply,
                           check_compatible, check_mergeable, data_vector, finetuned_state_dict, key_kinds,
                           keys_of, layer_cosine, layer_norms, load_vector, save_vector, scale, vsum)

CLASSES = ["benign", "malignant", "normal"]



@pytest.fixture(scope="module")
def net():
    return build("smallcnn", num_classes=3, weights="random", seed=0)


@pytest.fixture(scope="module")
def pair(net):
    pre = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    ft = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3)
          for k, v in pre.items()}
    return pre, ft


def _meta(**over):
    return {"arch": "smallcnn", "classes": CLASSES, "sample_count": 120, "pretrained_sha256": "ab" * 32, **over}


def _write(path: Path, pre, ft, **meta):
    kinds = key_kinds(ft)
    tau = data_vector(ft, pre, kinds)
    head = {k: ft[k] for k in keys_of(kinds, HEAD)}
    bn = {k: ft[k] for k in keys_of(kinds, BN_STAT, COUNTER)}
    return save_vector(path, tau, head, bn, _meta(**meta))


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

def test_data_vector_only_params_and_apply_inverts_it(pair):
    pre, ft = pair
    kinds = key_kinds(ft)
    tau = data_vector(ft, pre)
    assert list(tau) == keys_of(kinds, PARAM)
    for k, t in tau.items():
        assert torch.equal(t, ft[k] - pre[k])
    back = apply(pre, tau)
    assert list(back) == list(pre)
    for k in pre:
        if kinds[k] == PARAM:
            torch.testing.assert_close(back[k], ft[k], rtol=0, atol=1e-6)
        else:
            assert torch.equal(back[k], pre[k]) and back[k].data_ptr() != pre[k].data_ptr()
    half = apply(pre, tau, lam=0.5)
    for k in tau:
        torch.testing.assert_close(half[k].double(), pre[k].double() + 0.5 * tau[k].double(), rtol=0, atol=1e-7)
    with pytest.raises(DvlibError, match="PARAM key missing from the vector"):
        apply(pre, {k: v for k, v in list(tau.items())[1:]})
    with pytest.raises(DvlibError, match="lam must be a finite number"):
        apply(pre, tau, lam=math.nan)


def test_add_scale_vsum_norms_cosine():
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, 4, generator=g), "y": torch.randn(7, generator=g)}
    b = {"x": torch.randn(3, 4, generator=g), "y": torch.randn(7, generator=g)}
    c = {"x": torch.randn(3, 4, generator=g), "y": torch.randn(7, generator=g)}
    assert all(torch.equal(add(a, b)[k], a[k] + b[k]) for k in a)
    assert all(torch.equal(scale(a, -2.5)[k], a[k] * -2.5) for k in a)
    s = vsum([a, b, c])
    assert all(torch.allclose(s[k], a[k] + b[k] + c[k], atol=1e-6) for k in a)
    assert all(torch.equal(vsum([a])[k], a[k]) for k in a)
    norms = layer_norms(a)
    for k in a:
        assert norms[k] == pytest.approx(math.sqrt(sum(float(v) ** 2 for v in a[k].reshape(-1).tolist())), rel=1e-12)
    cos = layer_cosine(a, b)
    for k in a:
        x, y = a[k].reshape(-1).tolist(), b[k].reshape(-1).tolist()
        exp = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
        assert cos[k] == pytest.approx(exp, rel=1e-12)
    assert layer_cosine(a, a)["x"] == pytest.approx(1.0)
    assert layer_cosine(a, scale(a, -1))["y"] == pytest.approx(-1.0)
    assert math.isnan(layer_cosine(a, {"x": torch.zeros(3, 4), "y": b["y"]})["x"])
    with pytest.raises(DvlibError, match="only in the first: \\['y'\\]"):
        add(a, {"x": b["x"]})
    with pytest.raises(DvlibError, match="x: \\(3, 4\\) vs \\(12,\\)"):
        vsum([a, {"x": b["x"].reshape(-1), "y": b["y"]}])


def test_check_compatible_lists_every_problem():
    ref = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1), "n": torch.tensor(1)}
    bad = {"a": torch.ones(3), "b": torch.ones(3, dtype=torch.float64), "d": torch.ones(1),
           "n": torch.tensor(2)}
    nan = {"a": torch.tensor([1.0, math.nan]), "b": torch.tensor([math.inf, 1.0, -math.inf]),
           "c": torch.ones(1), "n": torch.tensor(1)}
    check_compatible([ref, ref])
    with pytest.raises(DvlibError) as e:
        check_compatible([ref, bad, nan], names=["ref.st", "bad.st", "nan.st"])
    msg = str(e.value)
    for line in ("bad.st: key 'a' has shape (3,), ref.st has (2,)",
                 "bad.st: key 'b' has dtype torch.float64, ref.st has torch.float32",
                 "bad.st: missing key 'c' (present in ref.st)",
                 "bad.st: extra key 'd' (not in ref.st)",
                 "nan.st: key 'a' holds 1 NaN",
                 "nan.st: key 'b' holds 2 Inf"):
        assert line in msg, (line, msg)
    assert "6 problems" in msg
    with pytest.raises(DvlibError, match="state_dict\\[0\\]: key 'a' holds 1 NaN"):
        check_compatible([nan])


# ------------------------------------------------------------------------------------ vector files

def test_save_load_round_trip_exact(tmp_path, pair):
    pre, ft = pair
    path = _write(tmp_path / "h1.safetensors", pre, ft, hospital="h1", split_seed=3)
    vf = load_vector(path)
    assert isinstance(vf, VectorFile) and vf.path == path
    kinds = key_kinds(ft)
    tau = data_vector(ft, pre)
    assert list(vf.vector) == list(tau)
    for k in tau:
        assert vf.vector[k].dtype == tau[k].dtype and torch.equal(vf.vector[k], tau[k])
    assert set(vf.head) == {"head.weight", "head.bias"}
    assert set(vf.bn) == set(keys_of(kinds, BN_STAT, COUNTER))
    for k in vf.bn:
        assert vf.bn[k].dtype == ft[k].dtype and torch.equal(vf.bn[k], ft[k])
    assert vf.meta["format_version"] == FORMAT_VERSION == 1
    assert vf.meta["dvlib_version"] == __version__
    assert vf.meta["classes"] == CLASSES and vf.classes == CLASSES and vf.sample_count == 120
    assert vf.meta["hospital"] == "h1" and vf.meta["split_seed"] == 3
    full = finetuned_state_dict(pre, vf)
    assert list(full) == list(ft)
    for k in ft:
        torch.testing.assert_close(full[k], ft[k], rtol=0, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["h1.safetensors"]  # no temp files left


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), min_size=1,
                max_size=4), st.integers(0, 2**31 - 1))
def test_round_trip_property(dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    vec = {f"backbone.l{i}.weight": torch.randn(2, i + 1, generator=g).to(d) for i, d in enumerate(dtypes)}
    head = {"head.weight": torch.randn(2, 3, generator=g)}
    bn = {"backbone.bn.running_var": torch.rand(3, generator=g), "backbone.bn.num_batches_tracked": torch.tensor(9)}
    with tempfile.TemporaryDirectory() as d:
        vf = load_vector(save_vector(Path(d) / "v.safetensors", vec, head, bn, _meta(sample_count=seed)))
    for mine, theirs in ((vec, vf.vector), (head, vf.head), (bn, vf.bn)):
        assert list(mine) == list(theirs)
        assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    assert vf.sample_count == seed


def test_save_refuses_nan_and_writes_nothing(tmp_path, pair):
    pre, ft = pair
    tau = data_vector(ft, pre)
    tau["backbone.features.0.weight"] = tau["backbone.features.0.weight"].clone()
    tau["backbone.features.0.weight"][0, 0, 0, 0] = math.nan
    path = tmp_path / "h.safetensors"
    with pytest.raises(DvlibError, match=r"h\.safetensors: 'vector/backbone\.features\.0\.weight' holds 1 NaN"):
        save_vector(path, tau, {}, {}, _meta())
    with pytest.raises(DvlibError, match="metadata lacks 'pretrained_sha256'"):
        save_vector(path, data_vector(ft, pre), {}, {}, {k: v for k, v in _meta().items() if k != "pretrained_sha256"})
    with pytest.raises(DvlibError, match="must end in .safetensors"):
        save_vector(tmp_path / "h.pt", data_vector(ft, pre), {}, {}, _meta())
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_pickles(tmp_path, pair):
    pre, ft = pair
    pt = tmp_path / "h.pt"
    torch.save(data_vector(ft, pre), pt)
    with pytest.raises(DvlibError, match=r"h\.pt: pickle files are refused"):
        load_vector(pt)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DvlibError, match=r"evil\.safetensors: pickle files are refused"):
        load_vector(disguised)
    zipped = tmp_path / "zip.safetensors"
    torch.save({"a": torch.ones(1)}, zipped)
    with pytest.raises(DvlibError, match=r"zip\.safetensors: pickle files are refused"):
        load_vector(zipped)
    with pytest.raises(DvlibError, match=r"missing\.safetensors: vector file not found"):
        load_vector(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("cut", [3, 20, 200, -5])
def test_load_refuses_truncated(tmp_path, pair, cut):
    pre, ft = pair
    path = _write(tmp_path / "t.safetensors", pre, ft)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(DvlibError, match=r"t\.safetensors: (truncated or corrupt|not a safetensors)"):
        load_vector(path)


def _raw(path: Path, tensors: dict, meta: dict) -> Path:
    save_file(tensors, str(path), metadata={"dvlib": json.dumps(meta)})
    return path


def test_load_refuses_nan_newer_version_and_bad_layout(tmp_path):
    good = {"format_version": 1, **_meta()}
    t = {"vector/w": torch.tensor([1.0, math.inf]), "head/h": torch.ones(2)}
    with pytest.raises(DvlibError, match=r"nan\.safetensors: 'vector/w' holds 1 Inf"):
        load_vector(_raw(tmp_path / "nan.safetensors", t, good))
    t = {"vector/w": torch.ones(2)}
    with pytest.raises(DvlibError, match=r"new\.safetensors: format_version 2 is newer.*upgrade dvlib"):
        load_vector(_raw(tmp_path / "new.safetensors", t, {**good, "format_version": 2}))
    with pytest.raises(DvlibError, match=r"old\.safetensors: invalid format_version '1'"):
        load_vector(_raw(tmp_path / "old.safetensors", t, {**good, "format_version": "1"}))
    with pytest.raises(DvlibError, match=r"bare\.safetensors: not a dvlib vector file"):
        save_file(t, str(tmp_path / "bare.safetensors"))
        load_vector(tmp_path / "bare.safetensors")
    with pytest.raises(DvlibError, match=r"odd\.safetensors: unexpected tensor 'w'"):
        load_vector(_raw(tmp_path / "odd.safetensors", {"w": torch.ones(1), **t}, good))
    with pytest.raises(DvlibError, match=r"nometa\.safetensors: metadata lacks 'classes'"):
        load_vector(_raw(tmp_path / "nometa.safetensors", t, {k: v for k, v in good.items() if k != "classes"}))


def test_check_mergeable_names_files_and_keys(tmp_path, pair):
    pre, ft = pair
    a = load_vector(_write(tmp_path / "a.safetensors", pre, ft))
    b = load_vector(_write(tmp_path / "b.safetensors", pre, ft))
    check_mergeable([a, b])
    with pytest.raises(DvlibError, match=r"at least 2 vector files.*a\.safetensors"):
        check_mergeable([a])
    order = load_vector(_write(tmp_path / "order.safetensors", pre, ft, classes=CLASSES[::-1]))
    sha = load_vector(_write(tmp_path / "sha.safetensors", pre, ft, pretrained_sha256="cd" * 32))
    other = load_vector(_write(tmp_path / "other.safetensors", pre, ft, classes=["x", "y", "z"]))
    shape = load_vector(_write(tmp_path / "shape.safetensors", pre, ft))
    shape.vector["backbone.fc.bias"] = torch.zeros(11)
    del shape.head["head.bias"]
    with pytest.raises(DvlibError) as e:
        check_mergeable([a, order, sha, other, shape])
    msg = str(e.value)
    assert "order.safetensors: the same classes in a different order: ['normal', 'malignant', 'benign']" in msg
    assert f"sha.safetensors: pretrained_sha256 {'cd' * 32} differs" in msg
    assert "other.safetensors: different classes" in msg
    assert "shape.safetensors [vector]: key 'backbone.fc.bias' has shape (11,)" in msg
    assert "shape.safetensors [head]: missing key 'head.bias'" in msg


def test_pretrained_sha_matches_models_helper(net):
    # the sha in vector files is dvlib.models.state_dict_sha256 of the pretrained backbone
    assert net.pretrained_sha256 == state_dict_sha256(net.backbone.state_dict())


def test_truncated_header_length_is_checked(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(DvlibError, match=r"h\.safetensors: truncated or corrupt.*header claims 1000000"):
        load_vector(p)
