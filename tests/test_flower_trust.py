"""The ServerApp trusts nothing a node returns: hostile hospitals through the real Flower apps.

Flower's in-process simulation (as tests/test_federated.py), the real ServerApp, and a ClientApp that
is the real one with its reply altered as a hostile hospital would. Each case asserts the run fails
with a DvlibError naming the node and what it sent, and that the output folder holds nothing. Few
cases: each Ray start costs 20-40 s here.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="the [fl] extra: pip install -e '.[fl]'")

from flwr.app import Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from dvlib import experiment as ex  # noqa: E402
from dvlib.io import DvlibError  # noqa: E402
from dvlib.studies.federated.steps import federation_config  # noqa: E402

SMALL = {"image_size": 32, "epochs": 2, "n_hospitals": 2, "n_patients": 40}

hostile = ClientApp()


@hostile.train()
def _train(msg: Message, context) -> Message:
    from dvlib.studies.federated.app import client_app

    return client_app.train(msg, context)


@hostile.train("restore")
def _restore(msg: Message, context) -> Message:
    """An honest visit, then every weight of the received model x3 added to the reply."""
    from dvlib.studies.federated.app import client_app
    from dvlib.studies.federated.records import record_tensors, tensors_record

    reply = client_app.restore(msg, context)
    sent = record_tensors(msg.content["arrays"])
    changed = record_tensors(reply.content["arrays"])
    both = {**{k: v * 3 if v.is_floating_point() else v for k, v in sent.items()}, **changed}
    reply.content["arrays"] = tensors_record(both)
    return reply


@hostile.query()
def _query(msg: Message, context) -> Message:
    from dvlib.studies.federated.app import client_app

    return client_app.warmup(msg, context)


def _hostile_vector(change) -> ClientApp:
    """A hospital whose data-vector reply is altered by ``change(reply)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        from dvlib.studies.federated.app import client_app

        reply = client_app.train(msg, context)
        change(reply)
        return reply

    app.query()(_query)
    return app


def _not_json(reply: Message) -> None:
    reply.content["meta"]["vector"] = "{'sample_count': 1e9"


def _extra_tensor(reply: Message) -> None:
    from flwr.app import Array

    reply.content["arrays"]["vector/extra"] = Array(torch.zeros(2**22).numpy())  # 16 MB more


@pytest.fixture(scope="module")
def replicate(tmp_path_factory):
    run = ex.open_run("trust", "smoke", seeds=[0], root=tmp_path_factory.mktemp("trust"), device="cpu", **SMALL)
    ex.step_split(run)
    ex.step_finetune(run, ["hospital_1", "hospital_2"], log=lambda *_: None)
    return ex.replicate(run, *run.replicates[0])


def _refused(config: dict, out, client, *needles) -> str:
    from dvlib.studies.federated.simulation import simulate

    with pytest.raises(DvlibError) as e:
        simulate({**config, "out-dir": str(out), "evaluate": False}, 2, client=client)
    msg = str(e.value)
    assert "Traceback" not in msg
    for n in needles:
        assert n in msg, f"{n!r} not in:\n{msg}"
    assert not out.exists() or not any(out.rglob("*"))  # nothing written
    return msg


def test_a_restore_reply_that_rewrites_weights_is_refused(replicate, tmp_path):
    torch.manual_seed(0)
    cfg = federation_config(replicate, ["data_vector"], threads=1)
    first = next(iter(replicate.pretrained()[0]))  # a convolution's weight: no recalibration may change it
    _refused(cfg, tmp_path / "out", hostile, "restore visit 1", "('hospital_1')", "sent tensors it may not",
             first)


def test_an_unexpected_node_is_refused_by_name(replicate, tmp_path):
    cfg = {**federation_config(replicate, ["data_vector"], threads=1), "sites": "hospital_1"}
    _refused(cfg, tmp_path / "out", None, "unexpected nodes refused", "names itself 'hospital_2'",
             "sites: ['hospital_1']")


@pytest.mark.parametrize("change, needles", [
    (_not_json, ["data-vector exchange", "sent metadata 'vector' that is not JSON"]),
    (_extra_tensor, ["data-vector exchange", "bytes, more than the"]),
])
def test_a_malformed_or_oversized_vector_reply_is_refused_before_anything_is_written(replicate, tmp_path, change,
                                                                                      needles):
    cfg = federation_config(replicate, ["data_vector"], threads=1)
    msg = _refused(cfg, tmp_path / "out", _hostile_vector(change), *needles)
    assert "('hospital_1')" in msg
