"""Federated learning on Flower: one more driver of dvlib's stages, not a third pipeline.

A hospital is a Flower ``ClientApp`` (:mod:`dvlib.federated.client`) that runs dvlib's own stages on
its images (:mod:`dvlib.federated.hospital`: ``dvlib.site.finetune_site``, ``dvlib.stages.finetune``,
``dvlib.site.restore_site``); the coordinator is a ``ServerApp`` (:mod:`dvlib.federated.server`) that
merges with ``dvlib.coordinator.merge_files`` (the data vector: one exchange, then the restore visits
in turn) or aggregates with Flower's FedAvg (:mod:`dvlib.federated.strategies`: FedAvg and FedBN at R
rounds). The same two apps run in Flower's simulation runtime (:mod:`dvlib.federated.simulation`,
what notebook 07 uses through :func:`step_federated`) and in its deployment runtime
(:mod:`dvlib.federated.app`, :mod:`dvlib.federated.deployment`; see docs/multi-site.md).

Flower is an optional extra: ``pip install -e '.[fl]'``. Importing this package does not import it.
"""
from __future__ import annotations

from dvlib.io import DvlibError

FLOWER_EXTRA = "pip install -e '.[fl]'  (flwr[simulation]>=1.42,<1.43)"


def require_flower() -> None:
    """Raise a :class:`DvlibError` that says how to install Flower if it is missing."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise DvlibError(f"the federated comparison needs Flower: {FLOWER_EXTRA}") from None


def step_federated(run, *args, **kwargs):
    """See :func:`dvlib.federated.steps.step_federated`."""
    from dvlib.federated.steps import step_federated as step

    return step(run, *args, **kwargs)


__all__ = ["FLOWER_EXTRA", "require_flower", "step_federated"]
