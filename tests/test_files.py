"""Model files: one .safetensors file per model, metadata inside, refused when unsafe or broken."""
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

from dvlib import __version__
from dvlib.checks import finite_problems, layout_problems
from dvlib.coordinator import load_vectors
from dvlib.files import (FORMAT_VERSION, VectorFile, load_model, load_vector, read, save_model, save_vector)
from dvlib.io import DvlibError
from dvlib.models import state_dict_sha256
from dvlib.vectors import BN_STAT, COUNTER, HEAD, PARAM, DataVector, key_kinds, keys_of

CLASSES = ["benign", "malignant", "normal"]




def _meta(**over):
    return {"arch": "smallcnn", "head": "append", "weights": "random", "build_seed": 0, "image_size": 32,
            "classes": CLASSES, "sample_count": 120, "pretrained_sha256": "ab" * 32, **over}


def _write(path: Path, pre, ft, **meta):
    return save_vector(path, DataVector.between(ft, pre), _meta(**meta))


def test_layout_and_finite_problems_list_every_problem():
    ref = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1), "n": torch.tensor(1)}
    bad = {"a": torch.ones(3), "b": torch.ones(3, dtype=torch.float64), "d": torch.ones(1), "n": torch.tensor(2)}
    nan = {"a": torch.tensor([1.0, math.nan]), "b": torch.tensor([math.inf, 1.0, -math.inf]),
           "c": torch.ones(1), "n": torch.tensor(1)}
    assert layout_problems([ref, ref], ["x", "y"]) == []
    msg = "\n".join(layout_problems([ref, bad, nan], ["ref.st", "bad.st", "nan.st"]) + finite_problems(nan, "nan.st"))
    for line in ("bad.st: key 'a' has shape (3,), ref.st has (2,)",
                 "bad.st: key 'b' has dtype torch.float64, ref.st has torch.float32",
                 "bad.st: missing key 'c' (present in ref.st)",
                 "bad.st: extra key 'd' (not in ref.st)",
                 "nan.st: key 'a' holds 1 NaN",
                 "nan.st: key 'b' holds 2 Inf"):
        assert line in msg, (line, msg)
    assert len(msg.splitlines()) == 6


def test_save_load_round_trip_exact(tmp_path, pair):
    pre, ft = pair
    path = _write(tmp_path / "h1.safetensors", pre, ft, hospital="h1", split_seed=3)
    vf = load_vector(path)
    assert isinstance(vf, VectorFile) and vf.path == path
    kinds = key_kinds(ft)
    tau = DataVector.between(ft, pre)
    assert list(vf.vector) == list(tau.params)
    for k, t in tau.params.items():
        assert vf.vector[k].dtype == t.dtype and torch.equal(vf.vector[k], t)
    assert set(vf.head) == {"head.weight", "head.bias"}
    assert set(vf.bn) == set(keys_of(kinds, BN_STAT, COUNTER))
    for k in vf.bn:
        assert vf.bn[k].dtype == ft[k].dtype and torch.equal(vf.bn[k], ft[k])
    assert vf.meta["format_version"] == FORMAT_VERSION == 1
    assert vf.meta["dvlib_version"] == __version__ and vf.meta["kind"] == "site_vector"
    assert vf.meta["classes"] == CLASSES and vf.classes == CLASSES and vf.sample_count == 120
    assert vf.meta["hospital"] == "h1" and vf.meta["split_seed"] == 3
    full = vf.tau.apply_to({k: v for k, v in pre.items() if kinds[k] != HEAD})
    assert set(full) == set(ft)
    for k in ft:
        torch.testing.assert_close(full[k], ft[k], rtol=0, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["h1.safetensors"]  # no temp files left
    assert path.stat().st_mode & 0o777 == 0o600  # what was learnt from patients: owner only


def test_model_file_round_trip_keeps_metadata_inside(tmp_path, pair):
    _, ft = pair
    path = save_model(tmp_path / "m.safetensors", ft, {**_meta(), "kind": "merged", "method": "data_vector"})
    mf = load_model(path)
    assert list(mf.state) == list(ft) and all(torch.equal(mf.state[k], ft[k]) for k in ft)
    assert mf.meta["method"] == "data_vector" and mf.meta["kind"] == "merged"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # one file: no sidecar to disagree with
    with pytest.raises(DvlibError, match="a merged model file, not a site's vector file"):
        load_vector(path)
    with pytest.raises(DvlibError, match="a site's vector file, not a model file"):
        load_model(_write(tmp_path / "v.safetensors", *pair))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), min_size=1,
                max_size=4), st.integers(0, 2**31 - 1))
def test_round_trip_property(dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    vec = {f"backbone.l{i}.weight": torch.randn(2, i + 1, generator=g).to(d) for i, d in enumerate(dtypes)}
    head = {"head.weight": torch.randn(len(CLASSES), 2, generator=g)}
    bn = {"backbone.bn.running_var": torch.rand(3, generator=g), "backbone.bn.num_batches_tracked": torch.tensor(9)}
    kinds = {**{k: PARAM for k in vec}, "head.weight": HEAD, "backbone.bn.running_var": BN_STAT,
             "backbone.bn.num_batches_tracked": COUNTER}
    with tempfile.TemporaryDirectory() as d:
        vf = load_vector(save_vector(Path(d) / "v.safetensors", DataVector({**vec, **head, **bn}, kinds),
                                     _meta(sample_count=seed)))
    for mine, theirs in ((vec, vf.vector), (head, vf.head), (bn, vf.bn)):
        assert list(mine) == list(theirs)
        assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    assert vf.sample_count == seed


def test_save_refuses_nan_and_writes_nothing(tmp_path, pair):
    pre, ft = pair
    tau = DataVector.between(ft, pre)
    bad = tau.map(lambda k, t: t.clone().fill_(math.nan) if k == "backbone.features.0.weight" else t)
    path = tmp_path / "h.safetensors"
    with pytest.raises(DvlibError, match=r"h\.safetensors: 'vector/backbone\.features\.0\.weight' holds \d+ NaN"):
        save_vector(path, bad, _meta())
    with pytest.raises(DvlibError, match="metadata lacks 'pretrained_sha256'"):
        save_vector(path, tau, {k: v for k, v in _meta().items() if k != "pretrained_sha256"})
    with pytest.raises(DvlibError, match="written as .safetensors"):
        save_vector(tmp_path / "h.pt", tau, _meta())
    with pytest.raises(DvlibError, match="metadata 'weights' must be a bare file name"):
        save_vector(path, tau, _meta(weights="/etc/passwd"))
    with pytest.raises(DvlibError, match="one model's data vector"):
        save_vector(path, tau + tau, _meta())
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_pickles(tmp_path, pair):
    pre, ft = pair
    pt = tmp_path / "h.pt"
    torch.save(DataVector.between(ft, pre).params, pt)
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
    with pytest.raises(DvlibError, match=r"missing\.safetensors: file not found"):
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
    good = {"format_version": 1, "kind": "site_vector", **_meta()}
    t = {"vector/w": torch.tensor([1.0, math.inf]), "head/h": torch.ones(2)}
    with pytest.raises(DvlibError, match=r"nan\.safetensors: 'vector/w' holds 1 Inf"):
        load_vector(_raw(tmp_path / "nan.safetensors", t, good))
    t = {"vector/w": torch.ones(2)}
    with pytest.raises(DvlibError, match=r"new\.safetensors: format_version 2 is newer.*upgrade dvlib"):
        load_vector(_raw(tmp_path / "new.safetensors", t, {**good, "format_version": 2}))
    with pytest.raises(DvlibError, match=r"old\.safetensors: invalid format_version '1'"):
        load_vector(_raw(tmp_path / "old.safetensors", t, {**good, "format_version": "1"}))
    with pytest.raises(DvlibError, match=r"bare\.safetensors: not a dvlib model file"):
        save_file(t, str(tmp_path / "bare.safetensors"))
        load_vector(tmp_path / "bare.safetensors")
    with pytest.raises(DvlibError, match=r"odd\.safetensors: unexpected tensor 'w'"):
        load_vector(_raw(tmp_path / "odd.safetensors", {"w": torch.ones(1), **t}, good))
    with pytest.raises(DvlibError, match=r"nometa\.safetensors: metadata lacks 'classes'"):
        load_vector(_raw(tmp_path / "nometa.safetensors", t, {k: v for k, v in good.items() if k != "classes"}))
    with pytest.raises(DvlibError, match=r"path\.safetensors: metadata 'weights' must be a bare file name"):
        load_vector(_raw(tmp_path / "path.safetensors", t, {**good, "weights": "../../etc/passwd"}))


def test_load_vectors_names_files_and_keys(tmp_path, pair):
    pre, ft = pair
    a = _write(tmp_path / "a.safetensors", pre, ft)
    b = _write(tmp_path / "b.safetensors", pre, {**ft, "head.bias": ft["head.bias"] + 1})
    assert len(load_vectors([a, b])) == 2
    with pytest.raises(DvlibError, match=r"at least 2 site vector files.*a\.safetensors"):
        load_vectors([a])
    order = _write(tmp_path / "order.safetensors", pre, ft, classes=CLASSES[::-1])
    sha = _write(tmp_path / "sha.safetensors", pre, ft, pretrained_sha256="cd" * 32)
    other = _write(tmp_path / "other.safetensors", pre, ft, classes=["x", "y", "z"])
    tau = DataVector.between(ft, pre)
    tensors = {**tau.tensors, "backbone.fc.bias": torch.zeros(11)}
    del tensors["head.bias"]
    shape = save_vector(tmp_path / "shape.safetensors",
                        DataVector(tensors, {k: tau.kinds[k] for k in tensors}), _meta())
    with pytest.raises(DvlibError) as e:
        load_vectors([a, order, sha, other, shape])
    msg = str(e.value)
    assert "order.safetensors: the same classes in a different order: ['normal', 'malignant', 'benign']" in msg
    assert f"sha.safetensors: pretrained_sha256 '{'cd' * 32}' differs" in msg
    assert "other.safetensors: different classes" in msg
    assert "shape.safetensors: key 'backbone.fc.bias' has shape (11,)" in msg
    assert "shape.safetensors: missing key 'head.bias'" in msg
    with pytest.raises(DvlibError, match=r"b\.safetensors: given twice"):
        load_vectors([a, b, b])
    (tmp_path / "copy.safetensors").write_bytes(a.read_bytes())
    with pytest.raises(DvlibError, match=r"copy\.safetensors: the same bytes as .*a\.safetensors; each site counts once"):
        load_vectors([a, b, tmp_path / "copy.safetensors"])


def test_pretrained_sha_matches_models_helper(net):
    # the sha in vector files is dvlib.models.state_dict_sha256 of the pretrained backbone
    assert net.pretrained_sha256 == state_dict_sha256(net.backbone.state_dict())


def test_truncated_header_length_is_checked(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(DvlibError, match=r"h\.safetensors: truncated or corrupt.*header claims 1000000"):
        read(p)
