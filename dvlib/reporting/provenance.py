"""The run's provenance as a short table for the top of a report (``results/provenance.json``)."""
from __future__ import annotations

import json

import pandas as pd

from dvlib.io import DvlibError
from dvlib.reporting.tables import results_dir

SHOWN = ("python", "dvlib", "torch", "torchvision", "timm", "numpy", "pandas")


def _commit(git: dict) -> str:
    commit = git.get("commit")
    if not commit:
        return "not recorded (the run was made outside a git checkout)"
    if git.get("dirty") is None:
        return commit[:12]
    if not git["dirty"]:
        return f"{commit[:12]} (clean: the commit alone reproduces the code)"
    changed = git.get("changed") or []
    which = f": {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}" if changed else ""
    return (f"{commit[:12]} plus uncommitted changes{which} (the code that ran differed from this commit, so the "
            "commit alone may not reproduce it exactly)")


def provenance_table(results) -> pd.DataFrame:
    """What produced the run's numbers: the data and its fingerprint, the commit (and whether the code
    had uncommitted changes), the device and the library versions. One row per item."""
    path = results_dir(results) / "provenance.json"
    if not path.exists():
        raise DvlibError(f"{path}: no provenance recorded; run notebook 01 (the split step) first")
    try:
        prov = json.loads(path.read_text())
    except ValueError as e:
        raise DvlibError(f"{path}: not valid JSON ({e})") from None
    data = prov.get("dataset") or {}
    rows = {"run": prov.get("run", "-")}
    if data:
        rows["data"] = (f"{data.get('name', '?')}: {data.get('images', '?')} images of {data.get('patients', '?')} "
                        f"patients, sha256 {str(data.get('sha256', ''))[:16]}…")
    rows["commit"] = _commit(prov.get("git") or {})
    devices = {f"{v.get('device')} ({v.get('name', '?')}, {v['threads']} threads)" if v.get("threads")
               else f"{v.get('device')} ({v.get('name', '?')})" for v in (prov.get("steps") or {}).values()
               if v.get("device")}
    if devices:
        rows["device"] = "; ".join(sorted(devices))
    versions = prov.get("versions") or {}
    rows["versions"] = ", ".join(f"{k} {versions[k]}" for k in SHOWN if versions.get(k)) or "-"
    table = pd.DataFrame({"value": list(rows.values())}, index=pd.Index(list(rows), name="provenance"))
    return table
