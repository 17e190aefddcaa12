"""FedAvg and FedBN: Flower's own FedAvg, with what dvlib needs from it and nothing else changed.

:class:`DvlibFedAvg` is ``flwr.serverapp.strategy.FedAvg`` (sample-weighted: each reply's
``num-examples``, here the hospital's training images) that

- aggregates the replies in hospital order (partition id, then site label): float sums depend on
  their order, and replies arrive in any order;
- takes BatchNorm counters (``num_batches_tracked``, int64) as their maximum, as :mod:`dvlib.merging`
  does (FedAvg would return their weighted mean as float64);
- for FedBN (Li et al. 2021, https://arxiv.org/abs/2102.07623) never sends the ``local_keys``: the
  hospitals keep their own BatchNorm statistics (and, with ``affine``, the BatchNorm weights too, as
  in the paper) and reply only with the shared keys, so only those are averaged;
- records bytes and seconds per round (:class:`dvlib.studies.federated.ledger.Ledger`) and fails loudly when a
  hospital's reply is missing or an error (Flower's FedAvg would log it and keep going).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from dvlib.studies.federated.ledger import Ledger, site_of
from dvlib.io import DvlibError
from dvlib.vectors import BN_STAT, COUNTER, Kind


def local_keys(kinds: Mapping[str, Kind], bn_modules: Iterable[str] = (), affine: bool = False) -> list[str]:
    """Keys that stay at the hospitals under FedBN: BatchNorm statistics and counters; with
    ``affine`` also the weight and bias of the BatchNorm modules named in ``bn_modules``."""
    prefixes = tuple(f"{m}." for m in bn_modules)
    return [k for k, kd in kinds.items() if kd in (BN_STAT, COUNTER) or (affine and prefixes and k.startswith(prefixes))]


class DvlibFedAvg(FedAvg):
    """Flower's FedAvg for dvlib's models (see the module docstring)."""

    def __init__(self, *, num_nodes: int, ledger: Ledger, local_keys: Iterable[str] = (), **kwargs):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_nodes,
                         min_available_nodes=num_nodes, **kwargs)
        self.num_nodes = num_nodes
        self.ledger = ledger
        self.local_keys = set(local_keys)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        leaked = sorted(self.local_keys & set(arrays))
        if leaked:  # FedBN: these never leave a hospital
            arrays = ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.ledger.sent(str(server_round), messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = sorted(replies, key=site_of)
        self.ledger.received(str(server_round), replies)
        bad = [m for m in replies if m.has_error()]
        if bad or len(replies) != self.num_nodes:
            raise DvlibError(f"FedAvg round {server_round}: {len(replies) - len(bad)}/{self.num_nodes} hospitals "
                             f"replied; errors: {[m.error.reason for m in bad]}")
        sent = [set(m.content["arrays"].keys()) for m in replies]
        if any(self.local_keys & s for s in sent):
            raise DvlibError(f"FedAvg round {server_round}: a hospital sent keys that must stay local")
        arrays, metrics = super().aggregate_train(server_round, replies)
        counters = [k for k in arrays if k.endswith("num_batches_tracked")]
        if counters:
            top = {k: np.max([m.content["arrays"][k].numpy() for m in replies], axis=0) for k in counters}
            arrays = ArrayRecord({k: Array(np.asarray(top[k])) if k in top else v for k, v in arrays.items()})
        return arrays, metrics
