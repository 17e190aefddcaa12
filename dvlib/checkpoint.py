"""Model checkpoints: ``NAME.safetensors`` (tensors) plus ``NAME.json`` (metadata sidecar).

The sidecar records arch, classes in order, preset, metrics and the sha256 of the pretrained
weights. Both files are written atomically (temp file + rename); loading never unpickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dvlib import __version__
from dvlib.io import DvlibError, atomic_path, read_json, write_json

REQUIRED_META = ("arch", "classes", "pretrained_sha256")


def sidecar(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DvlibError(f"{path}: checkpoints are written as .safetensors")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise DvlibError(f"{path}: checkpoint metadata lacks {missing}")
    meta = {**meta, "dvlib_version": __version__}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"dvlib": json.dumps(meta, default=str)})
    write_json(sidecar(path), meta)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise DvlibError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise DvlibError(f"{path}: only .safetensors checkpoints are loaded (pickle files are refused)")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DvlibError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    side = sidecar(path)
    meta = read_json(side) if side.exists() else None
    if meta is None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("dvlib")
        if raw is None:
            raise DvlibError(f"{path}: no metadata (neither {side.name} nor embedded)")
        meta = json.loads(raw)
    return sd, meta
