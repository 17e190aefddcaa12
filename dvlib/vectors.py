"""Data vectors (paper sections 3.2-3.4): small pure functions over state dicts.

A state dict is ``dict[str, Tensor]``. Every key has an explicit *kind*:

- ``PARAM``: a pretrained parameter; the only kind that data vectors hold (``tau = theta_i - theta_pre``).
- ``HEAD``: a parameter of the new classification head (no pretrained value; averaged when merging).
- ``BN_STAT``: a BatchNorm ``running_mean`` / ``running_var``.
- ``COUNTER``: ``num_batches_tracked`` (an integer; never averaged as a float).

Kinds come from module types (:func:`key_kinds` with a model) or from key names, never from dtype alone.

Vector files (``.safetensors``, written by :func:`save_vector`) hold a hospital's data vector under
``vector/<key>``, its new head under ``head/<key>`` and its BatchNorm buffers under ``bn/<key>``, plus
a JSON metadata string under the metadata key ``"dvlib"`` (``format_version``, ``arch``, ``classes``,
``sample_count``, ``pretrained_sha256``, ``dvlib_version`` and any extra fields). No pickle, ever.
"""
from __future__ import annotations

import enum
import json
import math
import numbers
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from dvlib.io import DvlibError, atomic_path

StateDict = Mapping[str, torch.Tensor]


class Kind(str, enum.Enum):
    """What a state-dict key is; decides how it is merged."""

    PARAM = "param"
    HEAD = "head"
    BN_STAT = "bn_stat"
    COUNTER = "counter"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


PARAM, HEAD, BN_STAT, COUNTER = Kind.PARAM, Kind.HEAD, Kind.BN_STAT, Kind.COUNTER

BN_STAT_NAMES = ("running_mean", "running_var")
COUNTER_NAME = "num_batches_tracked"
FORMAT_VERSION = 1
META_KEY = "dvlib"
ORDER_KEY = "dvlib_order"  # JSON list of tensor names: safetensors sorts them, state dicts keep order
SECTIONS = ("vector", "head", "bn")
REQUIRED_META = ("arch", "classes", "sample_count", "pretrained_sha256")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tar")

__all__ = [
    "Kind", "PARAM", "HEAD", "BN_STAT", "COUNTER", "key_kinds", "keys_of", "data_vector", "add", "scale",
    "vsum", "layer_norms", "layer_cosine", "apply", "check_compatible", "nonfinite_keys", "save_vector",
    "load_vector", "VectorFile", "check_mergeable", "finetuned_state_dict", "FORMAT_VERSION",
]


# ---------------------------------------------------------------------------------------------- kinds

def _prefixes(head_prefixes: str | Sequence[str]) -> tuple[str, ...]:
    return (head_prefixes,) if isinstance(head_prefixes, str) else tuple(head_prefixes)


def key_kinds(state_dict: StateDict, model: nn.Module | None = None,
              head_prefixes: str | Sequence[str] = ("head.",)) -> dict[str, Kind]:
    """Classify every key of ``state_dict`` (same order) as PARAM, HEAD, BN_STAT or COUNTER.

    With ``model``: from module types (buffers of ``_BatchNorm`` modules are BN_STAT/COUNTER, parameters
    under a head prefix are HEAD, other parameters PARAM; any other buffer is an error). Without: by name
    (``.running_mean``/``.running_var`` -> BN_STAT, ``.num_batches_tracked`` -> COUNTER, head prefix ->
    HEAD, other floating tensors -> PARAM; a non-floating tensor not named as a counter is an error).
    """
    prefixes = _prefixes(head_prefixes)
    problems: list[str] = []
    kinds: dict[str, Kind] = {}
    if model is not None:
        known: dict[str, Kind] = {}
        unknown_buffers: dict[str, str] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            pre = f"{mname}." if mname else ""
            is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
            for pname, _ in mod.named_parameters(recurse=False, remove_duplicate=False):
                key = pre + pname
                known[key] = HEAD if key.startswith(prefixes) else PARAM
            for bname, _ in mod.named_buffers(recurse=False, remove_duplicate=False):
                key = pre + bname
                if is_bn and bname in BN_STAT_NAMES:
                    known[key] = BN_STAT
                elif is_bn and bname == COUNTER_NAME:
                    known[key] = COUNTER
                else:
                    unknown_buffers[key] = type(mod).__name__
        for key in state_dict:
            if key in unknown_buffers:
                problems.append(f"{key}: buffer of {unknown_buffers[key]} is neither a BatchNorm statistic nor "
                                "a counter; dvlib does not know how to merge it")
            elif key not in known:
                problems.append(f"{key}: not a parameter or buffer of {type(model).__name__}")
            else:
                kinds[key] = known[key]
        for key, kind in known.items():
            if key not in state_dict and kind in (PARAM, HEAD):
                problems.append(f"{key}: parameter of {type(model).__name__} missing from the state dict")
    else:
        for key in state_dict:
            kinds[key] = _kind_by_name(key, prefixes)
    for key, kind in kinds.items():
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            problems.append(f"{key}: not a tensor ({type(t).__name__})")
        elif kind != COUNTER and not t.is_floating_point():
            problems.append(f"{key}: {kind.value} tensor has non-floating dtype {t.dtype} "
                            "(integer tensors must be named '*.num_batches_tracked')")
    if problems:
        raise DvlibError("cannot classify state dict keys:\n  - " + "\n  - ".join(problems))
    return kinds


def _kind_by_name(key: str, prefixes: tuple[str, ...]) -> Kind:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in BN_STAT_NAMES:
        return BN_STAT
    if leaf == COUNTER_NAME:
        return COUNTER
    if key.startswith(prefixes):
        return HEAD
    return PARAM


def keys_of(kinds: Mapping[str, Kind], *wanted: Kind) -> list[str]:
    """Keys whose kind is one of ``wanted``, in order."""
    return [k for k, kd in kinds.items() if kd in wanted]


# ---------------------------------------------------------------------------------------- arithmetic

def _require_same_keys(a: StateDict, b: StateDict, what: str) -> None:
    if set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise DvlibError(f"{what}: key sets differ; only in the first: {missing}; only in the second: {extra}")
    bad = [f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}" for k in a if a[k].shape != b[k].shape]
    if bad:
        raise DvlibError(f"{what}: shape mismatch:\n  - " + "\n  - ".join(bad))


@torch.no_grad()
def data_vector(finetuned: StateDict, pretrained: StateDict,
                kinds: Mapping[str, Kind] | None = None) -> dict[str, torch.Tensor]:
    """``tau = theta_i - theta_pre`` over PARAM keys only (heads, BN buffers and counters left out)."""
    kinds = key_kinds(finetuned) if kinds is None else kinds
    keys = keys_of(kinds, PARAM)
    problems = []
    for k in keys:
        if k not in finetuned:
            problems.append(f"{k}: missing from the fine-tuned state dict")
        elif k not in pretrained:
            problems.append(f"{k}: missing from the pretrained state dict")
        elif finetuned[k].shape != pretrained[k].shape:
            problems.append(f"{k}: fine-tuned shape {tuple(finetuned[k].shape)} != pretrained "
                            f"{tuple(pretrained[k].shape)}")
        elif finetuned[k].dtype != pretrained[k].dtype:
            problems.append(f"{k}: fine-tuned dtype {finetuned[k].dtype} != pretrained {pretrained[k].dtype}")
    if problems:
        raise DvlibError("cannot compute the data vector:\n  - " + "\n  - ".join(problems))
    if not keys:
        return {}
    diff = torch._foreach_sub([finetuned[k].detach() for k in keys], [pretrained[k].detach() for k in keys])
    return dict(zip(keys, diff))


@torch.no_grad()
def add(a: StateDict, b: StateDict) -> dict[str, torch.Tensor]:
    """Key-wise ``a + b`` (same keys and shapes required)."""
    _require_same_keys(a, b, "add")
    keys = list(a)
    return dict(zip(keys, torch._foreach_add([a[k] for k in keys], [b[k] for k in keys]))) if keys else {}


@torch.no_grad()
def scale(vector: StateDict, factor: float) -> dict[str, torch.Tensor]:
    """Key-wise ``factor * vector``."""
    _check_finite_number(factor, "scale factor")
    keys = list(vector)
    return dict(zip(keys, torch._foreach_mul([vector[k] for k in keys], float(factor)))) if keys else {}


@torch.no_grad()
def vsum(vectors: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """Key-wise sum of one or more vectors."""
    vectors = list(vectors)
    if not vectors:
        raise DvlibError("vsum: need at least one vector")
    keys = list(vectors[0])
    if len(vectors) == 1:
        return {k: vectors[0][k].clone() for k in keys}
    for i, v in enumerate(vectors[1:], 1):
        _require_same_keys(vectors[0], v, f"vsum (vector 0 vs vector {i})")
    acc = torch._foreach_add([vectors[0][k] for k in keys], [vectors[1][k] for k in keys])
    for v in vectors[2:]:
        torch._foreach_add_(acc, [v[k] for k in keys])
    return dict(zip(keys, acc))


@torch.no_grad()
def layer_norms(vector: StateDict) -> dict[str, float]:
    """Per-key L2 norm, accumulated in float64."""
    return {k: float(torch.linalg.vector_norm(t, dtype=torch.float64)) for k, t in vector.items()}


@torch.no_grad()
def layer_cosine(a: StateDict, b: StateDict) -> dict[str, float]:
    """Per-key cosine similarity in float64; ``nan`` where either side is all zeros."""
    _require_same_keys(a, b, "layer_cosine")
    out = {}
    for k in a:
        x, y = a[k].reshape(-1).double(), b[k].reshape(-1).double()
        den = float(torch.linalg.vector_norm(x)) * float(torch.linalg.vector_norm(y))
        out[k] = float(torch.dot(x, y)) / den if den > 0 else math.nan
    return out


@torch.no_grad()
def apply(pretrained: StateDict, vector: StateDict, lam: float = 1.0,
          kinds: Mapping[str, Kind] | None = None) -> dict[str, torch.Tensor]:
    """Full state dict: PARAM keys ``pre + lam * vector``, every other key copied from ``pretrained``."""
    _check_finite_number(lam, "lam")
    kinds = key_kinds(pretrained) if kinds is None else kinds
    params = keys_of(kinds, PARAM)
    problems = [f"{k}: PARAM key missing from the vector" for k in params if k not in vector]
    problems += [f"{k}: in the vector but not a PARAM key of the pretrained state dict"
                 for k in vector if kinds.get(k) != PARAM]
    problems += [f"{k}: vector shape {tuple(vector[k].shape)} != pretrained {tuple(pretrained[k].shape)}"
                 for k in params if k in vector and vector[k].shape != pretrained[k].shape]
    if problems:
        raise DvlibError("cannot apply the vector:\n  - " + "\n  - ".join(problems))
    out = {}
    for k, t in pretrained.items():
        t = t.detach()
        out[k] = torch.add(t, vector[k].to(t.dtype), alpha=float(lam)) if kinds[k] == PARAM else t.clone()
    return out


def finetuned_state_dict(pretrained: StateDict, vf: "VectorFile") -> dict[str, torch.Tensor]:
    """Rebuild a hospital's full state dict from a vector file: ``pre + tau``, its head, its BN buffers
    (pretrained key order; the file's head replaces any head in ``pretrained``)."""
    kinds = key_kinds(pretrained)
    body_kinds = {k: kd for k, kd in kinds.items() if kd != HEAD}
    body = apply({k: pretrained[k] for k in body_kinds}, vf.vector, kinds=body_kinds)
    problems = [f"{vf.path}: BatchNorm buffer '{k}' missing" for k in keys_of(kinds, BN_STAT, COUNTER)
                if k not in vf.bn]
    problems += [f"{vf.path}: BatchNorm buffer '{k}' is not in the pretrained state dict" for k in vf.bn
                 if kinds.get(k) not in (BN_STAT, COUNTER)]
    problems += [f"{vf.path}: '{k}' has shape {tuple(vf.bn[k].shape)}, pretrained has "
                 f"{tuple(pretrained[k].shape)}" for k in vf.bn if k in pretrained
                 and vf.bn[k].shape != pretrained[k].shape]
    if problems:
        raise DvlibError("cannot rebuild the fine-tuned state dict:\n  - " + "\n  - ".join(problems))
    out: dict[str, torch.Tensor] = {}
    for k in pretrained:
        if kinds[k] == HEAD:
            if k in vf.head:
                out[k] = vf.head[k].clone()
        elif k in vf.bn:
            out[k] = vf.bn[k].clone()
        else:
            out[k] = body[k]
    out.update({k: t.clone() for k, t in vf.head.items() if k not in out})
    return out


def _check_finite_number(x: Any, what: str) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise DvlibError(f"{what} must be a finite number, got {x!r}")


# ---------------------------------------------------------------------------------------- validation

@torch.no_grad()
def nonfinite_keys(state_dict: StateDict) -> dict[str, str]:
    """``{key: "3 NaN, 1 Inf"}`` for floating tensors holding NaN/Inf (fast float64-sum screen first)."""
    keys = [k for k, t in state_dict.items() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not keys:
        return {}
    sums = torch.stack([state_dict[k].detach().sum(dtype=torch.float64).cpu() for k in keys])
    out = {}
    for k, ok in zip(keys, torch.isfinite(sums).tolist()):
        if ok:  # a float64 sum of finite float32/16 values cannot overflow, so this is exact
            continue
        t = state_dict[k].detach()
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if n_nan or n_inf:  # float64 tensors can overflow the screen without holding NaN/Inf
            out[k] = ", ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if s)
    return out


def _compat_problems(state_dicts: Sequence[StateDict], names: Sequence[str], check_finite: bool = True,
                     skip: frozenset[str] = frozenset()) -> list[str]:
    """Every mismatch against the first state dict, and every NaN/Inf, as readable lines."""
    problems: list[str] = []
    ref, ref_name = state_dicts[0], names[0]
    for sd, name in zip(state_dicts, names):
        bad = [k for k, t in sd.items() if not isinstance(t, torch.Tensor)]
        problems += [f"{name}: key '{k}' is not a tensor ({type(sd[k]).__name__})" for k in bad]
        if sd is not ref:
            problems += [f"{name}: missing key '{k}' (present in {ref_name})" for k in ref
                         if k not in sd and k not in skip]
            problems += [f"{name}: extra key '{k}' (not in {ref_name})" for k in sd if k not in ref and k not in skip]
            for k, t in sd.items():
                r = ref.get(k)
                if k in skip or k in bad or not isinstance(r, torch.Tensor):
                    continue
                if t.shape != r.shape:
                    problems.append(f"{name}: key '{k}' has shape {tuple(t.shape)}, {ref_name} has {tuple(r.shape)}")
                if t.dtype != r.dtype:
                    problems.append(f"{name}: key '{k}' has dtype {t.dtype}, {ref_name} has {r.dtype}")
        if check_finite:
            tensors = {k: t for k, t in sd.items() if k not in bad and k not in skip}
            problems += [f"{name}: key '{k}' holds {what}" for k, what in nonfinite_keys(tensors).items()]
    return problems


def check_compatible(state_dicts: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise one :class:`DvlibError` listing every problem: missing/extra keys, shape or dtype mismatch
    (against the first state dict), NaN/Inf; each line names the state dict (``names``) and the key."""
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise DvlibError("check_compatible: no state dicts given")
    names = [f"state_dict[{i}]" for i in range(len(state_dicts))] if names is None else [str(n) for n in names]
    if len(names) != len(state_dicts):
        raise DvlibError(f"check_compatible: {len(names)} names for {len(state_dicts)} state dicts")
    problems = _compat_problems(state_dicts, names)
    if problems:
        raise DvlibError(f"incompatible state dicts ({len(problems)} problems):\n  - " + "\n  - ".join(problems))


# -------------------------------------------------------------------------------------- vector files

@dataclass
class VectorFile:
    """A loaded vector file: data vector (PARAM keys), new head, BatchNorm buffers, metadata."""

    vector: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    bn: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def sample_count(self) -> int:
        return int(self.meta["sample_count"])


def _validate_meta(meta: Mapping[str, Any], where: str) -> list[str]:
    problems = [f"{where}: metadata lacks '{k}'" for k in REQUIRED_META if k not in meta]
    classes = meta.get("classes")
    if "classes" in meta and (not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes)):
        problems.append(f"{where}: metadata 'classes' must be a list of class names, got {classes!r}")
    n = meta.get("sample_count")
    if "sample_count" in meta and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        problems.append(f"{where}: metadata 'sample_count' must be an integer >= 0, got {n!r}")
    sha = meta.get("pretrained_sha256")
    if "pretrained_sha256" in meta and not isinstance(sha, str):
        problems.append(f"{where}: metadata 'pretrained_sha256' must be a string, got {sha!r}")
    return problems


def save_vector(path: str | os.PathLike, vector: StateDict, head: StateDict, bn: StateDict,
                meta: Mapping[str, Any]) -> Path:
    """Write a vector file atomically (``.safetensors``; nothing is written if any check fails).

    ``meta`` needs ``arch``, ``classes`` (in label order), ``sample_count``, ``pretrained_sha256``; extra
    JSON-serializable fields are kept. ``format_version`` and ``dvlib_version`` are added.
    """
    from safetensors.torch import save_file

    from dvlib import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise DvlibError(f"{path}: vector files must end in .safetensors")
    problems = _validate_meta(meta, str(path))
    if not vector:
        problems.append(f"{path}: the data vector is empty")
    full_meta = {**dict(meta), "format_version": FORMAT_VERSION, "dvlib_version": __version__}
    if "classes" in full_meta and isinstance(full_meta["classes"], tuple):
        full_meta["classes"] = list(full_meta["classes"])
    try:
        meta_json = json.dumps(full_meta)
    except (TypeError, ValueError) as e:
        problems.append(f"{path}: metadata is not JSON-serializable ({e})")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # safetensors refuses tensors that share or only partly use a storage
    for section, sd in zip(SECTIONS, (vector, head, bn)):
        for k, t in sd.items():
            name = f"{section}/{k}"
            if not isinstance(t, torch.Tensor):
                problems.append(f"{path}: '{name}' is not a tensor ({type(t).__name__})")
                continue
            t = t.detach().cpu().contiguous()
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
    problems += [f"{path}: '{k}' holds {what}" for k, what in nonfinite_keys(tensors).items()]
    if problems:
        raise DvlibError("refusing to write the vector file:\n  - " + "\n  - ".join(problems))
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: meta_json, ORDER_KEY: json.dumps(list(tensors))})
    return path


def _sniff(path: Path) -> None:
    """Refuse pickles and anything that is not a complete safetensors header, by magic bytes."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DvlibError(f"{path}: pickle files are refused (a {path.suffix} checkpoint can run code when "
                         "loaded); vector files are .safetensors")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    # a pickle starts with 0x80 (protocol 2+), a torch.save zip with PK; a safetensors file starts
    # with its 8-byte header length (any first byte) followed by '{'
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise DvlibError(f"{path}: pickle files are refused (this is a pickle/torch.save file, not safetensors)")
    if len(head) < 9:
        raise DvlibError(f"{path}: truncated or corrupt safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > size - 8:
        raise DvlibError(f"{path}: truncated or corrupt safetensors file (header claims {n} bytes, "
                         f"file has {size})")
    if head[8:9] != b"{":
        raise DvlibError(f"{path}: not a safetensors file (bad header)")


def load_vector(path: str | os.PathLike) -> VectorFile:
    """Read and check a vector file written by :func:`save_vector`.

    Refuses pickles (.pt/.pth or pickle magic bytes), truncated/corrupt files, a newer ``format_version``,
    missing metadata and NaN/Inf values, each with a :class:`DvlibError` naming the file (and key).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DvlibError(f"{path}: vector file not found")
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            names = list(f.keys())
            try:
                order = json.loads(raw_meta.get(ORDER_KEY, "[]"))
            except json.JSONDecodeError:
                order = []
            if isinstance(order, list) and sorted(map(str, order)) == sorted(names):
                names = [str(n) for n in order]
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as e:  # safetensors raises its own error types for bad headers / short data
        raise DvlibError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from e
    if META_KEY not in raw_meta:
        raise DvlibError(f"{path}: not a dvlib vector file (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw_meta[META_KEY])
    except json.JSONDecodeError as e:
        raise DvlibError(f"{path}: corrupt dvlib metadata ({e})") from e
    if not isinstance(meta, dict):
        raise DvlibError(f"{path}: corrupt dvlib metadata (not a JSON object)")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DvlibError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise DvlibError(f"{path}: format_version {version} is newer than this dvlib reads "
                         f"({FORMAT_VERSION}); upgrade dvlib")
    problems = _validate_meta(meta, str(path))
    sections: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SECTIONS}
    for name, t in tensors.items():
        section, sep, key = name.partition("/")
        if not sep or section not in sections or not key:
            problems.append(f"{path}: unexpected tensor '{name}' (expected vector/, head/ or bn/ prefixes)")
        else:
            sections[section][key] = t
    problems += [f"{path}: '{k}' holds {what}" for k, what in nonfinite_keys(tensors).items()]
    if not sections["vector"]:
        problems.append(f"{path}: holds no data vector")
    if problems:
        raise DvlibError("bad vector file:\n  - " + "\n  - ".join(problems))
    return VectorFile(sections["vector"], sections["head"], sections["bn"], meta, path)


def check_mergeable(vector_files: Sequence[VectorFile]) -> None:
    """Raise one :class:`DvlibError` listing every reason the files cannot be merged together:
    fewer than 2 files, different pretrained weights, arch, classes or class order, keys/shapes/dtypes."""
    vfs = list(vector_files)
    if len(vfs) < 2:
        raise DvlibError(f"need at least 2 vector files to merge, got {len(vfs)}: "
                         f"{[str(v.path) for v in vfs]}")
    ref = vfs[0]
    names = [str(v.path) for v in vfs]
    problems: list[str] = []
    for vf, name in zip(vfs[1:], names[1:]):
        if vf.meta.get("pretrained_sha256") != ref.meta.get("pretrained_sha256"):
            problems.append(f"{name}: pretrained_sha256 {vf.meta.get('pretrained_sha256')} differs from "
                            f"{names[0]} ({ref.meta.get('pretrained_sha256')}): fine-tuned from other weights")
        if vf.meta.get("arch") != ref.meta.get("arch"):
            problems.append(f"{name}: arch {vf.meta.get('arch')!r} differs from {names[0]} "
                            f"({ref.meta.get('arch')!r})")
        a, b = list(vf.meta.get("classes", [])), list(ref.meta.get("classes", []))
        if a != b:
            how = "the same classes in a different order" if sorted(a) == sorted(b) else "different classes"
            problems.append(f"{name}: {how}: {a} vs {b} in {names[0]}")
    for section in SECTIONS:
        problems += _compat_problems([getattr(v, section) for v in vfs], [f"{n} [{section}]" for n in names],
                                     check_finite=False)
    if problems:
        raise DvlibError(f"vector files cannot be merged ({len(problems)} problems):\n  - " + "\n  - ".join(problems))
