"""Flower's simulation runtime (Ray), as the report uses it: one call runs a list of jobs.

``simulate(config, n)`` runs the app's ServerApp in this process and n virtual SuperNodes (partition
ids 0..n-1) whose ClientApps run in Ray actor processes (Flower stops Ray at the end), and returns
the ServerApp's results: what ``flwr run`` in a simulation SuperLink runs, minus the processes and
with the results in memory. One actor by default: hospitals train one after another, which is what a
CPU shared with others affords; the actor keeps its decoded images between messages. Flower's
telemetry is off unless ``FLWR_TELEMETRY_ENABLED`` says otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import os

from dvlib.io import DvlibError


def backend_config(actors: int = 1, gpus: float = 0.0, log_to_driver: bool = False) -> dict:
    """Ray with ``actors`` CPUs and one CPU per ClientApp: at most ``actors`` hospitals at once."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": float(gpus)},
            "init_args": {"num_cpus": int(actors), "num_gpus": 1 if gpus else 0, "include_dashboard": False,
                          "logging_level": "ERROR", "log_to_driver": bool(log_to_driver),
                          "object_store_memory": 256 * 2**20}}


@contextlib.contextmanager
def _quiet_flower(quiet: bool):
    """Flower's log lines (several per round) off the console while ``quiet``; the
    environment Flower's Ray backend changes (PYTHONPATH) put back afterwards."""
    saved_env = {k: os.environ.get(k) for k in ("PYTHONPATH",)}
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    logger = logging.getLogger("flwr")
    levels = [(h, h.level) for h in logger.handlers]
    if quiet:
        for h, _ in levels:
            h.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for h, level in levels:
            h.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _agent_ports_given():
    """WORKAROUND for ray-project/ray#65983 (open): the raylet waits at most 15 s (hard-coded) for its
    dashboard agent to report the ports it chose, and aborts when the agent starts slower, as it does
    on a loaded machine (a shared 2-core machine, often; Flower's own ``ray.init`` too). Told the
    ports beforehand it does not wait; ``ray start`` takes them as options but ``ray.init`` does not,
    and neither passes the agent's HTTP port to the raylet, so this sets free ports on Ray's private
    ``RayParams`` and adds that port to the raylet's command line. Remove it with that issue."""
    import re

    from ray._private import parameter, services

    from dvlib.studies.federated.deployment import free_ports

    init, start = parameter.RayParams.__init__, services.start_ray_process

    def params(self, *args, **kwargs):
        init(self, *args, **kwargs)
        names = ("metrics_agent_port", "dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port")
        for name, port in zip(names, free_ports(len(names))):
            if name == "dashboard_agent_listen_port" or getattr(self, name, None) in (None, 0):
                setattr(self, name, port)

    def start_process(command, process_type, *args, **kwargs):
        m = re.search(r"--listen-port=(\d+)", " ".join(command))
        if process_type == "raylet" and m and not any(c.startswith("--dashboard_agent_listen_port") for c in command):
            command = [*command, f"--dashboard_agent_listen_port={m.group(1)}"]
        return start(command, process_type, *args, **kwargs)

    parameter.RayParams.__init__, services.start_ray_process = params, start_process
    try:
        yield
    finally:
        parameter.RayParams.__init__, services.start_ray_process = init, start


def start_ray(init_args: dict) -> str:
    """Start Ray in this process (Flower then uses it, and stops it at the end) with
    :func:`_agent_ports_given`; returns its address, which another process's Flower joins through
    ``RAY_ADDRESS``."""
    import sys

    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences Ray's FutureWarning
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    with _agent_ports_given():
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    return ray.get_runtime_context().gcs_address


def simulate(config: dict, num_nodes: int, *, actors: int = 1, gpus: float = 0.0, quiet: bool = True,
             client=None) -> dict:
    """Run the app's ServerApp with ``config`` (overrides of its run config,
    ``dvlib/studies/federated/app/pyproject.toml``) over ``num_nodes`` simulated SuperNodes; returns
    {job: result} (see :mod:`dvlib.studies.federated.server`). ``client``: another ClientApp than the
    app's (a test's hostile hospital)."""
    from dvlib.studies.federated import require_flower

    require_flower()
    import ray
    from flwr.simulation import run_simulation

    from dvlib.studies.federated.app import client_app, server_app

    backend = backend_config(actors, gpus, log_to_driver=not quiet)
    with _quiet_flower(quiet), server_app.in_process({**config, "num-nodes": int(num_nodes)}) as sink:
        try:
            start_ray(backend["init_args"])
            run_simulation(server_app=server_app.app, client_app=client or client_app.app, num_supernodes=int(num_nodes),
                           backend_config=backend)
        finally:
            if ray.is_initialized():  # Flower shuts it down itself unless it failed first
                ray.shutdown()
    if "error" in sink:
        raise DvlibError(f"the federated run failed:\n{sink['error']}")
    if not sink:
        raise DvlibError("the federated run returned nothing (see Flower's log above)")
    return sink
