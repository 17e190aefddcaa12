"""The Flower App: ``pyproject.toml`` (components and the run's knobs), :mod:`.client_app` (a
hospital) and :mod:`.server_app` (the coordinator), each with a module-level ``app``::

    flwr run dvlib/studies/federated/app <connection> --run-config 'preset="quick" num-nodes=4 ...'

docs/multi-site.md says how to run it against a SuperLink with SuperNodes at the hospitals, or in
Flower's simulation runtime.
"""
