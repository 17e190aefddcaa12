"""Flower's runtimes on one machine, for tests and for trying a federation before a consortium runs
it (docs/multi-site.md): a SuperLink and N SuperNodes as separate processes (the deployment
runtime), or a SuperLink in simulation mode (``simulation=True``: Flower's simulation runtime, no
SuperNodes). Every process listens on 127.0.0.1 on a free port, without TLS (``--insecure``: never
across a network), with a private ``FLWR_HOME`` and Flower's telemetry off. Node configs and run
configs are Flower's own ``key=value`` text::

    with LocalDeployment(tmp, ['data="/data/site_a"', 'data="/data/site_b"']) as d:
        d.wait(d.submit("dvlib/studies/federated/app", ['preset="quick" num-nodes=2 out-dir="/tmp/out"']))

Processes are started in their own process groups and stopped with SIGTERM (SIGKILL after 10 s);
Flower's own children (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``,
``flwr-simulation``) exit with their parents, which :meth:`LocalDeployment.stop` checks.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from dvlib.io import DvlibError

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr: next to this Python


def free_ports(k: int) -> list[int]:
    socks = []
    try:
        for _ in range(k):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _with_partition(node_config: str, i: int, n: int) -> str:
    """A SuperNode's ``--node-config`` text with ``partition-id``/``num-partitions`` added when missing."""
    extra = [f"{k}={v}" for k, v in (("partition-id", i), ("num-partitions", n)) if f"{k}=" not in node_config]
    return " ".join([node_config, *extra])


class LocalDeployment:
    """One SuperLink and one SuperNode per entry of ``node_configs`` (each SuperNode's
    ``--node-config`` text; ``partition-id``/``num-partitions`` are added when missing); with
    ``simulation``, a SuperLink in simulation mode and no SuperNodes. ``env``: more environment for
    every process (e.g. ``RAY_ADDRESS``: the simulation joins a Ray already started)."""

    def __init__(self, root: str | os.PathLike, node_configs: Sequence[str] = (), *, simulation: bool = False,
                 env: Mapping[str, str] | None = None, start_timeout: float = 120.0):
        self.root = Path(root)
        self.home = self.root / "flwr_home"
        self.home.mkdir(parents=True, exist_ok=True)
        if simulation and node_configs:
            raise DvlibError("a simulation SuperLink runs its own virtual SuperNodes: give no node configs")
        self.simulation = simulation
        self.node_configs = [_with_partition(str(c), i, len(node_configs)) for i, c in enumerate(node_configs)]
        self.link_port, *self.node_ports = free_ports(1 + len(node_configs))
        self.start_timeout = start_timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self.leftovers: list[int] = []
        self.timings: dict[str, float] = {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink
                    "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",  # spawns flower-superexec by name
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", **(env or {})}
        (self.home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                               f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n')

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                            start_new_session=True)

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def _wait(self, what: str, cond, timeout: float) -> float:
        t = time.perf_counter()
        while not cond():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise DvlibError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.log(name)[-3000:]}")
            if time.perf_counter() - t > timeout:
                raise DvlibError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)
        return time.perf_counter() - t

    def start(self) -> None:
        t = time.perf_counter()
        self._spawn("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.link_port), "--disable-runtime-dependency-installation",
                                  *(["--simulation"] if self.simulation else [])])
        self._wait("the SuperLink", lambda: "Application startup complete" in self.log("superlink"), self.start_timeout)
        for i, (port, cfg) in enumerate(zip(self.node_ports, self.node_configs)):
            self._spawn(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                          f"127.0.0.1:{self.link_port}", "--port", str(port),
                                          "--node-config", cfg])
        n = len(self.node_configs)
        self._wait(f"{n} SuperNodes", lambda: self.log("superlink").count("Activated node_id") >= n, self.start_timeout)
        self.timings["start_s"] = time.perf_counter() - t

    def stop(self) -> None:
        t = time.perf_counter()
        order = [k for k in self.procs if k != "superlink"] + (["superlink"] if "superlink" in self.procs else [])
        for name in order:
            if self.procs[name].poll() is None:
                try:
                    os.killpg(self.procs[name].pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name in order:
            try:
                self.procs[name].wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.procs[name].pid, signal.SIGKILL)
                self.procs[name].wait(timeout=5)
        deadline = time.perf_counter() + 10
        while (left := self.children()) and time.perf_counter() < deadline:
            time.sleep(0.2)
        self.leftovers = left
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.timings["stop_s"] = time.perf_counter() - t

    def children(self) -> list[int]:
        """Flower processes still running that name one of this deployment's ports."""
        ports = {str(p) for p in (self.link_port, *self.node_ports)}
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if ("flwr" in cmd or "flower" in cmd) and any(re.search(rf"[: ]{p}(\s|$)", cmd) for p in ports):
                out.append(int(d.name))
        return out

    # --- the CLI -------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def submit(self, app_dir: str | os.PathLike, run_config: Sequence[str] = (),
               federation_config: Sequence[str] = ()) -> int:
        """``flwr run <app_dir> local --run-config ... [--federation-config ...]``: Flower's ``key=value``
        text (or a TOML file) for each; returns the run id."""
        opts = [a for c in run_config for a in ("--run-config", str(c))]
        opts += [a for c in federation_config for a in ("--federation-config", str(c))]
        r = self.flwr("run", str(app_dir), "local", *opts, "--format", "json")
        m = re.search(r"\{.*\}", r.stdout, re.DOTALL)
        res = json.loads(m.group(0)) if m else {}
        if r.returncode != 0 or not res.get("success"):
            raise DvlibError(f"flwr run failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return int(res["run-id"])

    def status(self, run_id: int) -> dict:
        r = self.flwr("list", "local", "--run-id", str(run_id), "--format", "json")
        m = re.search(r"\{.*\}", r.stdout, re.DOTALL)
        runs = json.loads(m.group(0)).get("runs", []) if m else []
        return runs[0] if runs else {}

    def wait(self, run_id: int, timeout: float = 600.0) -> dict:
        """Wait until ``flwr list`` says the run finished; its status record (refused unless completed)."""
        t = time.perf_counter()
        while True:
            st = self.status(run_id)
            if str(st.get("status", "")).startswith("finished"):
                break
            if time.perf_counter() - t > timeout:
                raise DvlibError(f"run {run_id} not finished after {timeout:.0f} s: {st}")
            time.sleep(0.5)
        if st["status"] != "finished:completed":
            log = self.flwr("log", str(run_id), "local", "--show").stdout
            raise DvlibError(f"run {run_id}: {st['status']}\n{log[-4000:]}")
        self.timings[f"run_{run_id}_s"] = time.perf_counter() - t
        return st
