"""benchmarks/bench_train.py in --quick mode on the CPU (smallcnn, synthetic data, seconds): the JSON
has every field, with positive numbers. No timing thresholds: this machine is small and shared.
Also: the numpy metrics that replaced scikit-learn's calls (a speed edit) give scikit-learn's numbers."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from dvlib.metrics import compute_metrics

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
STEPS = ("split", "cache", "finetune", "merge", "restore", "similarity")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_train", None)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _no_nan(s: str):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(s, parse_constant=bad)


@pytest.fixture(scope="module")
def quick_result(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "train_quick.json"
    # --quick, made smaller still: 32 px, 2 hospitals (the test machine has 2 busy cores)
    res = bench.main(["--quick", "--device", "cpu", "--image-size", "32", "--set", "n_hospitals=2",
                      "--batch-sizes", "8", "16", "--out", str(out)])
    return res, out


def test_quick_json_has_every_field(quick_result):
    res, out = quick_result
    data = _no_nan(out.read_text())  # strict JSON (no NaN)
    assert data == json.loads(json.dumps(res))
    for key in ("schema", "created", "command", "quick", "device", "versions", "arch", "image_size", "batch_sizes",
                "steps", "warmup", "repeats", "precision", "channels_last", "optimizer", "throughput_weights",
                "compile_measured", "dataset", "model_build_s", "throughput", "protocol", "reference", "goals", "complete",
                "wall_s"):
        assert key in data, key
    assert data["quick"] is True and data["arch"] == "smallcnn" and data["image_size"] == 32
    assert data["batch_sizes"] == [8, 16]
    assert data["device"]["type"] == "cpu" and data["device"]["kind"] == "cpu" and data["device"]["name"]
    for v in ("torch", "torchvision", "timm", "python", "dvlib"):
        assert data["versions"][v], v
    ds = data["dataset"]
    assert ds["used"] == "synthetic" and ds["images"] > 0 and _positive(ds["decode_s"])
    assert ds["cache_side"] >= data["image_size"]
    assert _positive(data["model_build_s"]) and _positive(data["wall_s"])
    assert data["reference"]["raw_img_per_s"]["efficientnet_lite0_bf16"] == 5500
    assert data["goals"]["paper_protocol_s_per_seed_max"] == 60


def test_quick_throughput_numbers(quick_result):
    data = quick_result[0]
    rows = data["throughput"]
    assert [(r["batch_size"], r["compile"]) for r in rows] == [(8, False), (16, False)]
    for r in rows:
        for part in ("raw", "fit"):
            for k in ("img_per_s", "ms_per_step", "steps"):
                assert _positive(r[part][k]), (r["batch_size"], part, k)
            assert all(_positive(t) for t in r[part]["repeats_s"])
        assert _positive(r["raw"]["first_step_s"]) and _positive(r["fit"]["warmup_s"])
        assert _positive(r["fit"]["epoch_img_per_s_median"]) and r["fit"]["images_per_fit"] > 0
        assert _positive(r["ratio"])
        assert r["ratio"] == pytest.approx(r["fit"]["img_per_s"] / r["raw"]["img_per_s"])


def test_quick_protocol_numbers(quick_result):
    p = quick_result[0]["protocol"]
    assert p["preset"] == "smoke" and p["arch"] == "smallcnn" and p["weights"] == "random"
    assert p["dataset"] == "synthetic" and p["n_hospitals"] == 2 and p["image_size"] == 32
    assert p["weights_note"]
    assert set(p["steps_s"]) == set(STEPS)
    assert all(_positive(p["steps_s"][s]) for s in STEPS)
    assert _positive(p["total_s"]) and p["total_s"] >= sum(p["steps_s"].values()) * 0.999
    assert p["finetune_images"] > 0 and _positive(p["finetune_fit_s"]) and _positive(p["finetune_fit_img_per_s"])
    assert _positive(p["first_epoch_s_mean"])
    for k in ("fit", "predict", "compute_metrics", "models.build", "save_checkpoint", "merge"):
        assert p["breakdown"][k]["calls"] > 0 and _positive(p["breakdown"][k]["seconds"]), k
    # 2 hospitals: 3 fine-tuned models; merge: 6 methods + 11 lambdas + 3 BN policies; restore: 7 x 3
    ev = p["evaluations"]
    rows_per_eval = p["n_hospitals"] + 1
    assert ev["finetune_eval"] == 3 * rows_per_eval
    assert ev["merge_eval"] == 6 * rows_per_eval and ev["lambda_eval"] == 11 * rows_per_eval
    assert ev["restore_eval"] == 21 * rows_per_eval


def test_no_protocol_and_default_output_name(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    res = bench.main(["--quick", "--device", "cpu", "--image-size", "32", "--no-protocol", "--steps", "1",
                      "--warmup", "0"])
    assert res["protocol"] is None
    assert (tmp_path / "train_cpu_quick.json").exists()


def test_weights_resolution(bench, monkeypatch):
    assert bench.resolve_weights("smallcnn", "auto")[0] == "random"
    assert bench.resolve_weights("resnet50", "random") == ("random", "as asked")
    monkeypatch.delenv("DVLIB_RESNET50", raising=False)
    assert bench.resolve_weights("resnet50", "auto")[0] == "random"


# --- the speed edit to dvlib.train.compute_metrics keeps scikit-learn's numbers --------------------

def _sklearn_metrics(y, probs, k):
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 roc_auc_score)

    probs = probs.copy()
    bad = ~np.isfinite(probs).all(axis=1)
    probs[bad] = 1.0 / k
    pred = probs.argmax(1)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in range(k) if (y == c).any() and (y != c).any()]
    return {"accuracy": accuracy_score(y, pred), "balanced_accuracy": balanced_accuracy_score(y, pred),
            "macro_f1": f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0),
            "auc_ovr": float(np.mean(aucs)) if aucs else float("nan"),
            "confusion": confusion_matrix(y, pred, labels=list(range(k))).tolist(), "nonfinite_outputs": int(bad.sum())}


def test_numpy_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(120):
            k = int(rng.integers(2, 7))
            n = int(rng.integers(1, 40))
            y = rng.integers(0, k if t % 3 else max(1, k - 2), n)  # some classes absent
            if t % 4 == 0:
                probs = (rng.integers(0, 4, (n, k)) / 4).astype(np.float32)  # many ties
            else:
                probs = rng.dirichlet(np.ones(k), n).astype(np.float32)
            if t % 13 == 0 and n > 1:
                probs[0] = np.nan
            ours = compute_metrics(y, probs, [str(c) for c in range(k)])
            ref = _sklearn_metrics(y, probs, k)
            for key in ("accuracy", "balanced_accuracy", "macro_f1", "confusion", "nonfinite_outputs"):
                assert ours[key] == ref[key], (t, key)
            if math.isnan(ref["auc_ovr"]):
                assert math.isnan(ours["auc_ovr"])
            else:
                assert ours["auc_ovr"] == pytest.approx(ref["auc_ovr"], abs=1e-12)
