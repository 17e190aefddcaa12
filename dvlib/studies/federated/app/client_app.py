"""The ClientApp (``app``): one hospital. Flower messages in, dvlib's stages run
(:mod:`dvlib.studies.federated.hospital`), records out.

Message types:

- ``train`` with config ``kind`` = ``data_vector``: fine-tune for the full local epochs; reply the
  data vector (sectioned as in its file) and its metadata. ``kind`` = ``fedavg``/``fedbn``: one round
  from the received weights. Keys the server did not send (FedBN: the BatchNorm statistics) come
  from ``context.state`` (this hospital's own from its previous round; the pretrained ones at first)
  and stay there: the reply carries exactly the received keys.
- ``train.restore``: one restore visit of the received model (checked first against the merged
  weights' chain of custody, :mod:`dvlib.custody`); the reply carries the tensors the visit may
  change (BatchNorm statistics and counters for ``recalibrate``, all for a training visit) and this
  visit's record; the server keeps the model's record and checks both (:mod:`..trust`).
- ``evaluate``: the received model (plus this hospital's own keys) on its test split: probabilities
  and labels; image ids only from a simulated hospital (a real site's ids never leave it).
- ``query``: ``kind`` = ``identify``: reply nothing but ``meta`` (the site label the server checks
  against its expected sites); warm-up: open the images and build the model, reply ``meta``.

Every reply carries a ``meta`` ConfigRecord (partition id, site label; FedAvg ignores ConfigRecords).
Settings, seeds and torch's thread count come from the server's ``config``: one source of truth, and
the same arithmetic in every runtime.
"""
from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dvlib.studies.federated import hospital as hosp
from dvlib.studies.federated.records import (
    json_record,
    record_tensors,
    tensors_record,
    vector_record,
)

app = ClientApp()


def local_key(job: str) -> str:
    """``context.state`` key of the tensors one job keeps at this hospital (FedBN's statistics)."""
    return f"{job}/local"


def _setup(msg: Message, context: Context):
    import torch

    cfg = msg.content["config"]
    threads = int(cfg.get("threads", 0))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    h = hosp.open_hospital(context.node_config, cfg)
    return cfg, h


def _meta(context: Context, h, **extra) -> ConfigRecord:
    return json_record(**{"partition-id": int(context.node_config.get("partition-id", -1)), "site": h.label, **extra})


def _model_state(msg: Message, context: Context, h, job: str) -> tuple[dict, list[str]]:
    """The received tensors completed with this hospital's own (context.state, else pretrained), in
    the pretrained order; and the received keys."""
    received = record_tensors(msg.content["arrays"]) if "arrays" in msg.content.array_records else {}
    own = (record_tensors(context.state[local_key(job)]) if local_key(job) in context.state.array_records
           else h.pretrained()[0])
    pre = h.pretrained()[0]
    return {k: received[k] if k in received else own[k] for k in pre}, list(received)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, h = _setup(msg, context)
    reuse = bool(cfg.get("reuse", True))
    if cfg["kind"] == "data_vector":
        tau, meta, reused = hosp.data_vector(h, reuse)
        content = RecordDict({"arrays": vector_record(tau),
                              "metrics": MetricRecord({"num-examples": int(meta["sample_count"])}),
                              "meta": _meta(context, h, vector=json.dumps(meta, default=str), reused=reused)})
        return Message(content=content, reply_to=msg)
    job = str(cfg["job"])
    start, sent = _model_state(msg, context, h, job)
    state, info = hosp.local_round(h, start, epochs=int(cfg["epochs"]), round_=int(cfg["server-round"]), reuse=reuse)
    kept = [k for k in state if k not in sent]
    if kept:
        context.state[local_key(job)] = tensors_record(state, kept)
    content = RecordDict({"arrays": tensors_record(state, sent),
                          "metrics": MetricRecord({"num-examples": int(info["images"]),
                                                   "train-loss": float(info.get("loss", 0.0))}),
                          "meta": _meta(context, h, seed=int(info["seed"]), reused=info["reused"])})
    return Message(content=content, reply_to=msg)


@app.train("restore")
def restore(msg: Message, context: Context) -> Message:
    from dvlib.vectors import BN_STAT, COUNTER, key_kinds

    cfg, h = _setup(msg, context)
    state = record_tensors(msg.content["arrays"])
    what = str(cfg["visit"])
    new, meta = hosp.restore_visit(h, state, json.loads(cfg["model-meta"]), what)
    kinds = key_kinds(new)  # by key names: running_mean/var, num_batches_tracked
    changed = [k for k in new if what != "recalibrate" or kinds[k] in (BN_STAT, COUNTER)]
    content = RecordDict({"arrays": tensors_record(new, changed),  # the model's record stays the server's
                          "meta": _meta(context, h, visit=json.dumps(meta["restore_visits"][-1], default=str))})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    import numpy as np
    import torch

    from dvlib.metrics import compute_metrics

    cfg, h = _setup(msg, context)
    state, _ = _model_state(msg, context, h, str(cfg["job"]))
    probs, labels, images = hosp.predict_test(h, state)
    met = compute_metrics(labels, probs, list(h.local.classes))
    scores = {k: float(met[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc_ovr")}
    content = RecordDict({"metrics": MetricRecord({"num-examples": len(labels), **scores}),
                          "meta": _meta(context, h, confusion=json.dumps(met["confusion"]),
                                        images=json.dumps(images if h.replicate is not None else []))})
    if h.replicate is not None:  # a simulated hospital: the report pools its per-image predictions
        content["arrays"] = tensors_record({"probs": torch.from_numpy(probs),
                                            "labels": torch.from_numpy(np.asarray(labels, np.int64))})
    return Message(content=content, reply_to=msg)


@app.query()
def warmup(msg: Message, context: Context) -> Message:
    """Open this hospital's images and build its model now (a simulation actor keeps both)."""
    cfg, h = _setup(msg, context)
    if cfg["kind"] == "identify":
        return Message(content=RecordDict({"meta": _meta(context, h)}), reply_to=msg)
    h.shard("train"), h.shard("test")
    h.model(h.pretrained()[0])
    return Message(content=RecordDict({"meta": _meta(context, h)}), reply_to=msg)

