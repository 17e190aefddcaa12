"""benchmarks/bench_train.py in --quick mode on the CPU (smallcnn, synthetic data, seconds): the JSON
has every field, with positive numbers, and the protocol's work and floors add up. No timing
thresholds: this machine is small and shared. Also: the numpy metrics that replaced scikit-learn's
calls (a speed edit) give scikit-learn's numbers."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from dvlib.methods import METHODS
from dvlib.metrics import compute_metrics

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
STEPS = ("split", "cache", "finetune", "merge", "lambda", "bn_policy", "restore", "similarity")


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
    assert p["weights_note"] and p["restore_modes"] == ["none", "recalibrate", "finetune_epoch"]
    assert set(p["steps_s"]) == set(STEPS) == set(p["work"]) == set(p["floor_s"]) == set(p["breakdown"])
    assert all(_positive(p["steps_s"][s]) for s in STEPS) and _positive(p["open_run_s"])
    assert _positive(p["total_s"]) and p["total_s"] >= sum(p["steps_s"].values()) * 0.999
    assert p["finetune_images"] > 0 and _positive(p["finetune_step_img_per_s"])
    # 2 hospitals: 3 fine-tuned models; merge: every registered method + 11 lambdas + 3 BN policies;
    # restore: (the methods + the pretrained model) x 3 restore modes
    ev = p["evaluations"]
    rows_per_eval = p["n_hospitals"] + 1
    assert ev["finetune_eval"] == 3 * rows_per_eval
    assert ev["merge_eval"] == len(METHODS) * rows_per_eval and ev["lambda_eval"] == 11 * rows_per_eval
    assert ev["bn_policy_eval"] == 3 * rows_per_eval and ev["restore_eval"] == (len(METHODS) + 1) * 3 * rows_per_eval


def test_quick_protocol_work_and_floor(quick_result):
    p = quick_result[0]["protocol"]
    w = p["work"]
    assert w["split"]["train_images"] == w["split"]["forward_images"] == 0
    assert w["finetune"]["train_images"] == p["finetune_images"]  # fit's own count, every epoch of every model
    test_images = p["images"] - p["train_images"]
    for step, n in (("merge", len(METHODS)), ("lambda", 11), ("bn_policy", 3)):
        assert w[step]["evaluations_computed"] + w[step]["evaluations_reused"] == n, step
        assert w[step]["forward_images"] == w[step]["evaluations_computed"] * test_images, step
        assert w[step]["train_images"] == w[step]["recalibration_images"] == 0, step
    # weights evaluated before are not evaluated again: lambda 0.5 and BN policy 'mean' are
    # merged_data_vector; restore 'none' of each merged model is that model
    assert w["lambda"]["evaluations_reused"] >= 1 and w["bn_policy"]["evaluations_reused"] >= 1
    r = w["restore"]
    sources = len(METHODS) + 1  # every merged model and the pretrained one
    assert r["evaluations_computed"] + r["evaluations_reused"] == 3 * sources
    assert r["evaluations_reused"] >= len(METHODS)
    assert r["forward_images"] == r["evaluations_computed"] * test_images
    assert r["recalibration_images"] == r["train_images"] == sources * p["train_images"]  # every hospital once
    assert r["recalibration_batches"] > 0 and r["train_steps"] > 0
    raw = p["raw"]
    for k in ("train_img_per_s", "eval_img_per_s", "recalibration_img_per_s"):
        assert _positive(raw[k]) and _positive(raw["before"][k]) and _positive(raw["after"][k])
        assert raw[k] == pytest.approx((raw["before"][k] + raw["after"][k]) / 2)
    for step in STEPS:
        want = (w[step].get("train_images", 0) / raw["train_img_per_s"]
                + w[step].get("forward_images", 0) / raw["eval_img_per_s"]
                + w[step].get("recalibration_images", 0) / raw["recalibration_img_per_s"])
        assert p["floor_s"][step] == pytest.approx(want), step
    assert p["floor_s"]["split"] == p["floor_s"]["cache"] == p["floor_s"]["similarity"] == 0
    assert all(_positive(p["floor_s"][s]) for s in ("finetune", "merge", "restore"))
    assert p["floor_total_s"] == pytest.approx(sum(p["floor_s"].values()))
    assert p["ratio_to_floor"] == pytest.approx(p["total_s"] / p["floor_total_s"])
    assert [(x["step"], x["protocol_s"], x["floor_s"]) for x in p["per_step"]] == \
        [(s, p["steps_s"][s], p["floor_s"][s]) for s in STEPS]


def test_knobs(bench, tmp_path):
    res = bench.main(["--quick", "--device", "cpu", "--image-size", "32", "--no-protocol", "--no-throughput",
                      "--knobs", "--knob-threads", "1", "--knob-eval-batches", "8", "16", "--steps", "1", "--warmup",
                      "0", "--out", str(tmp_path / "k.json")])
    k = res["knobs"]
    assert k["sizes"]["image_size"] == 32 and k["sizes"]["bn_batch_size"] == 64
    kinds = [(r["knob"], r.get("layout") or r.get("batch_size") or r.get("adam")) for r in k["rows"]]
    assert kinds == [("layout", "channels_last"), ("layout", "nchw"), ("dvlib", None), ("eval_batch", 8),
                     ("eval_batch", 16), ("bf16_inference", None), ("adam", "single_tensor"), ("adam", "foreach"),
                     ("adam", "fused")]
    for r in k["rows"]:
        assert r["threads"] == 1
        for part in ("raw_train", "raw_eval", "raw_recalibrate", "fit", "predict"):
            if part in r:
                assert _positive(r[part]["img_per_s"]), (r["knob"], part)
    assert set(k["choice"]) == {"threads", "layout", "eval_batch", "adam", "bf16_inference", "bn_folded"}
    for r in k["rows"]:
        if r["knob"] == "eval_batch":
            assert r["raw_eval_folded"]["folded"] and not r["raw_eval"]["folded"]
            assert _positive(r["raw_eval_folded"]["img_per_s"])
    f = k["fold_error"]
    assert 0 <= f["max_abs_prob_diff"] < 1e-4 and f["argmax_agreement"] == 1 and f["images"] > 0
    e = k["bf16_error"]
    assert 0 <= e["max_abs_prob_diff"] <= 1 and 0 <= e["argmax_agreement"] <= 1 and e["images"] > 0
    assert math.isfinite(e["bn_running_var_max_rel_diff"])
    assert json.loads((tmp_path / "k.json").read_text())["complete"] is True


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
