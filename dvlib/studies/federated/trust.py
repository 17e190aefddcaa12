"""What the ServerApp takes from a node: only the expected sites, and only what a reply may carry.

Nothing a node returns is trusted. The run config's ``sites`` lists the hospitals expected (with a
``run-dir``, the simulated ``hospital_1..N``); an identification round asks every connected node its
site label, and a node naming no expected site is refused by name before any job. Every later reply
must come from a node under the label it gave. A data-vector reply carries exactly the vector
file's tensors of this model (keys, shapes, dtypes) and JSON metadata; a restore reply carries
exactly what its visit may change (:data:`dvlib.custody.MAY_CHANGE`) and the visit's record, never
the model's record, which the server keeps. Each check raises a :class:`DvlibError` naming the node,
before anything is written (the ServerApp stages its files and moves them out only when a job ends).
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from flwr.app import Message

from dvlib.io import DvlibError
from dvlib.studies.federated.ledger import site_of

SLACK_BYTES = 1 << 16  # .npy headers and key names on top of the tensors' own bytes


def expected_sites(cfg: Mapping) -> list[str]:
    """The run config's ``sites`` (comma or space separated); with a ``run-dir``, ``hospital_1..num-nodes``."""
    sites = [s for s in str(cfg.get("sites", "")).replace(",", " ").split() if s]
    if not sites and cfg.get("run-dir"):
        sites = [f"hospital_{i}" for i in range(1, int(cfg["num-nodes"]) + 1)]
    if not sites:
        raise DvlibError("the run config needs 'sites': the site labels of the hospitals expected "
                         "(e.g. sites=\"hospital_a,hospital_b\"); a node naming another site is refused")
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise DvlibError(f"the run config's 'sites' names {dup} twice")
    return sites


def who(msg: Message) -> str:
    pid, site = site_of(msg)
    return f"node {msg.metadata.src_node_id} ({site!r})" if site else f"node {msg.metadata.src_node_id}"


def identified(replies: list[Message], sites: list[str]) -> dict[int, str]:
    """{node id: site label} of the identification round; refused unless exactly the expected sites."""
    labels = {m.metadata.src_node_id: site_of(m)[1] for m in replies}
    unexpected = [f"node {n} names itself {s!r}" for n, s in labels.items() if s not in sites]
    if unexpected:
        raise DvlibError(f"unexpected nodes refused: {'; '.join(unexpected)} (the run config's sites: {sites})")
    seen = sorted(labels.values())
    twice = sorted({s for s in seen if seen.count(s) > 1})
    if twice:
        raise DvlibError(f"several nodes name the site(s) {twice}; each expected site is one node")
    return labels


def check_sender(reply: Message, known: Mapping[int, str], what: str) -> None:
    """The reply comes from an identified node, under the label it gave."""
    node, label = reply.metadata.src_node_id, site_of(reply)[1]
    if known.get(node) != label:
        raise DvlibError(f"{what}: {who(reply)} is not the site it identified as ({known.get(node)!r}); refused")


def _arrays(reply: Message, what: str, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reply's one ArrayRecord, exactly ``expected``'s keys, shapes and dtypes; refused otherwise."""
    c = reply.content
    if set(c.array_records) != {"arrays"} or set(c.metric_records) - {"metrics"}:
        raise DvlibError(f"{what}: {who(reply)} replied records {sorted(c.keys())}, not one 'arrays' record")
    rec = c["arrays"]
    limit = sum(t.numel() * t.element_size() for t in expected.values()) + SLACK_BYTES * max(1, len(expected))
    if rec.count_bytes() > limit:
        raise DvlibError(f"{what}: {who(reply)} sent {rec.count_bytes()} bytes, more than the {limit} this "
                         "reply may hold; refused")
    keys = list(rec.keys())
    extra, missing = [k for k in keys if k not in expected], [k for k in expected if k not in keys]
    if extra or missing:
        raise DvlibError(f"{what}: {who(reply)} sent tensors it may not ({extra[:5]}) or lacks some ({missing[:5]})")
    got = dict(rec.to_torch_state_dict())
    wrong = [k for k, t in got.items() if t.shape != expected[k].shape or t.dtype != expected[k].dtype]
    if wrong:
        raise DvlibError(f"{what}: {who(reply)} sent tensors of other shapes or dtypes: {wrong[:5]}")
    return got


def json_field(reply: Message, key: str, kind: type, what: str):
    """The reply's metadata ``key``, JSON of type ``kind``; refused naming the node otherwise."""
    meta = reply.content.config_records.get("meta")
    try:
        value = json.loads(str(meta[key]))
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise DvlibError(f"{what}: {who(reply)} sent metadata '{key}' that is not JSON ({type(e).__name__}); "
                         "refused") from None
    if not isinstance(value, kind):
        raise DvlibError(f"{what}: {who(reply)} sent metadata '{key}' that is not a JSON {kind.__name__}; refused")
    return value


def _json(reply: Message, key: str, what: str) -> dict:
    return json_field(reply, key, dict, what)


def vector_reply(reply: Message, pretrained: Mapping[str, torch.Tensor], kinds: Mapping) -> dict:
    """The metadata of a data-vector reply whose tensors are the vector file's of this model
    (``kinds``: :func:`dvlib.vectors.key_kinds` of the pretrained model)."""
    from dvlib.studies.federated.records import SECTION_OF

    expected = {f"{SECTION_OF[kinds[k]]}/{k}": t for k, t in pretrained.items()}
    what = "data-vector exchange"
    _arrays(reply, what, expected)
    return _json(reply, "vector", what)


def restore_reply(reply: Message, state: Mapping[str, torch.Tensor], what: str, site: str, *, index: int,
                  reset: bool) -> tuple[dict, dict]:
    """(changed tensors, the visit's record) of a restore reply: exactly what visit ``what`` may change,
    and a record of this visit at this site (checked again by the server against the new weights)."""
    from dvlib.checks import MAX_COUNT
    from dvlib.custody import changeable

    where = f"restore visit {index + 1}"
    may = changeable(state, [what])
    tensors = _arrays(reply, where, {k: v for k, v in state.items() if k in may})
    rec = _json(reply, "visit", where)
    n = rec.get("images")
    if rec.get("site") != site or rec.get("mode") != what or (what == "recalibrate" and rec.get("reset") is not reset) \
            or isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_COUNT:
        raise DvlibError(f"{where}: {who(reply)} sent a visit record that is not a {what} visit at {site!r} "
                         f"(reset {reset}) over a positive number of images: {str(rec)[:200]}")
    return tensors, rec
