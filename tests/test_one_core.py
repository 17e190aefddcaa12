"""One method core: the hospitals' and the coordinator's command line, run over the simulated
hospitals of the notebook chain, gives the chain's models bit for bit (CPU) and the same metrics.

Each command is a separate process, as at a real site; the chain ran in papermill kernels. Both use
the same thread count (the machine's default), so the arithmetic is the same.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from dvlib.files import read
from dvlib.seeds import derive

N_HOSPITALS = 4


def dvlib(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvlib", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "DVLIB_PROGRESS_FILE"})
    assert proc.returncode == 0, f"dvlib {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def same_tensors(a, b) -> None:
    (_, ta), (_, tb) = read(a), read(b)
    assert list(ta) == list(tb)
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f"{a} and {b} differ in {len(diff)} tensors, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def cli(smoke_chain, tmp_path_factory):
    """Every hospital's `dvlib site finetune`, the coordinator's `dvlib merge`, the sites' restore
    visits in turn (both modes) and `dvlib evaluate`, on the chain's split."""
    base, _ = smoke_chain
    run = base / "runs" / "t-smoke"
    out = tmp_path_factory.mktemp("cli")
    local = ["--data", "synthetic", "--manifest", run / "split_0" / "manifest.csv"]
    files = []
    for h in range(1, N_HOSPITALS + 1):
        files.append(out / f"hospital_{h}.dv.safetensors")
        dvlib("site", "finetune", *local, "--hospital", h, "--preset", "smoke", "--seed", derive(0, f"hospital_{h}"),
              "--head-seed", 0, "--device", "cpu", "--out", files[-1])
    dvlib("merge", *files, "--method", "data_vector", "--seed", 0, "--out", out / "merged.safetensors")
    for mode in ("recalibrate", "finetune_epoch"):
        prev = out / "merged.safetensors"
        for h in range(1, N_HOSPITALS + 1):
            nxt = out / f"{mode}_{h}.safetensors"
            dvlib("site", "restore", prev, *local, "--hospital", h, "--mode", mode, "--seed", 0, "--device", "cpu",
                  "--out", nxt)
            prev = nxt
    dvlib("evaluate", out / f"recalibrate_{N_HOSPITALS}.safetensors", *local, "--hospital",
          *range(1, N_HOSPITALS + 1), "--subset", "test", "--device", "cpu", "--out", out / "ev")
    return run / "split_0" / "train_0" / "models", out


def test_site_finetune_gives_the_chains_vector_files(cli):
    models, out = cli
    for h in range(1, N_HOSPITALS + 1):
        same_tensors(out / f"hospital_{h}.dv.safetensors", models / f"hospital_{h}.dv.safetensors")


def test_merge_gives_the_chains_merged_model(cli):
    models, out = cli
    same_tensors(out / "merged.safetensors", models / "merged_data_vector.safetensors")


@pytest.mark.parametrize("mode", ["recalibrate", "finetune_epoch"])
def test_site_restore_visits_give_the_chains_restored_model(cli, mode):
    models, out = cli
    same_tensors(out / f"{mode}_{N_HOSPITALS}.safetensors", models / f"restored_data_vector_{mode}.safetensors")
    meta, _ = read(out / f"{mode}_{N_HOSPITALS}.safetensors")
    assert [v["site"] for v in meta["restore_visits"]] == [f"hospital_{h}" for h in range(1, N_HOSPITALS + 1)]


def test_evaluate_gives_the_chains_metrics(smoke_chain, cli):
    base, _ = smoke_chain
    _, out = cli
    ours = pd.read_csv(out / "ev.eval.csv").set_index("eval_on")
    chain = pd.read_csv(base / "runs" / "t-smoke" / "results" / "restore_eval.csv")
    chain = chain[chain["model"] == "restored_data_vector_recalibrate"].set_index("eval_on")
    assert sorted(ours.index) == sorted(chain.index) == sorted([f"hospital_{h}" for h in range(1, 5)] + ["pooled"])
    for col in ("n", "accuracy", "balanced_accuracy", "macro_f1"):
        assert (ours[col] == chain.loc[ours.index, col]).all(), col
    assert (ours["auc_ovr"] - chain.loc[ours.index, "auc_ovr"]).abs().max() < 1e-9
