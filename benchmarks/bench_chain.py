"""Benchmark: the notebook chain (``dvlib run``) per seed against its compute floor, old against new in
one sitting (issue 16).

For each pair the old checkout (e.g. ``git worktree add ../old 348daa0``) and this one run the same
chain alternately (old, new; then new, old; ...), each a fresh run folder, one replicate, with the
same Python and data. Between runs, and before the first and after the last, ``bench_train.py``'s raw
speeds are measured at the preset's sizes (the training step at its batch size, the forward pass at its
evaluation batch size and at the BN-recalibration batch): every new run's floor uses the mean of the
measurements just before and just after it.

The floor of a notebook = images it trains on / raw training img/s + images it runs forward only
(evaluations, BN recalibration) / raw forward img/s. The images are what the new code's steps count
(``DVLIB_WORK_LOG``, one JSON line per step), plus what notebook 04 runs outside the steps: two more
recalibration passes over every training image (its by-hand recalibration and
``verify_recalibration``'s ``update_bn``). Notebooks 01, 05 and 06 have no such work: floor 0.

    .venv/bin/python benchmarks/bench_chain.py --old ../scratch/old --pairs 2 \\
        --work /work/scratch/runs --out benchmarks/results/chain_cpu_quick.json

Also recorded: every run's per-notebook seconds (``steps.json``), load averages around each run, and
how far the new chain's test numbers are from the old one's (metrics and per-image predictions).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_train import (device_info, floor_seconds, mean_speeds, raw_speeds, read_work_log,  # noqa: E402
                         versions)

from dvlib.io import write_json  # noqa: E402

NOTEBOOKS = ("01_split_data", "02_finetune_hospitals", "03_merge", "04_restore_bn", "05_layerwise_similarity",
             "06_results")
NOTEBOOK_OF = {"step_split": "01_split_data", "step_finetune": "02_finetune_hospitals", "step_merge": "03_merge",
               "step_lambda": "03_merge", "step_bn_policy": "03_merge", "step_restore": "04_restore_bn",
               "step_similarity": "05_layerwise_similarity"}
NOTEBOOK_04_EXTRA_RECALIBRATIONS = 2  # its by-hand recalibration cell and verify_recalibration (update_bn)
WORK_KEYS = ("train_images", "train_steps", "forward_images", "forward_batches", "recalibration_images",
             "recalibration_batches", "evaluations_computed", "evaluations_reused")
EVAL_FILES = ("finetune_eval", "merge_eval", "lambda_eval", "bn_policy_eval", "restore_eval")
PRED_FILES = ("finetune_predictions", "merge_predictions", "restore_predictions")


def git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def checkout_info(root: Path) -> dict:
    """Commit, whether the tree differs from it, and a hash of the difference (tracked files)."""
    import hashlib

    diff = git(root, "diff", "HEAD")
    untracked = git(root, "ls-files", "--others", "--exclude-standard", "dvlib", "notebooks")
    return {"path": str(root), "commit": git(root, "rev-parse", "HEAD"), "dirty": bool(diff or untracked),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
            "untracked_dvlib_files": untracked.splitlines()}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def run_chain(checkout: Path, name: str, work: Path, a: argparse.Namespace) -> dict:
    """One ``dvlib run`` of ``checkout`` in a fresh folder; its wall time, per-notebook seconds and work log."""
    base = work / name
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    log = base / "work.jsonl"
    env = {**os.environ, "PYTHONPATH": str(checkout), "DVLIB_WORK_LOG": str(log), "PYTHONUNBUFFERED": "1"}
    env.pop("DVLIB_PLAIN", None)
    env.pop("DVLIB_PROGRESS_FILE", None)
    cmd = [sys.executable, "-m", "dvlib", "run", "--preset", a.preset, "--dataset", a.dataset, "--seeds",
           *map(str, a.seeds), "--run", name, "--runs-dir", str(base / "runs"), "--reports-dir",
           str(base / "reports"), "--figures-dir", str(base / "figures"), "--no-html",
           *(["--train-seeds", *map(str, a.train_seeds)] if a.train_seeds else []), *a.chain_args]
    print(f"[{_now()}] {name}: {' '.join(cmd[1:])} (in {checkout})", flush=True)
    load0 = loadavg()
    t0 = time.perf_counter()
    with open(base / "chain.log", "w") as out:
        proc = subprocess.run(cmd, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    steps = json.loads((base / "reports" / "steps.json").read_text()) if (base / "reports" / "steps.json").exists() else []
    rec = {"name": name, "checkout": str(checkout), "command": cmd[1:], "rc": proc.returncode, "wall_s": wall,
           "loadavg_before": load0, "loadavg_after": loadavg(), "started": _now(),
           "notebooks_s": {s["step"]: s["seconds"] for s in steps}, "work_log": read_work_log(log),
           "run_dir": str(base / "runs" / name)}
    print(f"[{_now()}] {name}: rc {proc.returncode}, {wall:.1f} s: "
          + ", ".join(f"{k[:2]} {v:.1f}" for k, v in rec["notebooks_s"].items()), flush=True)
    if proc.returncode:
        print((base / "chain.log").read_text()[-3000:], flush=True)
    return rec


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def notebook_work(run: dict, train_images: int) -> dict[str, dict]:
    """Per notebook: the steps' work (summed) plus notebook 04's recalibrations outside the steps."""
    out = {nb: {k: 0 for k in WORK_KEYS} for nb in NOTEBOOKS}
    for rec in run["work_log"]:
        nb = NOTEBOOK_OF[rec["step"]]
        for k in WORK_KEYS:
            out[nb][k] += rec.get(k, 0)
    extra = NOTEBOOK_04_EXTRA_RECALIBRATIONS * train_images
    out["04_restore_bn"]["recalibration_images"] += extra
    out["04_restore_bn"]["notebook_extra_recalibration_images"] = extra
    return out


def compare_results(old_dir: Path, new_dir: Path) -> dict:
    """How far the new run's test numbers are from the old run's (same split and seeds)."""
    import pandas as pd

    out = {}
    for f in EVAL_FILES:
        a, b = old_dir / "results" / f"{f}.csv", new_dir / "results" / f"{f}.csv"
        if not (a.exists() and b.exists()):
            continue
        a, b = pd.read_csv(a), pd.read_csv(b)
        keys = [c for c in ("split_seed", "train_seed", "model", "method", "restore", "lam", "bn_buffers", "eval_on")
                if c in a.columns and c in b.columns]
        m = a.merge(b, on=keys, suffixes=("_old", "_new"))
        row = {"rows": int(len(m)), "rows_old": int(len(a)), "rows_new": int(len(b))}
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "auc_ovr"):
            if f"{metric}_old" in m:
                d = (m[f"{metric}_new"] - m[f"{metric}_old"]).abs()
                row[f"{metric}_max_abs_diff"] = float(d.max()) if len(d) else 0.0
                row[f"{metric}_mean_abs_diff"] = float(d.mean()) if len(d) else 0.0
                row[f"{metric}_rows_equal"] = int((d == 0).sum())
        out[f] = row
    for f in PRED_FILES:
        a, b = old_dir / "results" / f"{f}.csv.gz", new_dir / "results" / f"{f}.csv.gz"
        if not (a.exists() and b.exists()):
            continue
        a, b = pd.read_csv(a), pd.read_csv(b)
        keys = [c for c in ("split_seed", "train_seed", "model", "method", "restore", "lam", "eval_on", "image")
                if c in a.columns and c in b.columns]
        m = a.merge(b, on=keys, suffixes=("_old", "_new"))
        out[f] = {"images": int(len(m)), "pred_changed": int((m["pred_old"] != m["pred_new"]).sum()),
                  "p_true_max_abs_diff": float((m["p_true_old"] - m["p_true_new"]).abs().max()),
                  "p_true_mean_abs_diff": float((m["p_true_old"] - m["p_true_new"]).abs().mean())}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the old checkout (a git worktree of the previous commit)")
    ap.add_argument("--new", default=str(ROOT), help="the new checkout (default: this one)")
    ap.add_argument("--pairs", type=int, default=2, help="old/new pairs, run alternately (default 2)")
    ap.add_argument("--only-new", action="store_true", help="run only the new chain (--pairs times)")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--dataset", default="pad_ufes_20")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="split seeds (default 0: one replicate)")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=None)
    ap.add_argument("--chain-args", nargs=argparse.REMAINDER, default=[], help="more `dvlib run` flags (last)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the raw-speed measurements "
                                                              "(default: torch's, as the chain's kernels)")
    ap.add_argument("--raw-steps", type=int, default=10)
    ap.add_argument("--raw-warmup", type=int, default=2)
    ap.add_argument("--raw-repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/dvlib-bench-chain", help="folder for the runs (emptied per run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chain_cpu_quick.json"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from dvlib.data import load_dataset
    from dvlib.presets import get_preset

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    old, new = Path(a.old).resolve(), Path(a.new).resolve()
    p = get_preset(a.preset, dataset=a.dataset)
    k = len(load_dataset(p.dataset).classes)
    device = torch.device("cpu")
    res = {"schema": 1, "created": _now(), "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
           "device": device_info(device), "versions": versions(), "python": sys.executable,
           "data": os.environ.get("DVLIB_DATA", ""),
           "old": checkout_info(old), "new": checkout_info(new),
           "settings": {"preset": a.preset, "dataset": a.dataset, "split_seeds": a.seeds, "train_seeds": a.train_seeds,
                        "chain_args": a.chain_args, "arch": p.arch, "weights": p.weights, "image_size": p.image_size,
                        "epochs": p.epochs, "batch_size": p.batch_size, "eval_batch_size": p.eval_batch_size,
                        "n_hospitals": p.n_hospitals, "threads": torch.get_num_threads(),
                        "raw": {"steps": a.raw_steps, "warmup": a.raw_warmup, "repeats": a.raw_repeats}},
           "raw": [], "runs": [], "complete": False}

    def raw():
        r = raw_speeds(p.arch, k, p.image_size, p.batch_size, p.eval_batch_size, device, a.raw_steps, a.raw_warmup,
                       a.raw_repeats)
        r["loadavg"] = loadavg()
        res["raw"].append(r)
        print(f"[{_now()}] raw: train {r['train_img_per_s']:.1f}, eval {r['eval_img_per_s']:.1f}, recalibration "
              f"{r['recalibration_img_per_s']:.1f} img/s (load {r['loadavg']})", flush=True)
        write_json(a.out, res)
        return r

    raw()
    order = []
    for i in range(a.pairs):
        pair = ["new"] if a.only_new else (["old", "new"] if i % 2 == 0 else ["new", "old"])
        order += [(i, which) for which in pair]
    for i, which in order:
        rec = run_chain(old if which == "old" else new, f"{which}{i}", work, a)
        rec.update(which=which, pair=i, raw_before=len(res["raw"]) - 1)
        res["runs"].append(rec)
        raw()
        rec["raw_after"] = len(res["raw"]) - 1
        write_json(a.out, res)

    # floors of the new runs, per notebook
    import pandas as pd

    news = [r for r in res["runs"] if r["which"] == "new" and r["rc"] == 0]
    olds = [r for r in res["runs"] if r["which"] == "old" and r["rc"] == 0]
    for r in news:
        run_dir = Path(r["run_dir"])
        n_train = sum(int((pd.read_csv(run_dir / f"split_{s}" / "manifest.csv")["subset"] == "train").sum())
                      for s in a.seeds) * max(1, len(a.train_seeds or [1]))
        speeds = mean_speeds(res["raw"][r["raw_before"]], res["raw"][r["raw_after"]])
        w = notebook_work(r, n_train)
        r["work"] = w
        r["floor_s"] = {nb: floor_seconds(w[nb], speeds) for nb in NOTEBOOKS}
        r["floor_total_s"] = sum(r["floor_s"].values())
        r["raw_used"] = {key: speeds[key] for key in ("train_img_per_s", "eval_img_per_s", "recalibration_img_per_s")}
    per_seed = max(1, len(a.seeds) * len(a.train_seeds or [1]))
    summary = []
    for nb in NOTEBOOKS + ("total",):
        def val(r, key="notebooks_s"):
            return sum(r[key].values()) if nb == "total" else r[key].get(nb, 0.0)

        row = {"step": nb,
               "new_s": [val(r) / per_seed for r in news], "old_s": [val(r) / per_seed for r in olds],
               "floor_s": [(r["floor_total_s"] if nb == "total" else r["floor_s"][nb]) / per_seed for r in news]}
        row["protocol_s"] = row["new_s"]
        row["ratio_to_floor"] = [n / f if f > 0 else None for n, f in zip(row["new_s"], row["floor_s"])]
        row["old_over_new"] = [o / n if n > 0 else None for o, n in zip(row["old_s"], row["new_s"])]
        summary.append(row)
    res["per_seed"] = summary
    res["chain_wall_s"] = {"new": [r["wall_s"] / per_seed for r in news], "old": [r["wall_s"] / per_seed for r in olds]}
    if olds and news:
        res["test_numbers_new_vs_old"] = compare_results(Path(olds[0]["run_dir"]), Path(news[0]["run_dir"]))
    if len(news) > 1:
        res["test_numbers_new_vs_new"] = compare_results(Path(news[0]["run_dir"]), Path(news[1]["run_dir"]))
    if len(olds) > 1:
        res["test_numbers_old_vs_old"] = compare_results(Path(olds[0]["run_dir"]), Path(olds[1]["run_dir"]))
    res["complete"] = True
    write_json(a.out, res)
    for row in summary:
        print(f"{row['step']:24s} new {['%.1f' % x for x in row['new_s']]} floor {['%.1f' % x for x in row['floor_s']]}"
              f" old {['%.1f' % x for x in row['old_s']]}", flush=True)
    print(f"wrote {a.out}", flush=True)
    return res


if __name__ == "__main__":
    main()
