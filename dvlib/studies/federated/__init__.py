"""Federated learning on Flower: one more driver of dvlib's stages, not a third pipeline.

The Flower App is the folder ``app/`` (a static ``pyproject.toml``, :mod:`.app.client_app`,
:mod:`.app.server_app`): ``flwr run dvlib/studies/federated/app <connection>``. A hospital is its
``ClientApp``, which runs dvlib's own stages on its images (:mod:`dvlib.studies.federated.hospital`:
``dvlib.site.finetune_site``, ``dvlib.stages.finetune``, ``dvlib.site.restore_site``); the
coordinator is its ``ServerApp`` (jobs in :mod:`dvlib.studies.federated.server`), which merges with
``dvlib.coordinator.merge_files`` (the data vector: one exchange, then the restore visits in turn)
or aggregates with Flower's FedAvg (:mod:`dvlib.studies.federated.strategies`: FedAvg and FedBN at R
rounds). The same app runs in Flower's simulation runtime (in this process:
:mod:`dvlib.studies.federated.simulation`, what notebook 07 uses through :func:`step_federated`) and
in its deployment runtime (:mod:`dvlib.studies.federated.deployment` runs both on 127.0.0.1; see
docs/multi-site.md).

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
    """See :func:`dvlib.studies.federated.steps.step_federated`."""
    from dvlib.studies.federated.steps import step_federated as step

    return step(run, *args, **kwargs)


__all__ = ["FLOWER_EXTRA", "require_flower", "step_federated"]
