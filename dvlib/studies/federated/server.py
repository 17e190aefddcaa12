"""The coordinator's jobs, which the ServerApp (:mod:`dvlib.studies.federated.app.server_app`) runs
one after the other over the same hospitals.

- ``data_vector``: one exchange. Every hospital fine-tunes for its full local epochs and sends its
  data vector once (it builds the pretrained model itself, as in the file workflow: nothing is sent
  down). The server writes the vectors as vector files and merges them with
  ``dvlib.coordinator.merge_files`` (``dvlib merge``: every check; lambda from the config, heads and
  BatchNorm statistics averaged). Then the restore (``restore``: ``recalibrate``, ``finetune_epoch``,
  ...): the merged model visits the hospitals one after another (a second, sequential round).
- ``fedavg-R`` / ``fedbn-R``: Flower's FedAvg over R rounds of epochs/R local epochs
  (:mod:`dvlib.studies.federated.strategies`), starting from the pretrained model.

Before any job, every node is asked its site label and only the run config's ``sites`` are taken;
every reply is checked before use (:mod:`dvlib.studies.federated.trust`), and the model's record
is the server's. With ``warmup``, a ``query`` first lets every hospital open its images and build
its model, so that no job's seconds include that. After each job the final model goes to every
hospital (``evaluate``; FedBN: each with its own statistics) and each scores it on its own test
split. ``cfg`` is the complete run config (the app's ``[tool.flwr.app.config]`` with its
overrides). With ``out-dir``, results are also files, moved there from a staging folder once the
job has succeeded: ``<out-dir>/<job>/`` holds the vector files, the merged and restored model files
(data vector) or ``model.safetensors`` (FedAvg; FedBN's shared part), and ``<job>.json``
(ledger, evaluation metrics, seconds).
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from dvlib.studies.federated import trust
from dvlib.studies.federated.ledger import Ledger, site_of
from dvlib.studies.federated.records import (
    json_record,
    record_tensors,
    record_vector,
    tensors_record,
)
from dvlib.io import DvlibError, write_json
from dvlib.progress import note

SITE_LABEL = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
CLIENT_KEYS = ("settings", "classes", "preset", "train-seed", "split-seed", "run-dir", "reuse", "threads", "device")


def parse_jobs(text: str) -> list[tuple[str, str, int]]:
    """``"data_vector fedavg-2"`` -> [(job, kind, rounds)]."""
    out = []
    for job in str(text).split():
        kind, _, r = job.partition("-")
        if kind == "data_vector" and not r:
            out.append((job, kind, 1))
        elif kind in ("fedavg", "fedbn") and r.isdigit() and int(r) >= 1:
            out.append((job, kind, int(r)))
        else:
            raise DvlibError(f"unknown job {job!r}: use data_vector, fedavg-<R> or fedbn-<R>")
    return out


def client_config(cfg: dict, **extra) -> ConfigRecord:
    return json_record(**{k: cfg[k] for k in CLIENT_KEYS}, **extra)


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    t = time.time()
    while len(ids := sorted(grid.get_node_ids())) < n:
        if time.time() - t > timeout:
            raise DvlibError(f"only {len(ids)} of {n} hospitals (SuperNodes) connected after {timeout:.0f} s")
        time.sleep(0.2)
    return ids


def exchange(grid: Grid, messages: list[Message], timeout: float, what: str, known=None) -> list[Message]:
    """Send, wait for every reply, refuse errors (and, given ``known`` {node: site}, replies from
    another node or under another label than it identified with); replies in hospital order."""
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [m.error.reason for m in replies if m.has_error()]
    if errors or len(replies) != len(messages):
        raise DvlibError(f"{what}: {len(replies) - len(errors)}/{len(messages)} hospitals replied; errors: {errors}")
    for m in replies if known is not None else ():
        trust.check_sender(m, known, what)
    return sorted(replies, key=site_of)


def _message(content: dict, node: int, kind: str, group: str) -> Message:
    return Message(RecordDict(content), dst_node_id=node, message_type=kind, group_id=group)


def data_vector_job(grid: Grid, cfg: dict, nodes: dict[int, str], job: str, work: Path) -> dict:
    from dvlib import custody, restore, stages
    from dvlib.coordinator import merge_files
    from dvlib.files import load_model, save_model, save_vector
    from dvlib.site import restored_meta
    from dvlib.vectors import key_kinds

    ledger, timeout, t0 = Ledger(job), float(cfg["timeout"]), time.perf_counter()
    model = stages.pretrained_model(stages.TrainSettings(**json.loads(cfg["settings"])), len(json.loads(cfg["classes"])),
                                    int(cfg["train-seed"]))  # what every reply is checked against
    pre, kinds = model.state_dict(), key_kinds(model.state_dict(), model)
    msgs = [_message({"config": client_config(cfg, kind="data_vector", job=job)}, n, MessageType.TRAIN, f"{job}/1")
            for n in nodes]
    ledger.sent("1", msgs)
    replies = exchange(grid, msgs, timeout, "data-vector exchange", nodes)
    ledger.received("1", replies)
    metas = [trust.vector_reply(m, pre, kinds) for m in replies]  # every reply, before anything is written
    labels = [site_of(m)[1] for m in replies]
    bad = [s for s in labels if not SITE_LABEL.fullmatch(s)] + sorted({s for s in labels if labels.count(s) > 1})
    if bad:  # a label names a file here: letters, digits, '-', '_', '.'; one hospital each
        raise DvlibError(f"data-vector exchange: invalid or repeated site labels {bad}; give each SuperNode its own site=")
    paths, reused = [], []
    for m, label, meta in zip(replies, labels, metas):
        paths.append(save_vector(work / "vectors" / f"{label}.dv.safetensors", record_vector(m.content["arrays"]), meta))
        reused.append(str(m.content["meta"].get("reused", "")))
    merged = work / "merged_data_vector.safetensors"
    meta = merge_files(paths, merged, method="data_vector", lam=float(cfg["lam"]), seed=int(cfg["train-seed"]))
    state = dict(load_model(merged).state)
    out = {"merged": dict(state), "merged_meta": meta, "reused": reused, "visits": 0,
           "exchange_seconds": time.perf_counter() - t0}  # vectors in and merged: before any restore
    order = [m.metadata.src_node_id for m in replies]
    for what in restore.get(str(cfg["restore"])).visits:
        for node in order:
            rnd = f"restore.{out['visits'] + 1}"
            msg = _message({"arrays": tensors_record(state), "config": client_config(
                cfg, kind="restore", job=job, visit=what, **{"model-meta": json.dumps(meta, default=str)})},
                node, "train.restore", f"{job}/{rnd}")
            ledger.sent(rnd, [msg])
            (reply,) = exchange(grid, [msg], timeout, f"restore visit {rnd}", nodes)
            ledger.received(rnd, [reply])
            visits = list(meta.get("restore_visits") or [])
            changed, rec = trust.restore_reply(reply, state, what, nodes[node], index=len(visits),
                                               reset=not visits or visits[-1].get("mode") != "recalibrate")
            state.update(changed)
            if rec.get("sha256_after") != custody.weights_sha256(state):  # what the hospital says it left
                raise DvlibError(f"restore visit {rnd}: {trust.who(reply)} recorded weights other than those it sent")
            meta = restored_meta(meta, [*visits, rec])  # the model's record stays the server's
            out["visits"] += 1
    if out["visits"]:
        tag = f"restored_data_vector_{str(cfg['restore']).replace('+', '_')}"
        save_model(work / f"{tag}.safetensors", state, meta)
    return {**out, "state": state, "meta": meta, "ledger": ledger, "nodes": order}


def fedavg_job(grid: Grid, cfg: dict, nodes: list[int], job: str, kind: str, rounds: int, work: Path) -> dict:
    from torch.nn.modules.batchnorm import _BatchNorm

    from dvlib import stages
    from dvlib.studies.federated.strategies import DvlibFedAvg, local_keys
    from dvlib.files import BUILTIN_WEIGHTS, save_model
    from dvlib.vectors import key_kinds

    settings = stages.TrainSettings(**json.loads(cfg["settings"]))
    classes = json.loads(cfg["classes"])
    if settings.epochs % rounds:
        raise DvlibError(f"{job}: {settings.epochs} local epochs do not split into {rounds} rounds")
    model = stages.pretrained_model(settings, len(classes), int(cfg["train-seed"]))
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bn = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    keep = local_keys(key_kinds(pre, model), bn, bool(cfg["fedbn-affine"])) if kind == "fedbn" else []
    ledger = Ledger(job)
    strategy = DvlibFedAvg(num_nodes=len(nodes), ledger=ledger, local_keys=keep)
    result = strategy.start(grid=grid, initial_arrays=tensors_record(pre, [k for k in pre if k not in keep]),
                            num_rounds=rounds, timeout=float(cfg["timeout"]),
                            train_config=client_config(cfg, kind=kind, job=job, epochs=settings.epochs // rounds))
    if ledger.errors() or len(result.arrays) == 0:
        raise DvlibError(f"{job}: rounds failed: {ledger.errors()}")
    state = record_tensors(result.arrays)
    meta = {"kind": "merged" if not keep else "model", "arch": settings.arch, "head": settings.head,
            "classes": classes, "pretrained_sha256": model.pretrained_sha256, "build_seed": int(cfg["train-seed"]),
            "weights": settings.weights if settings.weights in BUILTIN_WEIGHTS else Path(settings.weights).name,
            "image_size": settings.image_size, "method": kind, "rounds": rounds, "local_keys": keep,
            "epochs_per_round": settings.epochs // rounds, "restore_visits": []}
    if cfg["out-dir"]:
        save_model(work / "model.safetensors", state, meta)
    order = sorted(ledger.sites, key=lambda n: ledger.sites[n])
    return {"state": state, "meta": meta, "ledger": ledger, "nodes": order, "local_keys": keep,
            "reused": [], "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()}}


def evaluate_job(grid: Grid, cfg: dict, job: str, kind: str, res: dict, known=None) -> list[dict]:
    """The final model to every hospital (its own statistics under FedBN), scored on its test split."""
    ledger = res["ledger"]
    keys = [k for k in res["state"] if k not in set(res.get("local_keys") or [])]
    msgs = [_message({"arrays": tensors_record(res["state"], keys), "config": client_config(cfg, kind=kind, job=job)},
                     n, MessageType.EVALUATE, f"{job}/final") for n in res["nodes"]]
    ledger.sent("final", msgs)
    replies = exchange(grid, msgs, float(cfg["timeout"]), f"{job} evaluation", known)
    ledger.received("final", replies, counted=False)
    out = []
    for m in replies:
        pid, site = site_of(m)
        row = {"partition_id": pid, "site": site, "metrics": dict(m.content["metrics"]),
               "confusion": trust.json_field(m, "confusion", list, f"{job} evaluation"),
               "images": trust.json_field(m, "images", list, f"{job} evaluation")}
        if "arrays" in m.content.array_records:
            t = record_tensors(m.content["arrays"])
            row.update(probs=t["probs"].numpy(), labels=t["labels"].numpy())
        out.append(row)
    return out


def run_jobs(grid: Grid, cfg: dict) -> dict:
    """Every job of ``cfg["jobs"]``, in order; returns {job: result}."""
    if not cfg["settings"] or not cfg["classes"]:
        raise DvlibError("the server needs 'settings' (JSON of dvlib.stages.TrainSettings) and 'classes' (JSON list)")
    sites = trust.expected_sites(cfg)
    found = wait_for_nodes(grid, max(len(sites), int(cfg["num-nodes"])), float(cfg["timeout"]))
    hello = exchange(grid, [_message({"config": client_config(cfg, kind="identify", job="_identify")}, n,
                                     MessageType.QUERY, "_identify") for n in found], float(cfg["timeout"]), "identification")
    nodes = trust.identified(hello, sites)  # {node id: site}; any other node is refused by name
    results = {}
    if cfg.get("warmup"):  # so that no job's seconds include a simulation actor's start-up and image decoding
        t0 = time.perf_counter()
        exchange(grid, [_message({"config": client_config(cfg, kind="warmup", job="_warmup")}, n, MessageType.QUERY,
                                 "_warmup") for n in nodes], float(cfg["timeout"]), "warm-up", nodes)
        results["_warmup"] = {"seconds": time.perf_counter() - t0}
    with tempfile.TemporaryDirectory(prefix="dvlib-fl-") as tmp:
        for job, kind, rounds in parse_jobs(cfg["jobs"]):
            t0 = time.perf_counter()
            work = Path(tmp) / job  # staged: out-dir receives a job's files only once it has succeeded
            work.mkdir(parents=True, exist_ok=True)
            if kind == "data_vector":
                res = data_vector_job(grid, cfg, nodes, job, work)
            else:
                res = fedavg_job(grid, cfg, list(nodes), job, kind, rounds, work)
            res["seconds"] = time.perf_counter() - t0  # the exchange itself, before the final evaluation
            res["evaluation"] = evaluate_job(grid, cfg, job, kind, res, nodes) if cfg["evaluate"] else []
            res.update(job=job, kind=kind, rounds=rounds, ledger=res["ledger"].table())
            results[job] = res
            note(f"  {job}: {res['seconds']:.0f} s")
            if cfg["out-dir"]:
                write_json(work / f"{job}.json", {
                    **{k: v for k, v in res.items() if k in ("job", "kind", "rounds", "seconds", "exchange_seconds",
                                                             "reused", "ledger", "visits")},
                    "evaluation": [{k: v for k, v in e.items() if k not in ("probs", "labels")} for e in res["evaluation"]],
                    "config": cfg})
                publish(work, Path(cfg["out-dir"]) / job)
    return results


def publish(staged: Path, dest: Path) -> None:
    """Move a finished job's files from the staging folder into ``dest`` (replacing older ones)."""
    import shutil

    for f in sorted(p for p in staged.rglob("*") if p.is_file()):
        target = dest / f.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(target))

