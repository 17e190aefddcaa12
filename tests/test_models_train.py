"""Models (heads, strict weights, real ImageNet weights), weighted CE, metrics, checkpoints."""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

from dvlib import models, train
from dvlib.files import load_model, save_model
from dvlib.metrics import compute_metrics
from dvlib.io import DvlibError


@pytest.mark.parametrize("head, in_features", [("append", 1000), ("replace", 1280)])
def test_efficientnet_heads(head, in_features):
    net = models.build("efficientnet_lite0", 6, weights="imagenet", head=head)
    assert net.head.in_features == in_features and net.head.out_features == 6
    assert net.head_keys() == ["head.weight", "head.bias"]
    assert all(k.startswith("backbone.") for k in net.pretrained_keys())
    assert len(net.pretrained_keys()) + 2 == len(net.state_dict())
    # the backbone equals the shipped ImageNet weights exactly
    ref = models.efficientnet_lite0_imagenet()
    sd = net.backbone.state_dict()
    for k, v in sd.items():
        if k in ref:
            assert torch.equal(v, ref[k]), k
    if head == "append":
        assert set(sd) == set(ref)


def test_offline_efficientnet_weights_are_real_imagenet_weights():
    skimage = pytest.importorskip("skimage")
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    net = models.build("efficientnet_lite0", 2, weights="imagenet").eval()
    with torch.no_grad():
        logits = net.backbone((img - net.mean) / net.std)  # the 1000-way ImageNet output
    assert 281 <= int(logits.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_same_seed_same_start_and_head_seeded():
    a = models.build("smallcnn", 3, weights="random", seed=1).state_dict()
    b = models.build("smallcnn", 3, weights="random", seed=1).state_dict()
    c = models.build("smallcnn", 3, weights="random", seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_resnet50_from_a_local_file_loads_strictly(tmp_path):
    import torchvision

    sd = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(sd, tmp_path / "r50.pth")
    net = models.build("resnet50", 4, weights=str(tmp_path / "r50.pth"), head="replace")
    assert net.head.in_features == 2048
    assert torch.equal(net.backbone.conv1.weight, sd["conv1.weight"])
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(DvlibError, match="do not fit resnet50"):
        models.build("resnet50", 4, weights=str(tmp_path / "broken.pth"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_resnet50_download_is_checksummed(http_dir, tmp_path, monkeypatch):
    """The real download path (torch.hub, hash prefix in the file name) against a local server."""
    import torchvision

    monkeypatch.delenv("DVLIB_RESNET50", raising=False)
    served, base = http_dir
    sd = torchvision.models.resnet50(weights=None).state_dict()
    tmp = tmp_path / "w.pth"
    torch.save(sd, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    (served / f"resnet50-{digest[:8]}.pth").write_bytes(tmp.read_bytes())
    got = models.resnet50_imagenet(url=f"{base}/resnet50-{digest[:8]}.pth", model_dir=str(tmp_path / "hub"))
    assert torch.equal(got["conv1.weight"], sd["conv1.weight"])
    # a file whose content does not match the hash in its name is refused
    (served / "resnet50-deadbeef.pth").write_bytes(tmp.read_bytes())
    with pytest.raises(DvlibError, match="cannot get ResNet50 ImageNet weights"):
        models.resnet50_imagenet(url=f"{base}/resnet50-deadbeef.pth", model_dir=str(tmp_path / "hub2"))


def test_unknown_arch_and_head_list_valid_ones():
    with pytest.raises(DvlibError, match="valid: efficientnet_lite0, resnet50, smallcnn"):
        models.build("vgg16", 2)
    with pytest.raises(DvlibError, match="valid: append, replace"):
        models.build("smallcnn", 2, weights="random", head="prepend")
    with pytest.raises(DvlibError, match="weights file not found"):
        models.build("smallcnn", 2, weights="/no/such/file.pth")


def test_class_weights_formula():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    w = train.class_weights(labels, 3)
    expected = torch.tensor([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    torch.testing.assert_close(w, expected)
    assert float((w * torch.tensor([6.0, 3.0, 1.0])).sum()) == pytest.approx(10.0)
    with pytest.raises(DvlibError, match=r"class index\(es\) \[3\] have no training samples"):
        train.class_weights(labels, 4)
    w4 = train.class_weights(labels, 4, allow_missing=True)
    assert float(w4[3]) == 0.0


def test_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.9 + 0.1 / 3
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    probs[0] = np.nan  # a collapsed model: counted, not crashing
    assert compute_metrics(y, probs, ["a", "b", "c"])["nonfinite_outputs"] == 1


MODEL_META = {"arch": "smallcnn", "head": "append", "weights": "random", "build_seed": 0, "image_size": 32}


def test_model_file_round_trip_and_atomicity(tmp_path):
    net = models.build("smallcnn", 3, weights="random")
    meta = {**MODEL_META, "classes": ["a", "b", "c"], "pretrained_sha256": net.pretrained_sha256,
            "metrics": {"accuracy": 0.5}}
    path = save_model(tmp_path / "m.safetensors", net.state_dict(), meta)
    mf = load_model(path)
    assert all(torch.equal(mf.state[k], v) for k, v in net.state_dict().items())
    assert mf.meta["classes"] == ["a", "b", "c"] and mf.meta["dvlib_version"]
    with pytest.raises(DvlibError, match="lacks"):
        save_model(tmp_path / "bad.safetensors", net.state_dict(), {"arch": "smallcnn"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    (tmp_path / "t.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(DvlibError, match="t.safetensors: truncated or corrupt"):
        load_model(tmp_path / "t.safetensors")
    torch.save(net.state_dict(), tmp_path / "m.pt")
    with pytest.raises(DvlibError, match="pickle files are refused"):
        load_model(tmp_path / "m.pt")


def test_cli_help_and_bad_names(capsys):
    from dvlib.cli import main

    for cmd in (["split", "--help"], ["finetune", "--help"], ["evaluate", "--help"], ["run", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    assert main(["split", "--preset", "smoke", "--arch", "alexnet", "--runs-dir", "/tmp/dvlib-none"]) == 2
    assert "unknown arch 'alexnet'; valid: efficientnet_lite0, resnet50, smallcnn" in capsys.readouterr().err
    assert main(["split", "--preset", "smoke", "--epochs", "0", "--runs-dir", "/tmp/dvlib-none"]) == 2
    assert "argument --epochs: must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["split", "--preset", "fast"]) == 2  # a usage error: one line, exit 2, no SystemExit
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_compile_mode_names(monkeypatch):
    from dvlib.device import compile_mode

    monkeypatch.delenv("DVLIB_COMPILE", raising=False)
    assert compile_mode() is None
    assert [compile_mode(v) for v in (False, True, "0", "1", "eager", "reduce-overhead", " Default ")] == \
        [None, "default", None, "default", None, "reduce-overhead", "default"]
    monkeypatch.setenv("DVLIB_COMPILE", "reduce-overhead")
    assert compile_mode() == "reduce-overhead" and compile_mode(False) is None
    monkeypatch.setenv("DVLIB_COMPILE", "fast")
    with pytest.raises(DvlibError, match=r"'fast' .*reduce-overhead"):
        compile_mode()


def test_written_files_get_their_mode_not_mkstemps(tmp_path):
    """Atomic writes go through a mkstemp file (mode 0600). Results (CSV, text) must be readable by the
    group and others as any file the user writes (safetensors recreates the file, so chmod comes last);
    model files stay 0600, as docs/multi-site.md says: they hold what was learnt from patients."""
    import os
    import stat

    from dvlib.io import write_csv, write_text

    old = os.umask(0o022)
    try:
        model = save_model(tmp_path / "c.safetensors", {"w": torch.zeros(2)},
                           {**MODEL_META, "classes": ["a", "b"], "pretrained_sha256": "0" * 64})
        paths = [write_text(tmp_path / "t.txt", "x"), write_csv(tmp_path / "t.csv", __import__("pandas").DataFrame({"a": [1]}))]
    finally:
        os.umask(old)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in paths} == {p.name: "0o644" for p in paths}
    assert oct(stat.S_IMODE(model.stat().st_mode)) == "0o600"
