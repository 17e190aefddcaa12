"""What produced a run's numbers: library versions, the commit, the device, data fingerprints.

Written by the steps into ``<run>/results/provenance.json`` (published beside the reports), so that
the bit-for-bit promise on a CPU can be checked: same versions, same commit, same data, same split.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import subprocess
import sys
from importlib import metadata

from dvlib.io import read_json, sha256_file, write_json

PACKAGES = ("dvlib", "torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "safetensors", "pillow")


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


OUTPUTS = ("reports", "figures", "data/splits")  # what the chain itself writes into the checkout


def git_state(root) -> dict:
    """The commit, and whether tracked files other than the chain's own outputs (:data:`OUTPUTS`)
    differ from it, with the first of them (None outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      *(f":(exclude){o}" for o in OUTPUTS)).stdout.splitlines()
        return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed": [c[3:] for c in changed[:20]]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info(device) -> dict:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return {"device": str(dev), "name": torch.cuda.get_device_name(dev), "cuda": torch.version.cuda}
    return {"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def dataset_fingerprint(index) -> dict:
    """sha256 of the sorted (image, patient, label) list: the same images, patients and labels."""
    rows = sorted(zip(index.records["image"], index.records["patient"], index.records["label"]))
    h = hashlib.sha256("\n".join("|".join(map(str, r)) for r in rows).encode()).hexdigest()
    return {"name": index.name, "images": len(rows), "patients": int(index.records["patient"].nunique()), "sha256": h}


def record(run, step: str, device=None, index=None) -> dict:
    """Add this step's entry (time, device) to the run's provenance, refreshing versions and data."""
    from dvlib.runs import project_root

    path = run.dir / "results" / "provenance.json"
    prov = read_json(path) if path.exists() else {}
    git = git_state(project_root())
    prov.update(run=run.name, settings=run.settings, versions=versions(), git=git)
    if index is not None:
        prov["dataset"] = dataset_fingerprint(index)
    prov["manifests"] = {str(s): sha256_file(run.manifest_path(s)) for s in run.split_seeds
                         if run.manifest_path(s).exists()}
    steps = prov.setdefault("steps", {})
    steps[step] = {"utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git": git,
                   **(device_info(device) if device is not None else {})}
    write_json(path, prov)
    return prov
