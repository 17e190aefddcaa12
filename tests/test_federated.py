"""Federated learning on Flower (dvlib.studies.federated): the same stages, driven by a ClientApp and a ServerApp.

One small run (smoke preset, synthetic images, smallcnn at 32 px, 2 hospitals, 2 epochs) goes through
the notebook chain's steps 01-04, then through notebook 07's step with every reuse off, so that each
hospital trains inside Flower: one simulation (Ray) holds the data-vector exchange, FedAvg and FedBN
at R = 1 and 2. Two tests run the checked-in Flower App folder with ``flwr run``, as a Flower user
would (marker ``deployment``): against a SuperLink in simulation mode, and against a SuperLink with
two SuperNodes, all processes on 127.0.0.1. Torch runs one thread here (tests/conftest.py) and the
hospitals are told to run as many, so the arithmetic is the same in every process.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("flwr", reason="the [fl] extra: pip install -e '.[fl]'")

from dvlib import __version__
from dvlib import experiment as ex
from dvlib.io import DvlibError
from dvlib.studies.federated import FLOWER_EXTRA
from dvlib.studies.federated import hospital as hosp
from dvlib.studies.federated.app import server_app
from dvlib.studies.federated.deployment import LocalDeployment
from dvlib.studies.federated.evaluation import rows_from_parts
from dvlib.studies.federated.records import state_bytes
from dvlib.studies.federated.steps import (
    data_vector_bytes,
    federation_config,
    ledger_costs,
    step_federated,
)
from dvlib.files import load_model, load_vector
from dvlib.vectors import BN_STAT, COUNTER, key_kinds

SMALL = {"image_size": 32, "epochs": 2, "n_hospitals": 2, "n_patients": 40}


def _body(state):
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _max_diff(a, b, keys=None) -> float:
    keys = list(a) if keys is None else keys
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


@pytest.fixture(scope="module")
def fl_run(tmp_path_factory):
    """Steps 01-04 of the chain on a small run (what notebook 07 starts from)."""
    run = ex.open_run("fl", "smoke", seeds=[0], root=tmp_path_factory.mktemp("fl"), device="cpu", **SMALL)
    ex.step_split(run)
    ex.step_finetune(run, ["hospital_1", "hospital_2"], log=lambda *_: None)
    ex.step_merge(run, ["data_vector", "weighted"])
    ex.step_restore(run, methods=("data_vector",), modes=("none", "recalibrate"))
    return run


@pytest.fixture(scope="module")
def fed(fl_run):
    """Notebook 07's step, every hospital training inside Flower (no reuse): (run, table, raw results)."""
    raw: dict = {}
    table = step_federated(fl_run, rounds=(1, 2), reuse=False, raw=raw, log=lambda *_: None)
    return fl_run, table, raw[fl_run.replicates[0]]


def _hospital_models(run):
    r = ex.replicate(run, *run.replicates[0])
    pre = r.pretrained()[0]
    vfs = [load_vector(r.path(f"hospital_{h}")) for h in r.hospitals]
    return r, pre, [vf.tau.apply_to(_body(pre)) for vf in vfs], [vf.sample_count for vf in vfs]


def test_fedavg_one_round_through_flower_is_the_weighted_mean_of_the_hospitals_models(fed):
    run, _, raw = fed
    _, pre, models, counts = _hospital_models(run)
    got = raw["fedavg-1"]["state"]
    assert list(got) == list(pre)
    w = np.asarray(counts, np.float64) / sum(counts)
    floats = [k for k in pre if pre[k].is_floating_point()]
    ref = {k: sum(wi * m[k].double() for wi, m in zip(w, models)) for k in floats}
    diff = _max_diff(got, ref, floats)
    print(f"\nFedAvg R=1 through Flower vs the float64 sample-weighted mean (n={counts}): max |diff| = {diff:.2e}")
    assert diff < 1e-6
    for k in (k for k in pre if not pre[k].is_floating_point()):  # BatchNorm counters: the largest, as dvlib merges them
        assert got[k].dtype == torch.int64 and int(got[k]) == max(int(m[k]) for m in models)
    checks = run.read("federated_checks").set_index("check")
    assert checks.loc["fedavg-1 == run's merged_weighted (sample-weighted mean)", "max_abs_diff"] < 1e-6


def test_data_vector_exchange_through_flower_is_the_simulations_merge_bit_for_bit(fed):
    run, _, raw = fed
    r = ex.replicate(run, *run.replicates[0])
    for tag, key in (("merged_data_vector", "merged"), ("restored_data_vector_recalibrate", "state")):
        chain = load_model(r.path(tag)).state
        got = raw["data_vector"][key]
        assert list(got) == list(chain)
        assert all(got[k].dtype == chain[k].dtype and torch.equal(got[k], chain[k]) for k in chain), tag
    checks = run.read("federated_checks")
    dv = checks[checks["check"].str.startswith("data_vector")]
    assert len(dv) == 2 and dv["bit_identical"].all()
    assert [v["site"] for v in raw["data_vector"]["meta"]["restore_visits"]] == ["hospital_1", "hospital_2"]


def test_fedbn_keeps_batchnorm_statistics_at_the_hospitals(fed):
    run, _, raw = fed
    r, pre, models, counts = _hospital_models(run)
    kinds = key_kinds(pre)
    stats = [k for k, kd in kinds.items() if kd in (BN_STAT, COUNTER)]
    shared = [k for k in pre if k not in stats]
    for job in ("fedbn-1", "fedbn-2"):
        res = raw[job]
        assert sorted(res["local_keys"]) == sorted(stats) and stats
        assert not set(res["state"]) & set(stats)  # never aggregated: the server never had them
        for row in res["ledger"]:  # every message, both ways, carried exactly the shared weights
            assert row["down_bytes"] == state_bytes(pre, shared), row
            assert row["up_bytes"] == (state_bytes(pre, shared) if row["round"] != "final" else 0), row
    # each hospital was scored with its own statistics: at R = 1 they are those of its own fine-tuned model
    res = raw["fedbn-1"]
    mean = {k: sum(c * m[k].double() for c, m in zip(counts, models)) / sum(counts) for k in shared}
    for h, ev in zip(r.hospitals, res["evaluation"]):
        own = {k: mean[k].float() if k in mean else models[h - 1][k] for k in pre}
        shard = r.local(h).shard("test", r.p.image_size)
        from dvlib.train import predict

        probs = predict(r.model_from(own), shard.cache, shard.rows, size=r.p.image_size, batch_size=r.p.eval_batch_size)
        assert ev["site"] == f"hospital_{h}"
        np.testing.assert_allclose(ev["probs"], probs, atol=1e-5)
    mixed = {k: mean[k].float() if k in mean else models[0][k] for k in pre}  # hospital 1's statistics at hospital 2
    shard = r.local(2).shard("test", r.p.image_size)
    from dvlib.train import predict

    other = predict(r.model_from(mixed), shard.cache, shard.rows, size=r.p.image_size, batch_size=r.p.eval_batch_size)
    assert not np.allclose(res["evaluation"][1]["probs"], other, atol=1e-5)


def test_bytes_and_rounds_are_recorded_for_every_method(fed):
    run, table, raw = fed
    r, pre, _, _ = _hospital_models(run)
    assert (table["bytes_up_per_hospital"] > 0).all() and (table["bytes_down_per_hospital"] > 0).all()
    first = table.drop_duplicates(["method", "restore", "rounds"]).set_index(["method", "restore", "rounds"])
    full = state_bytes(pre)
    for rounds in (1, 2):
        assert first.loc[("fedavg", "none", rounds), "sync_rounds"] == rounds
        assert first.loc[("fedavg", "none", rounds), "bytes_up_per_hospital"] == rounds * full
        assert first.loc[("fedavg", "none", rounds), "bytes_down_per_hospital"] == (rounds + 1) * full  # + the final model
    assert first.loc[("data_vector", "none", 1), "sync_rounds"] == 1
    assert first.loc[("data_vector", "recalibrate", 1), "sync_rounds"] == 2
    assert first.loc[("data_vector", "recalibrate", 1), "sequential_visits"] == 2
    # the data vector's bytes in the table (computed for the run's restore results) are what Flower sent
    tau = load_vector(r.path("hospital_1")).tau
    sent = ledger_costs(pd.DataFrame(raw["data_vector"]["ledger"]))
    expected = data_vector_bytes(tau, pre, "recalibrate")
    assert sent == {k: float(v) for k, v in expected.items() if k.startswith("bytes")}
    assert first.loc[("data_vector", "recalibrate", 1), "bytes_up_per_hospital"] == expected["bytes_up_per_hospital"]
    log = run.read("federated_log")
    assert set(log["job"]) == {"data_vector", "fedavg-1", "fedbn-1", "fedavg-2", "fedbn-2"}
    assert log.groupby("job")["round"].nunique().to_dict() == {"data_vector": 4, "fedavg-1": 2, "fedbn-1": 2,
                                                               "fedavg-2": 3, "fedbn-2": 3}


def test_result_files_share_the_axes(fed):
    run, table, _ = fed
    assert set(table["method"]) == {"data_vector", "fedavg", "fedbn"}
    assert set(table["eval_on"]) == {"hospital_1", "hospital_2", "pooled"}
    fl = table[table["method"] != "data_vector"]
    assert len(fl) == 2 * 2 * 3 and (fl["source"] == "Flower simulation").all() and (fl["reused"] == "").all()
    dv = table[table["method"] == "data_vector"]
    assert set(dv["restore"]) == {"none", "recalibrate"}
    rs = run.read("restore_eval").set_index(["model", "eval_on"])
    for _, row in dv.iterrows():
        assert row["accuracy"] == rs.loc[(f"restored_data_vector_{row['restore']}", row["eval_on"]), "accuracy"]
    preds = pd.read_csv(run.dir / "results" / "federated_predictions.csv.gz")
    n_test = int(table[(table["eval_on"] == "pooled")]["n"].iloc[0])
    assert len(preds) == 4 * n_test and preds["patient"].notna().all()
    assert (run.read("federated_checks")["max_abs_diff"] <= 1e-6).all()


def test_scores_at_the_hospitals_are_stages_evaluate_for_one_model(fed):
    run, _, raw = fed
    r = ex.replicate(run, *run.replicates[0])
    rows, _ = rows_from_parts(raw["data_vector"]["evaluation"], r.classes)
    chain = run.read("restore_eval").query("model == 'restored_data_vector_recalibrate'").set_index("eval_on")
    for row in rows:
        for col in ("n", "accuracy", "balanced_accuracy", "macro_f1", "confusion"):
            assert row[col] == chain.loc[row["eval_on"], col], (row["eval_on"], col)
        assert math.isclose(row["auc_ovr"], chain.loc[row["eval_on"], "auc_ovr"], abs_tol=1e-9)


def test_reuse_returns_what_it_replaces(fl_run):
    """Without Flower: a hospital's step-02 vector is finetune_site's result bit for bit; R = 1 from
    its file is the fresh round up to float32 rounding; a remembered first round is bit for bit."""
    r = ex.replicate(fl_run, *fl_run.replicates[0])
    h = hosp.open_hospital({"partition-id": 0}, federation_config(r, []))
    hosp._MEMO.clear()
    tau, _, reused = hosp.data_vector(h, reuse=True)
    fresh, _, none = hosp.data_vector(h, reuse=False)
    assert reused == "hospital_1.dv.safetensors" and none == ""
    assert all(torch.equal(tau.tensors[k], fresh.tensors[k]) for k in fresh.tensors)
    pre = h.pretrained()[0]
    a, info_a = hosp.local_round(h, pre, epochs=SMALL["epochs"], round_=1, reuse=False)
    b, info_b = hosp.local_round(h, pre, epochs=SMALL["epochs"], round_=1, reuse=True)
    assert info_a["reused"] == "" and info_b["reused"] == "hospital_1.dv.safetensors"
    diff = _max_diff(a, b, [k for k in a if a[k].is_floating_point()])
    print(f"\nR=1 from the step-02 file vs trained again: max |diff| = {diff:.2e}")
    assert diff < 1e-6
    c, info_c = hosp.local_round(h, pre, epochs=1, round_=1, reuse=True)    # trained, remembered
    d, info_d = hosp.local_round(h, pre, epochs=1, round_=1, reuse=True)    # FedBN's first round after FedAvg's
    assert (info_c["reused"], info_d["reused"]) == ("", "memory")
    assert all(torch.equal(c[k], d[k]) for k in c)
    e, _ = hosp.local_round(h, c, epochs=1, round_=2, reuse=True)           # not from the pretrained weights: trained
    assert not torch.equal(e["head.weight"], c["head.weight"])


def test_rounds_must_split_the_local_epochs(fl_run):
    with pytest.raises(DvlibError, match="divide the 2 local epochs"):
        step_federated(fl_run, rounds=(3,))
    with pytest.raises(DvlibError, match="unknown federated methods"):
        step_federated(fl_run, methods=("fedprox",))


def _app_pyproject() -> dict:
    import tomli  # a dependency of Flower's; tomllib is Python 3.11+

    return tomli.loads((server_app.APP_DIR / "pyproject.toml").read_text())


def test_the_app_folder_is_a_flower_app_of_this_dvlib():
    """What ``flwr run`` checks first (Flower's own validation, components imported and looked up),
    and that the app names this dvlib's version and the Flower of the [fl] extra."""
    import tomli
    from flwr.clientapp import ClientApp
    from flwr.common.config import validate_config
    from flwr.serverapp import ServerApp

    from dvlib.studies.federated.app import client_app

    cfg = _app_pyproject()
    ok, errors, _ = validate_config(cfg, check_module=True, project_dir=server_app.APP_DIR)
    assert ok and errors == []
    assert isinstance(client_app.app, ClientApp) and isinstance(server_app.app, ServerApp)
    flower = FLOWER_EXTRA.split("(")[1].rstrip(")")
    assert cfg["project"]["version"] == __version__
    assert cfg["project"]["dependencies"] == [f"dvlib=={__version__}", flower]
    root = tomli.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert root["project"]["optional-dependencies"]["fl"] == [flower]


def test_run_config_overrides_the_apps_knobs_and_refuses_unknown_keys():
    knobs = _app_pyproject()["tool"]["flwr"]["app"]["config"]
    assert server_app.run_config({"lam": 0.25, "jobs": "fedavg-2"}) == {**knobs, "lam": 0.25, "jobs": "fedavg-2"}
    with pytest.raises(DvlibError, match=r"pyproject.toml: run config: Key 'poll-interval' is not present"):
        server_app.run_config({"poll-interval": 0.2})


def test_settings_and_classes_come_from_the_run_or_the_preset(fl_run):
    import json

    from dvlib.presets import get_preset
    from dvlib.stages import TrainSettings

    r = ex.replicate(fl_run, *fl_run.replicates[0])
    fed = federation_config(r, [])  # what notebook 07 hands the ServerApp
    got = server_app.consortium(server_app.run_config({"run-dir": str(fl_run.dir), "train-seed": r.train_seed}))
    assert (got["settings"], got["classes"], got["preset"]) == (fed["settings"], fed["classes"], "smoke")
    assert json.loads(got["settings"])["image_size"] == SMALL["image_size"]  # the run's, not the smoke preset's 56
    quick = server_app.consortium(server_app.run_config({"preset": "quick", "classes": '["BCC", "MEL"]'}))
    assert TrainSettings(**json.loads(quick["settings"])) == TrainSettings.from_preset(get_preset("quick"))
    assert quick["classes"] == '["BCC", "MEL"]'
    with pytest.raises(DvlibError, match="the run config needs 'classes'"):
        server_app.consortium(server_app.run_config({"preset": "quick"}))


def test_one_in_process_run_at_a_time(tmp_path):
    with server_app.in_process({"lam": 0.25}) as sink:
        with pytest.raises(DvlibError, match="already under way"):
            with server_app.in_process({}):
                pass
    assert sink == {}
    with server_app.in_process({}) as again:  # closed: the next run may start
        assert again == {}
    with pytest.raises(DvlibError, match="give no node configs"):
        LocalDeployment(tmp_path, ['run="/r"'], simulation=True)


def test_supernode_configs_get_their_partition():
    from dvlib.studies.federated.deployment import _with_partition

    assert _with_partition('run="/r"', 1, 2) == 'run="/r" partition-id=1 num-partitions=2'
    assert _with_partition('data="/d" partition-id=5', 0, 2) == 'data="/d" partition-id=5 num-partitions=2'


def _same_weights(path, state) -> bool:
    got = load_model(path).state
    return list(got) == list(state) and all(got[k].dtype == state[k].dtype and torch.equal(got[k], state[k]) for k in state)


def _run_knobs(r, out, jobs: str, restore: str) -> str:
    """Flower's ``--run-config`` text for replicate ``r`` of a run (settings and classes come from the run)."""
    return (f'run-dir="{r.run.dir}" split-seed={r.split_seed} train-seed={r.train_seed} lam={r.p.lam} jobs="{jobs}" '
            f'restore="{restore}" reuse=false threads=1 num-nodes=2 out-dir="{out}" evaluate=false timeout=300.0')


@pytest.mark.deployment
def test_flwr_run_in_the_simulation_runtime_gives_the_runs_merged_and_restored_weights(fl_run, tmp_path):
    """``flwr run <app folder>`` against a SuperLink in simulation mode (two virtual SuperNodes, Ray
    actors): one data-vector exchange and its recalibration visits, the hospitals training inside
    Flower; the merged and restored weights are the run's own files (steps 03-04), bit for bit. Ray
    is started here and Flower joins it (``RAY_ADDRESS``): started by Flower itself it fails on a
    loaded machine (ray-project/ray#65983, see simulation._agent_ports_given)."""
    import ray

    from dvlib.studies.federated.simulation import backend_config, start_ray

    r = ex.replicate(fl_run, *fl_run.replicates[0])
    out = tmp_path / "out"
    try:
        address = start_ray(backend_config(actors=1)["init_args"])
        with LocalDeployment(tmp_path / "sim", simulation=True, env={"RAY_ADDRESS": address}) as d:
            status = d.wait(d.submit(server_app.APP_DIR, [_run_knobs(r, out, "data_vector", "recalibrate")],
                                     ["num-supernodes=2 client-resources-num-cpus=1"]), timeout=600)
    finally:
        ray.shutdown()
    assert status["status"] == "finished:completed"
    assert all(p.poll() is not None for p in d.procs.values()) and not d.leftovers
    print(f"\nsimulation-runtime timings: {d.timings}")
    for tag in ("merged_data_vector", "restored_data_vector_recalibrate"):
        assert _same_weights(out / "data_vector" / f"{tag}.safetensors", load_model(r.path(tag)).state), tag


@pytest.mark.deployment
def test_deployment_runtime_gives_the_simulations_weights(fl_run, tmp_path):
    """``flwr run <app folder>`` against a SuperLink and two SuperNodes, processes on 127.0.0.1 (free
    ports): one data-vector exchange (the hospitals train in their own processes), everything
    stopped; the merged weights are the run's merged file, which the simulation reproduces bit for
    bit (test_data_vector_exchange_through_flower_is_the_simulations_merge_bit_for_bit)."""
    r = ex.replicate(fl_run, *fl_run.replicates[0])
    out = tmp_path / "out"
    with LocalDeployment(tmp_path / "deploy", [f'run="{fl_run.dir}"', f'run="{fl_run.dir}"']) as d:
        assert all(p.poll() is None for p in d.procs.values()) and len(d.procs) == 3
        status = d.wait(d.submit(server_app.APP_DIR, [_run_knobs(r, out, "data_vector", "none")]), timeout=300)
    assert status["status"] == "finished:completed"
    assert all(p.poll() is not None for p in d.procs.values()) and not d.leftovers
    print(f"\ndeployment timings: {d.timings}")
    assert _same_weights(out / "data_vector" / "merged_data_vector.safetensors", load_model(r.path("merged_data_vector")).state)
