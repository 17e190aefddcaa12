"""The ServerApp (``app``): the coordinator. It completes the run config and runs its jobs
(:func:`dvlib.studies.federated.server.run_jobs`: the data-vector exchange, FedAvg, FedBN).

The run config is the app's ``[tool.flwr.app.config]`` (``pyproject.toml`` beside this module) with
the overrides of ``flwr run --run-config``. Left empty, ``settings`` and ``classes`` come from the
run at ``run-dir`` (simulated hospitals), or ``settings`` from ``preset`` (a consortium).

Flower's in-process simulation (``flwr.simulation.run_simulation``, what notebook 07 drives through
:func:`dvlib.studies.federated.simulation.simulate`) gives the ServerApp no run config and hands back
no result: :func:`in_process` passes the overrides in and the results out.
"""
from __future__ import annotations

import contextlib
import json
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dvlib.io import DvlibError

APP_DIR = Path(__file__).resolve().parent
_IN_PROCESS: dict = {}

app = ServerApp()


@contextlib.contextmanager
def in_process(overrides: Mapping) -> Iterator[dict]:
    """While open, a ServerApp run in this process uses ``overrides`` and leaves its results
    ({job: result}, or ``error``: the traceback) in the dict yielded."""
    if _IN_PROCESS:
        raise DvlibError("a federated run is already under way in this process")
    sink: dict = {}
    _IN_PROCESS.update(overrides=dict(overrides), sink=sink)
    try:
        yield sink
    finally:
        _IN_PROCESS.clear()


def run_config(overrides: Mapping) -> dict:
    """The app's run config with ``overrides``; unknown keys are refused, as ``flwr run`` does."""
    from flwr.common.config import get_fused_config_from_dir

    try:
        return dict(get_fused_config_from_dir(APP_DIR, dict(overrides)))
    except (OSError, ValueError) as e:  # no such file, or a key the app does not have
        raise DvlibError(f"{APP_DIR / 'pyproject.toml'}: run config: {e}") from None


def consortium(cfg: Mapping) -> dict:
    """``cfg`` with ``settings``, ``classes`` (and ``preset``) filled in where left empty: from the
    run at ``run-dir`` (its replicate of ``split-seed`` and ``train-seed``), else ``settings`` from ``preset``."""
    from dvlib.stages import TrainSettings

    found: dict = {}
    if cfg["run-dir"] and not (cfg["settings"] and cfg["classes"]):
        from dvlib.experiment import open_run, replicate

        d, s, t = Path(cfg["run-dir"]), int(cfg["split-seed"]), int(cfg["train-seed"])
        run = open_run(d.name, root=d.parent, seeds=[s], train_seeds=[t], device=str(cfg["device"]))
        r = replicate(run, s, t, str(cfg["device"]))
        found = {"settings": json.dumps(asdict(r.settings)), "classes": json.dumps(r.classes),
                 "preset": run.settings["preset"]}
    elif cfg["preset"] and not cfg["settings"]:
        from dvlib.presets import get_preset

        found = {"settings": json.dumps(asdict(TrainSettings.from_preset(get_preset(str(cfg["preset"])))))}
    out = {**cfg, **{k: v for k, v in found.items() if not cfg[k]}}
    if not out["settings"] or not out["classes"]:
        raise DvlibError("the run config needs 'classes' (a JSON list) and 'preset' or 'settings', or a 'run-dir'")
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    from dvlib.studies.federated.server import run_jobs

    local = dict(_IN_PROCESS)
    try:
        results = run_jobs(grid, consortium(run_config({**context.run_config, **local.get("overrides", {})})))
    except BaseException as e:
        if local:  # a refusal is its message; anything else its traceback
            local["sink"]["error"] = str(e) if isinstance(e, DvlibError) else traceback.format_exc()
        raise
    if local:
        local["sink"].update(results)
