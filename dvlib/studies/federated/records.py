"""What travels in a Flower message: dvlib's tensors and metadata as Flower records, and their size.

Tensors go in an ``ArrayRecord`` (numpy ``.npy`` bytes, lossless; dtypes and key order kept).
A hospital's data vector travels as its vector file holds it: the movement under ``vector/<key>``,
the new head under ``head/<key>``, BatchNorm statistics and counters under ``bn/<key>``
(:mod:`dvlib.files`). Metadata (JSON, as in a file header) goes in a ``ConfigRecord``.

Bytes are :meth:`ArrayRecord.count_bytes`: the serialized arrays (data plus a ~128-byte ``.npy``
header each) and the key names, i.e. the payload of a message; message headers and the few-kB
metadata are not counted.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from dvlib.files import SECTIONS
from dvlib.vectors import BN_STAT, COUNTER, HEAD, PARAM, DataVector, kind_by_name

SECTION_OF = {PARAM: "vector", HEAD: "head", BN_STAT: "bn", COUNTER: "bn"}


def tensors_record(tensors: Mapping[str, torch.Tensor], keys=None) -> ArrayRecord:
    """An ``ArrayRecord`` of ``tensors`` (only ``keys``, in that order, if given)."""
    keys = list(tensors) if keys is None else list(keys)
    return ArrayRecord({k: Array(tensors[k].detach().cpu().contiguous().numpy()) for k in keys})


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ``ArrayRecord``, in its order."""
    return dict(record.to_torch_state_dict())


def vector_record(tau: DataVector) -> ArrayRecord:
    """A hospital's data vector, sectioned as in its vector file."""
    return ArrayRecord({f"{SECTION_OF[tau.kinds[k]]}/{k}": Array(t.detach().cpu().contiguous().numpy())
                        for k, t in tau.tensors.items()})


def record_vector(record: ArrayRecord) -> DataVector:
    """The data vector of :func:`vector_record` (kinds from the sections, as :func:`dvlib.files.load_vector`)."""
    tensors, kinds = {}, {}
    for name, t in record_tensors(record).items():
        section, _, key = name.partition("/")
        kind = SECTIONS[section]
        kinds[key] = kind_by_name(key) if section == "bn" else kind
        tensors[key] = t
    return DataVector(tensors, kinds)


def state_bytes(tensors: Mapping[str, torch.Tensor], keys=None) -> int:
    """The bytes an ``ArrayRecord`` of these tensors counts (see the module docstring)."""
    return tensors_record(tensors, keys).count_bytes()


def vector_bytes(tau: DataVector) -> int:
    return vector_record(tau).count_bytes()


def json_record(**values) -> ConfigRecord:
    """A ``ConfigRecord`` whose entries are scalars, or JSON text for anything nested."""
    out = {}
    for k, v in values.items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
    return ConfigRecord(out)
