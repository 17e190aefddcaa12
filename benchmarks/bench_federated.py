"""Benchmark: one data-vector exchange against FedAvg with R = 8, measured in one Flower simulation run.

    DVLIB_DATA=/work/shared/datasets .venv/bin/python benchmarks/bench_federated.py \
        [--preset quick] [--dataset pad_ufes_20] [--rounds 8] [--restore recalibrate] [--out FILE]

A run folder in a temporary directory gets the preset's hospitals (step 01, split seed 0); then one
``dvlib.studies.federated.simulation.simulate`` call (Ray started once) runs both jobs over them, with every
reuse off, so that each hospital fine-tunes for the preset's epochs in both: the data vector all at
once, then the coordinator's merge (and the restore visits in turn); FedAvg epochs/R per round over R
rounds. Hospitals train one after another in one Ray actor (the simulation's CPU setting), so the
wall times are sums over hospitals; on real sites training runs in parallel and what differs is the
number of synchronous rounds. Writes ``benchmarks/results/federated_cpu.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import _cpu_name

from dvlib import experiment as ex
from dvlib.studies.federated.simulation import simulate
from dvlib.studies.federated.steps import federation_config, ledger_costs
from dvlib.io import write_json

OUT = Path(__file__).resolve().parent / "results" / "federated_cpu.json"


def _versions() -> dict:
    import flwr
    import ray

    from dvlib import __version__

    return {"python": sys.version.split()[0], "torch": torch.__version__, "flwr": flwr.__version__,
            "ray": ray.__version__, "dvlib": __version__}


def _job(res: dict) -> dict:
    led = pd.DataFrame(res["ledger"])
    rounds = led[led["round"] != "final"].groupby("round")["seconds"].max()
    out = {"seconds": res["seconds"], **ledger_costs(led), "round_seconds": {str(k): float(v) for k, v in rounds.items()},
           "reused": sorted({str(x) for x in led.get("reused", pd.Series(dtype=str)).fillna("") if x})}
    if "exchange_seconds" in res:
        out["exchange_seconds"] = res["exchange_seconds"]
        out["restore_seconds"] = res["seconds"] - res["exchange_seconds"]
    ev = res.get("evaluation") or []
    if ev:
        n = sum(e["metrics"]["num-examples"] for e in ev)
        out["pooled_accuracy"] = sum(e["metrics"]["accuracy"] * e["metrics"]["num-examples"] for e in ev) / n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--dataset", default="pad_ufes_20")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--restore", default="recalibrate", help="the data vector's restore (its own time is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads at the hospitals (0: this process's)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-fl-") as tmp:
        run = ex.open_run("bench", a.preset, seeds=[0], root=tmp, device="cpu", dataset=a.dataset)
        ex.step_split(run)
        r = ex.replicate(run, *run.replicates[0])
        images = {f"hospital_{h}": len(r.local(h).images("train")) for h in r.hospitals}
        jobs = ["data_vector", f"fedavg-{a.rounds}"]
        cfg = federation_config(r, jobs, a.restore, reuse=False, threads=a.threads or torch.get_num_threads())
        t0 = time.perf_counter()
        res = simulate(cfg, len(r.hospitals))
        wall = time.perf_counter() - t0
    dv, fa = _job(res["data_vector"]), _job(res[jobs[1]])
    p = run.preset
    record = {
        "schema": 1, "created": started, "command": " ".join(["bench_federated.py", *(argv or sys.argv[1:])]),
        "device": {"type": "cpu", "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": cfg["threads"],
                   "loadavg_at_start": load, "loadavg_at_end": list(os.getloadavg())},
        "versions": _versions(),
        "setting": {"preset": a.preset, "dataset": p.dataset, "arch": p.arch, "weights": p.weights,
                    "image_size": p.image_size, "epochs": p.epochs, "batch_size": p.batch_size,
                    "hospitals": len(r.hospitals), "train_images": images, "ray_actors": 1,
                    "reuse": False, "restore": a.restore},
        "wall_s": wall,
        "jobs_s": dv["seconds"] + fa["seconds"],
        "simulation_overhead_s": wall - dv["seconds"] - fa["seconds"],
        "data_vector": dv,
        f"fedavg_r{a.rounds}": fa,
        "ratio_fedavg_over_data_vector_exchange": fa["seconds"] / dv["exchange_seconds"],
        "ratio_fedavg_over_data_vector_with_restore": fa["seconds"] / dv["seconds"],
        "note": ("one simulation run; hospitals train one after another in one Ray actor, so seconds are sums over "
                 "hospitals; 'simulation_overhead_s' is Ray start-up, actor start, data decoding and shutdown, "
                 "outside both jobs; the final evaluation message is not in a job's seconds"),
    }
    write_json(a.out, record)
    print(f"data vector: exchange {dv['exchange_seconds']:.1f} s (+ restore {dv['restore_seconds']:.1f} s), "
          f"{dv['bytes_up_per_hospital'] / 1e6:.1f} MB up per hospital | FedAvg R={a.rounds}: {fa['seconds']:.1f} s, "
          f"{fa['bytes_up_per_hospital'] / 1e6:.1f} MB up | ratio {record['ratio_fedavg_over_data_vector_exchange']:.2f} "
          f"| simulation wall {wall:.1f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
