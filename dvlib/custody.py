"""A restore chain of custody: the merged weights' hash, and what each restore visit may change.

``dvlib merge`` records :func:`record` of the merged weights in the model file (``custody``): a
sha256 over every tensor in key order, the same hash without what a ``recalibrate`` visit may change
(BatchNorm running statistics and counters), and a short digest per key. Each restore visit records
what it changed and the hash of the weights after it (:func:`visit_record`). Before a visit,
:func:`verify` checks a file against that chain: every tensor no earlier visit may change must be the
merged one, and the weights must be those the last visit left. The record sits in the file it
describes, so it catches weights changed after signing off; against a file rewritten with its record,
compare :func:`weights_sha256` with the hash the coordinator announced (``--merged-sha256``).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

import torch

from dvlib.io import DvlibError
from dvlib.vectors import BN_STAT, COUNTER, key_kinds

DIGEST = 16  # hex digits kept per key: enough to name the first differing key; the full hash binds
HEX = re.compile(r"[0-9a-f]{64}")
# what one visit may change: key kinds (dvlib.vectors), or None for every tensor (an epoch trains)
MAY_CHANGE = {"recalibrate": (BN_STAT, COUNTER), "finetune_epoch": None}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (memory layout and device do not count)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def key_sha256(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: tensor_sha256(v) for k, v in state.items()}


def weights_sha256(state: Mapping[str, torch.Tensor], leave_out: Iterable[str] = (),
                   digests: Mapping[str, str] | None = None) -> str:
    """sha256 over (key, tensor sha256) in key order, leaving out the keys ``leave_out``."""
    digests = digests if digests is not None else key_sha256(state)
    skip = set(leave_out)
    h = hashlib.sha256()
    for k in state:
        if k not in skip:
            h.update(f"{k}\t{digests[k]}\n".encode())
    return h.hexdigest()


def changeable(state: Mapping[str, torch.Tensor], modes: Iterable[str], where: str = "") -> set[str]:
    """The keys that visits of ``modes`` may change."""
    kinds, out = key_kinds(state), set()
    for mode in modes:
        if mode not in MAY_CHANGE:
            raise DvlibError(f"{where}: restore visit mode {mode!r} is not one of {', '.join(MAY_CHANGE)}")
        allowed = MAY_CHANGE[mode]
        out |= {k for k in state if allowed is None or kinds[k] in allowed}
    return out


def record(state: Mapping[str, torch.Tensor]) -> dict:
    """What the merged file records of its weights."""
    d = key_sha256(state)
    return {"sha256": weights_sha256(state, digests=d),
            "sha256_without_bn_stats": weights_sha256(state, changeable(state, ["recalibrate"]), d),
            "key_sha256": [d[k][:DIGEST] for k in state]}


def visit_record(before: Mapping[str, str], state: Mapping[str, torch.Tensor], mode: str) -> dict:
    """What one visit changed (``before``: :func:`key_sha256` of the weights it started from) and
    the hash after it; refused if it changed a tensor its mode may not."""
    after = key_sha256(state)
    changed = [k for k in state if after[k] != before.get(k)]
    wrong = sorted(set(changed) - changeable(state, [mode]))
    if wrong:
        raise DvlibError(f"the {mode} visit changed tensors it may not: {wrong[:5]}; nothing was written")
    return {"changed": len(changed), "sha256_after": weights_sha256(state, digests=after)}


def _problems(rec, keys: list[str], where: str) -> list[str]:
    if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not HEX.fullmatch(rec["sha256"]):
        return [f"{where}: metadata 'custody' must hold 'sha256' (64 hex digits)"]
    d = rec.get("key_sha256")
    if not isinstance(d, list) or len(d) != len(keys) or not all(isinstance(x, str) and len(x) == DIGEST for x in d):
        return [f"{where}: metadata 'custody.key_sha256' must list one {DIGEST}-digit digest per tensor "
                f"({len(keys)})"]
    return []


def verify(meta: Mapping, state: Mapping[str, torch.Tensor], where: str, expected: str | None = None,
           digests: Mapping[str, str] | None = None) -> str:
    """Refuse a model whose weights left the chain; returns a line for the user saying what was checked.

    ``expected``: the merged weights' sha256 the coordinator announced; ``digests``: :func:`key_sha256`
    of ``state`` if already computed."""
    rec = meta.get("custody")
    if rec is None:
        if expected:
            raise DvlibError(f"{where}: records no merged weights hash (metadata 'custody'), cannot match "
                             f"--merged-sha256 {expected}")
        return "no custody record (a file from before dvlib recorded one): the chain is not checked"
    problems = _problems(rec, list(state), where)
    if problems:
        raise DvlibError(problems[0])
    if expected and expected != rec["sha256"]:
        raise DvlibError(f"{where}: its merged weights hash {rec['sha256']} is not --merged-sha256 {expected}")
    visits = list(meta.get("restore_visits") or [])
    may = changeable(state, [v.get("mode") for v in visits], where)
    digests = digests if digests is not None else key_sha256(state)
    for k, merged in zip(state, rec["key_sha256"]):
        if k not in may and digests[k][:DIGEST] != merged:
            done = ", ".join(f"{v.get('site')}:{v.get('mode')}" for v in visits) or "no visits"
            raise DvlibError(f"{where}: tensor '{k}' differs from the merged weights, and no earlier restore "
                             f"visit ({done}) may change it; this file is not the merged model restored")
    last = visits[-1] if visits else None
    now = weights_sha256(state, digests=digests)
    if last is None and now != rec["sha256"]:
        raise DvlibError(f"{where}: its weights hash {now} is not the merged one it records ({rec['sha256']})")
    if last is not None and last.get("sha256_after") is not None and now != last["sha256_after"]:
        raise DvlibError(f"{where}: its weights changed after the last restore visit ({last.get('site')}: "
                         f"{last.get('mode')}) recorded them (sha256 {now}, recorded {last['sha256_after']})")
    return f"custody: weights match the merged weights (sha256 {rec['sha256'][:16]}...) and {len(visits)} visit(s)"
