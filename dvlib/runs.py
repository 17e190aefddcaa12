"""Run folders: where a simulation keeps its splits, model files and results. Storage only.

Layout of ``<runs>/<run>/`` (``<runs>`` = ``$DVLIB_RUNS`` or ``runs/`` at the project root)::

    run.json                                   settings (preset + overrides), fixed at creation
    split_<s>/manifest.csv                     the split of split seed s, written once and reused
    split_<s>/train_<t>/models/*.safetensors   hospital vector files, merged and restored models
    results/<step>.csv                         tidy results of every replicate (tables, figures)

A replicate is (split seed, training seed): the split seed decides which patients go to which
hospital, the training seed everything random in training, merging and restoring. :func:`open_run`
is the one way to open a run; commands that write take :meth:`Run.lock`, so two of them never work
on one run at once.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

from dvlib.io import DvlibError, read_csv, read_json, write_json
from dvlib.presets import Preset, get_preset

_HELD: dict[str, int] = {}  # run folder -> lock depth in this process


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The dvlib project folder (pyproject.toml + dvlib/) at or above ``start`` (default: cwd), else
    the one this dvlib was installed from (editable install), else ``start``."""
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents, Path(__file__).resolve().parents[1]):
        if (p / "pyproject.toml").exists() and (p / "dvlib").is_dir():
            return p
    return here


def runs_root() -> Path:
    return Path(os.environ["DVLIB_RUNS"]) if os.environ.get("DVLIB_RUNS") else project_root() / "runs"


@dataclass
class Run:
    name: str
    root: Path
    settings: dict                    # preset name + every preset field: the run's identity
    split_seeds: list[int]
    train_seeds: list[int]
    device: str = "auto"
    _lock_file: object = field(default=None, repr=False)

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def preset(self) -> Preset:
        return get_preset(self.settings["preset"], **{k: v for k, v in self.settings.items() if k != "preset"})

    @property
    def replicates(self) -> list[tuple[int, int]]:
        return [(s, t) for s in self.split_seeds for t in self.train_seeds]

    def manifest_path(self, split_seed: int) -> Path:
        return self.dir / f"split_{split_seed}" / "manifest.csv"

    def model_path(self, split_seed: int, train_seed: int, tag: str) -> Path:
        """``hospital_<i>``, ``full`` (vector files) or ``merged_*``/``restored_*`` (model files)."""
        suffix = ".dv.safetensors" if tag.startswith("hospital_") or tag == "full" else ".safetensors"
        return self.dir / f"split_{split_seed}" / f"train_{train_seed}" / "models" / f"{tag}{suffix}"

    def result(self, step: str) -> Path:
        return self.dir / "results" / f"{step}.csv"

    def read(self, step: str) -> pd.DataFrame:
        p = self.result(step)
        if not p.exists():
            raise DvlibError(f"{p}: result not found; run the step that writes {step!r} first")
        return read_csv(p)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for this process; another process gets a DvlibError at once, not a race."""
        key = str(self.dir.resolve())
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        f = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise DvlibError(f"run {self.name!r} ({self.dir}) is in use by {holder}; wait for it to finish") from None
        f.seek(0)
        f.truncate()
        f.write(f"dvlib pid {os.getpid()}\n")
        f.flush()
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
            f.truncate(0)
            f.close()


def _has_outputs(run_dir: Path) -> bool:
    return any(p.is_dir() for p in run_dir.glob("split_*"))


def _seeds_on_disk(run_dir: Path, pattern: str) -> list[int]:
    return sorted(int(p.name.split("_", 1)[1]) for p in run_dir.glob(pattern) if p.is_dir()
                  and p.name.split("_", 1)[1].isdigit())


def open_run(name: str, preset: str | None = None, *, seeds: Sequence[int] | None = None,
             train_seeds: Sequence[int] | None = None, root: str | os.PathLike | None = None,
             device: str = "auto", overwrite: bool = False, **overrides) -> Run:
    """Open run ``name``, creating it from ``preset`` + ``overrides`` if it does not exist.

    An existing run keeps its settings: a ``preset`` or override given must equal the stored one,
    else the call is refused, unless ``overwrite`` (the run is started afresh) or the run holds no
    output yet (a failed first step never blocks the corrected command). Seeds are replicates, not
    settings: by default those on disk, else split seed 0 and the preset's training seed.
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise DvlibError(f"invalid run name {name!r}: use letters, digits, '-' and '_'")
    root = Path(root) if root else runs_root()
    run_dir, cfg_path = root / name, root / name / "run.json"
    overrides = {k: v for k, v in overrides.items() if v not in (None, "")}
    stored = read_json(cfg_path) if cfg_path.exists() else None
    if stored is None and preset is None:
        raise DvlibError(f"run {name!r} does not exist in {root}; give a preset to create it")
    if stored is not None:
        stored = {k: v for k, v in stored.items() if k not in ("dvlib_version", "provenance")}
    settings = stored
    if preset is not None or overrides:
        base = preset or stored["preset"]
        if stored is not None and base == stored["preset"]:
            kept = {k: v for k, v in stored.items() if k != "preset"}
            wanted = {"preset": base, **get_preset(base, **{**kept, **overrides}).to_dict()}
        else:
            wanted = {"preset": base, **get_preset(base, **overrides).to_dict()}
        wanted.pop("name", None)
        if stored is not None and wanted != stored:
            diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            if _has_outputs(run_dir) and not overwrite:
                raise DvlibError(f"{cfg_path}: run {name!r} exists with other settings ({', '.join(diff)}); choose "
                                 "another run name, or pass overwrite=True (--overwrite) to start it afresh")
            run = Run(name, root, stored, [], [])
            with run.lock():
                for p in run_dir.iterdir():
                    if p.name != ".lock":
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            stored = None
        settings = wanted
    if stored is None:
        from dvlib import __version__

        write_json(cfg_path, {**settings, "dvlib_version": __version__})
    p = get_preset(settings["preset"], **{k: v for k, v in settings.items() if k != "preset"})
    split_seeds = list(seeds) if seeds else (_seeds_on_disk(run_dir, "split_*") or [0])
    first = run_dir / f"split_{split_seeds[0]}"
    train = list(train_seeds) if train_seeds else (_seeds_on_disk(first, "train_*") or [p.seed])
    return Run(name, root, settings, [int(s) for s in split_seeds], [int(t) for t in train], device)
