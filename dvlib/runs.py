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
import functools
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

    @functools.cached_property
    def preset(self) -> Preset:
        """The settings as a Preset, built (and checked) once."""
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
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            f = open(self.dir / ".lock", "a+")
        except OSError as e:
            from dvlib.io import _write_error

            raise _write_error(self.dir / ".lock", e) from None
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


def _check_name(name: str) -> None:
    from dvlib.checks import label_problem

    if not isinstance(name, str) or label_problem(name, "run name") or "/" in name or "\\" in name \
            or name.startswith("."):
        raise DvlibError(f"invalid run name {name!r}: use letters, digits, '-' and '_'")


def _stored_settings(cfg_path: Path) -> dict | None:
    if not cfg_path.exists():
        return None
    stored = read_json(cfg_path)
    if not isinstance(stored, dict) or not isinstance(stored.get("preset"), str):
        raise DvlibError(f"{cfg_path}: not a run's settings (a JSON object with a 'preset'); "
                         "remove the run folder or choose another run name")
    return {k: v for k, v in stored.items() if k not in ("dvlib_version", "provenance")}


def _preset(base: str, where: Path | None, **fields) -> dict:
    """The settings of preset ``base`` with ``fields``, each of the type the preset has (a run.json
    is a file like any other: a field of another type is named, never used)."""
    try:
        ref = get_preset(base)
        for k, v in fields.items():
            want = type(getattr(ref, k, None))
            if not hasattr(ref, k) or v is None:
                continue
            ok = isinstance(v, want) and not (isinstance(v, bool) and want is not bool)
            if want is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok:
                raise DvlibError(f"setting {k!r} must be of type {want.__name__}, got {v!r}")
        return {"preset": base, **get_preset(base, **fields).to_dict()}
    except (TypeError, ValueError) as e:  # a DvlibError too
        raise DvlibError(f"{where}: {e}" if where is not None else str(e)) from None


def _wanted(stored: dict | None, preset: str | None, overrides: dict, cfg_path: Path) -> dict | None:
    """The settings asked for (None: those stored, as nothing was asked)."""
    if preset is None and not overrides:
        return None
    base = preset or stored["preset"]
    if stored is not None and base == stored["preset"]:
        kept = {k: v for k, v in stored.items() if k != "preset"}
        wanted = _preset(base, cfg_path, **{**kept, **overrides})
    else:
        wanted = _preset(base, None, **overrides)
    wanted.pop("name", None)
    return wanted


def open_run(name: str, preset: str | None = None, *, seeds: Sequence[int] | None = None,
             train_seeds: Sequence[int] | None = None, root: str | os.PathLike | None = None,
             device: str = "auto", overwrite: bool = False, step: str | None = None, **overrides) -> Run:
    """Open run ``name``, creating it from ``preset`` + ``overrides`` if it does not exist; ``step``
    (a notebook's name) refuses, in one line saying what to run first, a run without its inputs.

    An existing run keeps its settings: a ``preset`` or override given must equal the stored one,
    else the call is refused, unless ``overwrite`` (the run is started afresh) or the run holds no
    output yet (a failed first step never blocks the corrected command). Seeds are replicates, not
    settings: by default those on disk, else split seed 0 and the preset's training seed. Creating
    or starting afresh happens under the run's lock: never while another command works on it.
    """
    _check_name(name)
    root = Path(root) if root else runs_root()
    run_dir, cfg_path = root / name, root / name / "run.json"
    overrides = {k: v for k, v in overrides.items() if v not in (None, "")}
    stored = _stored_settings(cfg_path)
    if stored is None and preset is None:
        raise DvlibError(f"run {name!r} does not exist in {root}; give a preset to create it")
    wanted = _wanted(stored, preset, overrides, cfg_path)
    if stored is None or (wanted is not None and wanted != stored):
        with Run(name, root, {}, [], []).lock():
            stored = _stored_settings(cfg_path)  # again, now that no other command can change it
            wanted = _wanted(stored, preset, overrides, cfg_path) if stored is not None else wanted
            if stored is not None and wanted is not None and wanted != stored:
                diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
                if _has_outputs(run_dir) and not overwrite:
                    raise DvlibError(f"{cfg_path}: run {name!r} exists with other settings ({', '.join(diff)}); "
                                     "choose another run name, or pass overwrite=True (--overwrite) to start it "
                                     "afresh")
                for p in run_dir.iterdir():
                    if p.name != ".lock":
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                stored = None
            if stored is None:
                from dvlib import __version__

                write_json(cfg_path, {**wanted, "dvlib_version": __version__})
    settings = stored if wanted is None else wanted
    p = _preset(settings["preset"], cfg_path, **{k: v for k, v in settings.items() if k != "preset"})
    split_seeds = list(seeds) if seeds else (_seeds_on_disk(run_dir, "split_*") or [0])
    first = run_dir / f"split_{split_seeds[0]}"
    train = list(train_seeds) if train_seeds else (_seeds_on_disk(first, "train_*") or [p["seed"]])
    run = Run(name, root, settings, [int(s) for s in split_seeds], [int(t) for t in train], device)
    if step is not None:
        from dvlib.step_inputs import require

        require(run, step)
    return run


@contextlib.contextmanager
def using_run(name: str, preset: str | None = None, *, root: str | os.PathLike | None = None,
              **kw) -> Iterator[Run]:
    """:func:`open_run`, and the run's lock held for the whole block (a command): no other command
    can start the run afresh, or work on it, meanwhile. If the block fails (or is interrupted) while
    the run holds no output, the run is left as it was found: a folder this call created is removed,
    a ``run.json`` it wrote is restored."""
    _check_name(name)
    root = Path(root) if root else runs_root()
    run_dir, cfg_path = root / name, root / name / "run.json"
    existed, root_existed, lock_existed = run_dir.exists(), root.exists(), (run_dir / ".lock").exists()
    before = cfg_path.read_bytes() if cfg_path.is_file() else None
    undo = False
    with Run(name, root, {}, [], []).lock():
        try:
            yield open_run(name, preset, root=root, **kw)
        except BaseException:
            undo = not _has_outputs(run_dir)
            if undo and existed:
                if before is None:
                    cfg_path.unlink(missing_ok=True)
                elif not cfg_path.is_file() or cfg_path.read_bytes() != before:
                    from dvlib.io import atomic_path

                    with contextlib.suppress(Exception), atomic_path(cfg_path) as tmp:
                        tmp.write_bytes(before)
            elif undo:
                for p in run_dir.iterdir():
                    if p.name != ".lock":
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                if undo and not lock_existed:
                    (run_dir / ".lock").unlink()
                if undo and not existed:
                    run_dir.rmdir()
                    if not root_existed:
                        root.rmdir()
