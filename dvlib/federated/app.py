"""The Flower App: the two objects a Flower App directory points at, and that directory.

``flwr run`` needs a directory with a ``pyproject.toml`` naming the components; the code itself is
dvlib, installed (same version) at the coordinator and at every site, as for the file workflow, so
the App's FAB is that one small file. :func:`write_app` writes it, and :func:`write_run_config` the
run's settings from a preset (what every hospital trains with travels in the messages)::

    python -m dvlib.federated.app dvlib-fl-app --preset quick --classes ACK BCC MEL NEV SCC SEK --nodes 4
    flwr run dvlib-fl-app <federation> --run-config dvlib-fl-app/run.toml

``flwr`` finds ``client_app`` and ``server_app`` below by reading this module (top-level
assignments, as it requires). Run-config defaults are :data:`dvlib.federated.server.DEFAULTS`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from dvlib.federated.client import make_client_app
from dvlib.federated.server import DEFAULTS, make_server_app

client_app = make_client_app()
server_app = make_server_app()


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def app_toml() -> str:
    from dvlib import __version__

    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "dvlib-fl"', f'version = "{__version__}"',
             'description = "dvlib: data vectors, FedAvg and FedBN over Flower (the code is the installed dvlib)"',
             f'dependencies = ["dvlib=={__version__}", "flwr[simulation]>=1.42,<1.43"]', "",
             "[tool.flwr.app]", 'publisher = "dvlib"', "",
             "[tool.flwr.app.components]", 'serverapp = "dvlib.federated.app:server_app"',
             'clientapp = "dvlib.federated.app:client_app"', "",
             "[tool.flwr.app.config]"]
    lines += [f"{k} = {_toml(v)}" for k, v in DEFAULTS.items()]
    return "\n".join(lines) + "\n"


def write_app(directory: str | Path) -> Path:
    """Write the Flower App directory (its ``pyproject.toml``); returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(app_toml())
    return d


def run_config(preset: str, classes, nodes: int, train_seed: int | None = None, **values) -> dict:
    """The ServerApp's settings for a consortium: ``preset`` (``dvlib.presets``) fixes what every
    hospital trains with; ``values`` override run-config keys (``jobs``, ``restore``, ``out-dir``, ...)."""
    import json
    from dataclasses import asdict

    from dvlib.presets import get_preset
    from dvlib.stages import TrainSettings

    p = get_preset(preset)
    return {**DEFAULTS, "settings": json.dumps(asdict(TrainSettings.from_preset(p))), "classes": json.dumps(list(classes)),
            "preset": preset, "train-seed": int(p.seed if train_seed is None else train_seed), "lam": float(p.lam),
            "num-nodes": int(nodes), **values}


def write_run_config(path: str | Path, config: dict) -> Path:
    """A run-config TOML for ``flwr run ... --run-config PATH``."""
    path = Path(path)
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
    return path


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dvlib.federated.app", description=__doc__.splitlines()[0])
    ap.add_argument("directory", help="the Flower App directory to write (pyproject.toml, and run.toml with --preset)")
    ap.add_argument("--preset", help="write run.toml from this preset (quick, paper, ...)")
    ap.add_argument("--classes", nargs="+", help="the agreed class names, in label order")
    ap.add_argument("--nodes", type=int, default=2, help="hospitals (SuperNodes) to wait for")
    ap.add_argument("--train-seed", type=int, default=None, help="the consortium's training seed (heads, sites' seeds)")
    ap.add_argument("--jobs", default="data_vector", help="e.g. 'data_vector' or 'data_vector fedavg-8'")
    ap.add_argument("--restore", default="recalibrate", help="the data vector's restore mode")
    ap.add_argument("--out-dir", default="", help="where the ServerApp writes the models and logs")
    a = ap.parse_args(argv)
    d = write_app(a.directory)
    print(d / "pyproject.toml")
    if a.preset:
        if not a.classes:
            ap.error("--preset needs --classes")
        cfg = run_config(a.preset, a.classes, a.nodes, a.train_seed, jobs=a.jobs, restore=a.restore,
                         **{"out-dir": a.out_dir})
        print(write_run_config(d / "run.toml", cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
