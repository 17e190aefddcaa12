"""Model files: one ``.safetensors`` file per model, its metadata inside, written in one rename.

Two kinds, told apart by the ``kind`` field of the metadata JSON (header key ``"dvlib"``):

- a **vector file** (``kind: site_vector``), what a hospital sends: the data vector under
  ``vector/<key>``, the new head under ``head/<key>``, the BatchNorm buffers under ``bn/<key>``;
- a **model file** (``merged``, ``restored``, ``model``): a full state dict under its own keys.

Metadata (checked by :mod:`dvlib.metadata`): ``arch``, ``head``, ``classes`` (in label order),
``pretrained_sha256``, ``weights`` (a name, never a path), ``build_seed``, ``image_size``; vector
files also ``sample_count``. Written
files are read back before the rename, so nothing is ever sent that a reader refuses. Reading
refuses pickles (by suffix and magic bytes), truncated or corrupt files, a newer format, bad
metadata and NaN/Inf, each with a :class:`DvlibError` naming the file and the key. Files are made
``0600``: a model is what was learnt from patients' images (see docs/multi-site.md).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from dvlib.checks import fail, finite_problems
from dvlib.io import DvlibError, atomic_path, sha256_file
from dvlib.metadata import BUILTIN_WEIGHTS, MODEL_KINDS, VECTOR_KIND, meta_problems  # noqa: F401 (re-exported)
from dvlib.models import HEAD_PREFIX
from dvlib.vectors import BN_STAT, COUNTER, HEAD, PARAM, DataVector, kind_by_name

FORMAT_VERSION = 1
META_KEY, ORDER_KEY = "dvlib", "dvlib_order"  # safetensors sorts tensor names; the order is kept apart
PRIVATE_MODE = 0o600
SECTIONS = {"vector": PARAM, "head": HEAD, "bn": BN_STAT}
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tar", ".bin")


@dataclass
class VectorFile:
    """A hospital's data vector as read from its file."""

    tau: DataVector
    meta: dict
    path: Path
    sha256: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def sample_count(self) -> int:
        return int(self.meta["sample_count"])

    @property
    def vector(self) -> dict[str, torch.Tensor]:
        return self.tau.part(PARAM)

    @property
    def head(self) -> dict[str, torch.Tensor]:
        return self.tau.part(HEAD)

    @property
    def bn(self) -> dict[str, torch.Tensor]:
        return self.tau.part(BN_STAT, COUNTER)


@dataclass
class ModelFile:
    state: dict[str, torch.Tensor]
    meta: dict
    path: Path
    sha256: str


def _tensors_for_file(sections: Mapping[str, Mapping[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    out, seen, problems = {}, set(), []
    for prefix, part in sections.items():
        for k, t in part.items():
            name = f"{prefix}/{k}" if prefix else k
            if not isinstance(t, torch.Tensor):
                problems.append(f"{where}: '{name}' is not a tensor ({type(t).__name__})")
                continue
            t = t.detach().cpu().contiguous()
            # safetensors refuses tensors that share, or only partly use, a storage
            if t.untyped_storage().data_ptr() in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            out[name] = t
    problems += finite_problems(out, where, word="")
    fail(problems, f"refusing to write {where}")
    return out


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, reader) -> Path:
    from safetensors.torch import save_file

    from dvlib import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise DvlibError(f"{path}: model files are written as .safetensors")
    meta = {**meta, "format_version": FORMAT_VERSION, "dvlib_version": __version__}
    fail(meta_problems(meta, str(path)), f"refusing to write {path}")
    try:
        meta_json = json.dumps(meta, default=str)
    except (TypeError, ValueError) as e:
        raise DvlibError(f"{path}: metadata is not JSON-serializable ({e})") from None
    with atomic_path(path, suffix=".safetensors", mode=PRIVATE_MODE) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: meta_json, ORDER_KEY: json.dumps(list(tensors))})
        try:  # read back: a file is never renamed into place that a reader would refuse
            reader(tmp)
        except DvlibError as e:
            raise DvlibError(f"{path}: refused on reading it back, nothing was written: "
                             + str(e).replace(str(tmp), str(path))) from None
    return path


def save_vector(path: str | os.PathLike, tau: DataVector, meta: Mapping[str, Any]) -> Path:
    """Write one hospital's data vector (``tau.weight`` must be 1: one model) with its metadata."""
    if tau.weight != 1.0:
        raise DvlibError(f"{path}: a vector file holds one model's data vector (weight 1), not a sum "
                         f"(weight {tau.weight:g})")
    if not tau.params:
        raise DvlibError(f"{path}: the data vector is empty")
    by_kind = {"vector": tau.part(PARAM), "head": tau.part(HEAD), "bn": tau.part(BN_STAT, COUNTER)}
    tensors = _tensors_for_file(by_kind, str(path))
    return _write(path, tensors, {**meta, "kind": VECTOR_KIND}, load_vector)


def save_model(path: str | os.PathLike, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write a full model state dict with its metadata (``kind`` merged, restored or model)."""
    meta = {"kind": "model", **meta}
    if meta["kind"] not in MODEL_KINDS:
        raise DvlibError(f"{path}: kind {meta['kind']!r} is not a model kind ({', '.join(MODEL_KINDS)})")
    return _write(path, _tensors_for_file({"": state}, str(path)), meta, load_model)


def sniff(path: Path) -> None:
    """Refuse pickles and anything that is not a complete safetensors header, by suffix and magic."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DvlibError(f"{path}: pickle files are refused (a {path.suffix} file can run code when loaded); "
                         "dvlib reads .safetensors only")
    if path.is_dir():
        raise DvlibError(f"{path}: is a folder, not a model file")
    if not path.is_file():
        raise DvlibError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise DvlibError(f"{path}: cannot read ({e.strerror or e})") from None
    # a pickle starts with 0x80 (protocol 2+), a torch.save zip with PK; safetensors with an
    # 8-byte header length and then '{'
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise DvlibError(f"{path}: pickle files are refused (this is a pickle/torch.save file, not safetensors)")
    if len(head) < 9:
        raise DvlibError(f"{path}: truncated or corrupt safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > size - 8:
        raise DvlibError(f"{path}: truncated or corrupt safetensors file (header claims {n} bytes, file has {size})")
    if head[8:9] != b"{":
        raise DvlibError(f"{path}: not a safetensors file (bad header)")


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors in written order) of a dvlib file, every check applied."""
    from safetensors import safe_open

    path = Path(path)
    sniff(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            names = list(f.keys())
            try:
                order = json.loads(raw.get(ORDER_KEY, "[]"))
            except (json.JSONDecodeError, RecursionError):
                order = []
            if isinstance(order, list) and sorted(map(str, order)) == sorted(names):
                names = [str(n) for n in order]
            tensors = {n: f.get_tensor(n) for n in names}
    except Exception as e:  # safetensors raises its own types for bad headers and short data
        raise DvlibError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None
    if META_KEY not in raw:
        raise DvlibError(f"{path}: not a dvlib model file (no '{META_KEY}' metadata in its header)")
    try:
        meta = json.loads(raw[META_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        raise DvlibError(f"{path}: corrupt dvlib metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise DvlibError(f"{path}: corrupt dvlib metadata (not a JSON object)")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DvlibError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise DvlibError(f"{path}: format_version {version} is newer than this dvlib reads ({FORMAT_VERSION}); "
                         "upgrade dvlib")
    problems = meta_problems(meta, str(path))
    problems += [f"{path}: '{n}' has dtype {t.dtype}" for n, t in tensors.items()
                 if not (t.is_floating_point() or (n.endswith(".num_batches_tracked") and t.dtype == torch.int64))]
    problems += finite_problems(tensors, str(path), word="")
    fail(problems, f"bad model file {path}")
    return meta, tensors


def load_vector(path: str | os.PathLike) -> VectorFile:
    """A hospital's vector file, checked (see :func:`read`)."""
    path = Path(path)
    meta, tensors = read(path)
    if meta["kind"] != VECTOR_KIND:
        raise DvlibError(f"{path}: a {meta['kind']} model file, not a site's vector file")
    parts, kinds, problems = {}, {}, []
    for name, t in tensors.items():
        section, sep, key = name.partition("/")
        if not sep or section not in SECTIONS or not key:
            problems.append(f"{path}: unexpected tensor '{name}' (expected vector/, head/ or bn/ prefixes)")
            continue
        kind = SECTIONS[section]
        if section == "bn":
            kind = kind_by_name(key)
            if kind not in (BN_STAT, COUNTER):
                problems.append(f"{path}: 'bn/{key}' is not a BatchNorm statistic or counter")
        if key in parts:
            problems.append(f"{path}: '{key}' appears in two sections")
        parts[key], kinds[key] = t, kind
    if PARAM not in kinds.values():
        problems.append(f"{path}: holds no data vector")
    problems += head_problems({k: t for k, t in parts.items() if kinds[k] == HEAD}, meta["classes"], path, "head/")
    fail(problems, f"bad vector file {path}")
    return VectorFile(DataVector(parts, kinds), meta, path, sha256_file(path))


def head_problems(head: Mapping[str, torch.Tensor], classes: list, path, prefix: str = "") -> list[str]:
    """The new head must have one output per class of the metadata."""
    return [f"{path}: '{prefix}{k}' has {t.shape[0] if t.dim() else 0} outputs, but the metadata lists "
            f"{len(classes)} classes" for k, t in head.items()
            if k.startswith(HEAD_PREFIX) and (t.dim() == 0 or t.shape[0] != len(classes))]


def load_model(path: str | os.PathLike) -> ModelFile:
    """A model file's state dict and metadata, checked (see :func:`read`)."""
    path = Path(path)
    meta, tensors = read(path)
    if meta["kind"] == VECTOR_KIND:
        raise DvlibError(f"{path}: a site's vector file, not a model file (merge vector files first)")
    fail(head_problems(tensors, meta["classes"], path), f"bad model file {path}")
    return ModelFile(tensors, meta, path, sha256_file(path))


def is_vector_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dvlib vector file (header only; False for anything unreadable)."""
    from safetensors import safe_open

    try:
        sniff(Path(path))
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get(META_KEY, "{}")).get("kind") == VECTOR_KIND
    except Exception:  # noqa: BLE001 - any unreadable file is "not a vector file"; load_* names why
        return False
