"""What each exchange cost: bytes down and up per hospital per round, and seconds per round.

One row per (job, round, hospital). ``round`` is ``1``..``R`` for training rounds, ``restore.<i>``
for the i-th sequential restore visit, ``final`` for sending the final model to every hospital
(the evaluation message; its reply is not counted: it exists only to score the model). Bytes are
:meth:`flwr.app.ArrayRecord.count_bytes` of what was sent (see :mod:`dvlib.studies.federated.records`).
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message


def _arrays_bytes(msg: Message) -> int:
    if not msg.has_content():
        return 0
    return sum(r.count_bytes() for r in msg.content.array_records.values())


def site_of(msg: Message) -> tuple[int, str]:
    """(partition id, site label) a reply names in its ``meta`` record."""
    meta = msg.content.config_records.get("meta") if msg.has_content() else None
    return (int(meta["partition-id"]), str(meta["site"])) if meta is not None else (1 << 30, "")


class Ledger:
    """Bytes and seconds of one job's rounds, node by node."""

    def __init__(self, job: str):
        self.job = job
        self.t0 = time.perf_counter()
        self.rows: dict[tuple[str, int], dict] = {}
        self.started: dict[str, float] = {}
        self.sites: dict[int, tuple[int, str]] = {}

    def sent(self, round_: str, messages: Iterable[Message]) -> None:
        self.started[round_] = time.perf_counter()
        for m in messages:
            row = self.rows.setdefault((round_, m.metadata.dst_node_id), {"up_bytes": 0})
            row["down_bytes"] = _arrays_bytes(m)

    def received(self, round_: str, replies: Iterable[Message], counted: bool = True) -> None:
        dt = time.perf_counter() - self.started.get(round_, self.t0)
        for m in replies:
            row = self.rows.setdefault((round_, m.metadata.src_node_id), {"down_bytes": 0})
            row["seconds"] = dt
            if m.has_error():
                row["error"] = m.error.reason
                continue
            self.sites[m.metadata.src_node_id] = site_of(m)
            row["up_bytes"] = _arrays_bytes(m) if counted else 0
            meta = m.content.config_records.get("meta")
            row["reused"] = str(meta.get("reused", "")) if meta is not None else ""

    def table(self) -> list[dict]:
        out = []
        for (round_, node), row in self.rows.items():
            pid, site = self.sites.get(node, (-1, ""))
            out.append({"job": self.job, "round": round_, "partition_id": pid, "site": site,
                        "down_bytes": int(row.get("down_bytes", 0)), "up_bytes": int(row.get("up_bytes", 0)),
                        "seconds": float(row.get("seconds", float("nan"))), "reused": row.get("reused", ""),
                        "error": row.get("error", "")})
        return sorted(out, key=lambda r: (r["partition_id"], r["round"]))

    def errors(self) -> list[str]:
        return [f"round {r['round']} at {r['site'] or r['partition_id']}: {r['error']}" for r in self.table() if r["error"]]
