"""Flower's simulation runtime (Ray), as the report uses it: one call runs a list of jobs.

``simulate(config, n)`` starts Ray, runs the ServerApp in this process and n virtual SuperNodes
(partition ids 0..n-1) whose ClientApps run in Ray actor processes, and returns the ServerApp's
results. One actor by default: hospitals train one after another, which is what a CPU shared with
others affords; the actor keeps its decoded images between messages. Flower's telemetry is off
unless ``FLWR_TELEMETRY_ENABLED`` says otherwise.
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
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences Ray's FutureWarning
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
def _fixed_agent_ports():
    """Ray's raylet waits at most 15 s (hard-coded) for its dashboard agent to report the ports it
    chose, and dies when the agent starts slower, as it does on a loaded machine
    (ray-project/ray#65983); told the ports beforehand it does not wait. ``ray start`` takes them as
    options, ``ray.init`` does not: here free ports are set on its parameters, and the agent's HTTP
    port, which Ray does not pass to the raylet, is added to the raylet's command line."""
    import re

    from ray._private import parameter, services

    from dvlib.federated.deployment import free_ports

    init, start = parameter.RayParams.__init__, services.start_ray_process

    def params(self, *args, **kwargs):
        init(self, *args, **kwargs)
        names = ("metrics_agent_port", "dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port")
        for name, port in zip(names, free_ports(len(names))):
            if name != "dashboard_agent_listen_port" and getattr(self, name, None) not in (None, 0):
                continue
            setattr(self, name, port)

    def start_process(command, process_type, *args, **kwargs):
        if process_type == "raylet" and not any(c.startswith("--dashboard_agent_listen_port") for c in command):
            m = re.search(r"--listen-port=(\d+)", " ".join(command))
            if m:
                command = [*command, f"--dashboard_agent_listen_port={m.group(1)}"]
        return start(command, process_type, *args, **kwargs)

    parameter.RayParams.__init__, services.start_ray_process = params, start_process
    try:
        yield
    finally:
        parameter.RayParams.__init__, services.start_ray_process = init, start


def start_ray(init_args: dict, attempts: int = 2, probe_s: float = 120.0) -> None:
    """Start Ray here before Flower does (Flower then uses it, and shuts it down at the end), on
    fixed agent ports (:func:`_fixed_agent_ports`), and check that it runs a task; if not, start it
    again (``attempts`` in all)."""
    import sys

    import ray

    errors = []
    for _ in range(attempts):
        pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
        try:
            with _fixed_agent_ports():
                ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            ray.get(ray.remote(num_cpus=0)(lambda: 1).remote(), timeout=probe_s)
            return
        except Exception as e:  # noqa: BLE001 - any start-up failure: try again
            errors.append(f"{type(e).__name__}: {e}"[:300])
            ray.shutdown()
    raise DvlibError(f"Ray did not start in {attempts} attempts: {errors}")


def simulate(config: dict, num_nodes: int, *, actors: int = 1, gpus: float = 0.0, quiet: bool = True) -> dict:
    """Run the ServerApp with ``config`` (run-config keys, :data:`dvlib.federated.server.DEFAULTS`)
    over ``num_nodes`` simulated SuperNodes; returns {job: result} (see :mod:`dvlib.federated.server`)."""
    from dvlib.federated import require_flower

    require_flower()
    from flwr.simulation import run_simulation

    from dvlib.federated.client import make_client_app
    from dvlib.federated.server import make_server_app

    sink: dict = {}
    backend = backend_config(actors, gpus, log_to_driver=not quiet)
    with _quiet_flower(quiet):
        start_ray(backend["init_args"])
        try:
            run_simulation(server_app=make_server_app({**config, "num-nodes": int(num_nodes)}, sink),
                           client_app=make_client_app(), num_supernodes=int(num_nodes), backend_config=backend)
        finally:
            import ray

            if ray.is_initialized():  # Flower shuts it down itself unless it failed first
                ray.shutdown()
    if "error" in sink:
        raise DvlibError(f"the federated run failed:\n{sink['error']}")
    if not sink:
        raise DvlibError("the federated run returned nothing (see Flower's log above)")
    return sink
