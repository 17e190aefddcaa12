"""Benchmark: merge 4 ResNet50-sized models on the CPU (not a test).

Builds the DVNet ResNet50 state dict (``weights="random"``, no download), makes 4 perturbed copies and
times, for every method of :data:`dvlib.methods.METHODS` (median of a few runs),
:func:`dvlib.merging.merge` on their data vectors (:class:`dvlib.vectors.DataVector`, made once);
and for the data-vector merge also :func:`dvlib.merge` on the state dicts (vectors made inside), the
layout validation (:func:`dvlib.checks.layout_problems`) and the bare arithmetic (the method's
function and ``apply_to``), against one ``torch.add(a, b, out=c)`` pass over the same number of
float32 elements. Writes ``benchmarks/results/merge_cpu.json``.

    .venv/bin/python benchmarks/bench_merge.py [--threads default,1] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import _cpu_name  # noqa: E402  (one way of naming the machine for both benchmarks)

import dvlib  # noqa: E402
from dvlib.checks import layout_problems  # noqa: E402
from dvlib.io import write_json  # noqa: E402
from dvlib.merging import merge  # noqa: E402
from dvlib.methods import METHODS  # noqa: E402
from dvlib.models import build  # noqa: E402
from dvlib.vectors import PARAM, DataVector, key_kinds, keys_of  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "merge_cpu.json"
N_MODELS = 4
SLOW = {"ties": 2, "random_vector": 3, "dare": 3}  # fewer runs for the slow baselines


def _median_time(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _models():
    pre = build("resnet50", num_classes=4, weights="random", seed=0).state_dict()
    pre = {k: v.detach().clone() for k, v in pre.items()}
    fts = []
    for i in range(N_MODELS):
        g = torch.Generator().manual_seed(i + 1)
        ft = {}
        for k, v in pre.items():
            if k.endswith("num_batches_tracked"):
                ft[k] = v + 100 * (i + 1)
            elif k.endswith("running_var"):
                ft[k] = v * torch.exp(0.05 * torch.randn(v.shape, generator=g))
            elif v.is_floating_point():
                ft[k] = v + 1e-3 * torch.randn(v.shape, generator=g)
            else:
                ft[k] = v.clone()
        fts.append(ft)
    return pre, fts


def _bench(pre, fts, runs: int) -> dict:
    kinds = key_kinds(fts[0])
    taus = [DataVector.between(ft, pre, kinds) for ft in fts]
    n_float = sum(v.numel() for v in pre.values() if v.is_floating_point())
    a, b, c = torch.randn(n_float), torch.randn(n_float), torch.empty(n_float)
    add_s, _ = _median_time(partial(torch.add, a, b, out=c), max(runs, 10))
    del a, b, c
    res: dict = {"threads": torch.get_num_threads(), "torch_add_s": add_s, "methods": {}}
    names = [f"model_{i}" for i in range(len(fts))] + ["pretrained"]
    check_s, _ = _median_time(lambda: layout_problems(fts + [pre], names), runs)
    core_s, _ = _median_time(lambda: METHODS["data_vector"].fn(taus, lam=0.5).apply_to(pre), runs)
    vectors_s, _ = _median_time(lambda: [DataVector.between(ft, pre, kinds) for ft in fts], runs)
    state_dicts_s, _ = _median_time(lambda: dvlib.merge(pre, fts, method="data_vector"), runs)
    res["layout_problems_5_models_s"] = check_s
    res["data_vectors_4_models_s"] = vectors_s
    res["data_vector_arithmetic_only_s"] = core_s
    res["data_vector_arithmetic_only_ratio_to_add"] = core_s / add_s
    res["dvlib_merge_state_dicts_data_vector_s"] = state_dicts_s
    for method in METHODS:
        opts = {"weights": [1, 2, 3, 4]} if method == "weighted" else {}
        r = SLOW.get(method, runs)
        med, times = _median_time(lambda: merge(pre, taus, method=method, **opts), r)
        res["methods"][method] = {"median_s": med, "runs_s": times, "ratio_to_add": med / add_s}
        print(f"  threads={res['threads']} {method:14s} {med:7.3f} s  ({med / add_s:5.1f}x add)", flush=True)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="default,1", help="comma list of thread counts ('default' = torch's)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    pre, fts = _models()
    kinds = key_kinds(fts[0])
    n_param = sum(pre[k].numel() for k in keys_of(kinds, PARAM))
    n_float = sum(v.numel() for v in pre.values() if v.is_floating_point())
    print(f"ResNet50 DVNet: {len(pre)} keys, {n_param / 1e6:.2f}M PARAM weights, {n_float * 4 / 2**20:.1f} MiB "
          f"float32 per model, {N_MODELS} models", flush=True)
    result = {
        "device": {"kind": "cpu", "name": _cpu_name(), "cpu_count": os.cpu_count(),
                   "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "model": "resnet50 (torchvision, weights=None) + Linear(1000, 4) head, via dvlib.models.build",
        "n_models": N_MODELS, "keys": len(pre), "param_weights": n_param, "float_elements_per_model": n_float,
        "bytes_per_model": n_float * 4,
        "reference": "torch.add(a, b, out=c) on float32 tensors of float_elements_per_model elements",
        "goal_s": 1.0,
        "runs": {},
    }
    for spec in args.threads.split(","):
        n = default_threads if spec.strip() == "default" else int(spec)
        torch.set_num_threads(n)
        result["runs"][f"threads={n}"] = _bench(pre, fts, args.runs)
    torch.set_num_threads(default_threads)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
