"""Data vectors (paper sections 3.2-3.4) as one small value type.

``DataVector.between(theta_i, theta_pre)`` is a hospital's ``tau_i = theta_i - theta_pre``; ``+``,
scalar ``*`` and ``sum()`` make the paper's merge plain Python::

    theta_mix = (lam * sum(taus)).apply_to(theta_pre)

Every state-dict key has an explicit :class:`Kind` (from module types or key names, never from
dtype alone), and the kind decides what arithmetic means for it:

- ``PARAM``, a pretrained parameter: the vector holds the movement ``theta - theta_pre``; ``+`` adds
  movements and ``lam * v`` scales them.
- ``HEAD`` (the new classification head) and ``BN_STAT`` (BatchNorm running statistics) have no
  pretrained value to move from (or, for BN statistics, should not be extrapolated: see
  docs/method.md): the vector carries them as a weighted mean over the models it sums, so
  ``sum(taus)`` averages the heads, as the paper does. ``lam * v`` leaves them alone;
  ``v.weighted(w)`` counts a model ``w`` times in every kind.
- ``COUNTER`` (``num_batches_tracked``): the largest over the models summed.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from dvlib.checks import StateDict, fail, finite_number, finite_problems, layout_problems
from dvlib.io import DvlibError
from dvlib.models import HEAD_PREFIX

BN_STAT_NAMES = ("running_mean", "running_var")
COUNTER_NAME = "num_batches_tracked"


class Kind(str, enum.Enum):
    """What a state-dict key is; decides how it is merged."""

    PARAM = "param"
    HEAD = "head"
    BN_STAT = "bn_stat"
    COUNTER = "counter"


PARAM, HEAD, BN_STAT, COUNTER = Kind.PARAM, Kind.HEAD, Kind.BN_STAT, Kind.COUNTER
CARRIED = (HEAD, BN_STAT)  # kinds averaged over the models summed


def kind_by_name(key: str, head_prefixes: Sequence[str] = (HEAD_PREFIX,)) -> Kind:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in BN_STAT_NAMES:
        return BN_STAT
    if leaf == COUNTER_NAME:
        return COUNTER
    return HEAD if key.startswith(tuple(head_prefixes)) else PARAM


def key_kinds(state_dict: StateDict, model: nn.Module | None = None,
              head_prefixes: str | Sequence[str] = (HEAD_PREFIX,)) -> dict[str, Kind]:
    """Kind of every key of ``state_dict`` (same order), from ``model``'s module types when given
    (a buffer that is not a BatchNorm statistic or counter is an error), else from key names."""
    prefixes = (head_prefixes,) if isinstance(head_prefixes, str) else tuple(head_prefixes)
    problems: list[str] = []
    if model is None:
        kinds = {k: kind_by_name(k, prefixes) for k in state_dict}
    else:
        known, strange = {}, {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            pre = f"{mname}." if mname else ""
            is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
            for pname, _ in mod.named_parameters(recurse=False, remove_duplicate=False):
                known[pre + pname] = HEAD if (pre + pname).startswith(prefixes) else PARAM
            for bname, _ in mod.named_buffers(recurse=False, remove_duplicate=False):
                if is_bn and bname in BN_STAT_NAMES + (COUNTER_NAME,):
                    known[pre + bname] = COUNTER if bname == COUNTER_NAME else BN_STAT
                else:
                    strange[pre + bname] = type(mod).__name__
        kinds = {}
        for key in state_dict:
            if key in strange:
                problems.append(f"{key}: buffer of {strange[key]} is neither a BatchNorm statistic nor a "
                                "counter; dvlib does not know how to merge it")
            elif key not in known:
                problems.append(f"{key}: not a parameter or buffer of {type(model).__name__}")
            else:
                kinds[key] = known[key]
        problems += [f"{k}: parameter of {type(model).__name__} missing from the state dict"
                     for k, kd in known.items() if k not in state_dict and kd in (PARAM, HEAD)]
    for key, kind in kinds.items():
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            problems.append(f"{key}: not a tensor ({type(t).__name__})")
        elif kind != COUNTER and not t.is_floating_point():
            problems.append(f"{key}: {kind.value} tensor has non-floating dtype {t.dtype} "
                            "(integer tensors must be named '*.num_batches_tracked')")
    fail(problems, "cannot classify state dict keys")
    return kinds


def keys_of(kinds: Mapping[str, Kind], *wanted: Kind) -> list[str]:
    """Keys whose kind is one of ``wanted``, in order."""
    return [k for k, kd in kinds.items() if kd in wanted]


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype fit for accumulation (half types upcast; no copy for float32/64)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) or not t.is_floating_point() else t.float()


class DataVector:
    """A weighted sum of models' movements from the pretrained weights (see the module docstring).

    ``tensors``: per key, the movement (PARAM), the weighted *sum* of carried values (HEAD, BN_STAT;
    their mean is that sum divided by ``weight``) or the counter (COUNTER). One model: ``weight`` 1.
    """

    __slots__ = ("tensors", "kinds", "weight")

    def __init__(self, tensors: Mapping[str, torch.Tensor], kinds: Mapping[str, Kind], weight: float = 1.0):
        fail([f"'{k}': no kind given" for k in tensors if k not in kinds]
             + [f"'{k}': kind given but no tensor" for k in kinds if k not in tensors], "bad data vector")
        self.tensors = {k: t.detach() for k, t in tensors.items()}  # as given; arithmetic upcasts half types
        self.kinds = {k: Kind(kinds[k]) for k in tensors}
        self.weight = float(weight)

    @classmethod
    @torch.no_grad()
    def between(cls, finetuned: StateDict, pretrained: StateDict,
                kinds: Mapping[str, Kind] | None = None) -> "DataVector":
        """``tau = theta_i - theta_pre`` for PARAM keys; heads, BN statistics, counters carried."""
        kinds = key_kinds(finetuned) if kinds is None else kinds
        params = keys_of(kinds, PARAM)
        problems = [f"'{k}': missing from the pretrained state dict" for k in params if k not in pretrained]
        problems += [f"'{k}': fine-tuned {tuple(finetuned[k].shape)}/{finetuned[k].dtype} vs pretrained "
                     f"{tuple(pretrained[k].shape)}/{pretrained[k].dtype}" for k in params if k in pretrained
                     and (finetuned[k].shape != pretrained[k].shape or finetuned[k].dtype != pretrained[k].dtype)]
        fail(problems, "cannot compute the data vector")
        return cls._difference(finetuned, pretrained, kinds)

    @classmethod
    def _difference(cls, finetuned: StateDict, pretrained: StateDict, kinds: Mapping[str, Kind]) -> "DataVector":
        out = {k: (torch.sub(_work(finetuned[k]), _work(pretrained[k])) if kd == PARAM else finetuned[k].detach())
               for k, kd in kinds.items()}
        return cls(out, kinds)

    @classmethod
    @torch.no_grad()
    def from_models(cls, finetuned: Sequence[StateDict], pretrained: StateDict,
                    names: Sequence[str] | None = None) -> list["DataVector"]:
        """Each fine-tuned model's ``tau_i`` (kinds from the first model's key names). One
        DvlibError lists every key, shape, dtype and NaN/Inf, model by model (``names``), that keeps
        them from being merged; the pretrained state dict needs no head (a new head has no
        pretrained value)."""
        if isinstance(finetuned, Mapping):
            raise DvlibError("finetuned must be a list of state dicts, got a single state dict")
        finetuned = list(finetuned)
        names = [f"finetuned[{i}]" for i in range(len(finetuned))] if names is None else [str(n) for n in names]
        if not finetuned:
            raise DvlibError("need at least 1 fine-tuned state dict, got 0")
        if len(names) != len(finetuned):
            raise DvlibError(f"names: {len(names)} names for {len(finetuned)} fine-tuned state dicts")
        kinds = key_kinds(finetuned[0])
        problems = layout_problems(finetuned, names)
        problems += [line for ft, n in zip(finetuned, names) for line in finite_problems(ft, n)]
        problems += layout_problems([{k: v for k, v in finetuned[0].items() if kinds[k] != HEAD},
                                     {k: v for k, v in pretrained.items() if kinds.get(k) != HEAD}],
                                    [names[0], "pretrained"])
        fail(problems, "cannot merge")
        return [cls._difference(ft, pretrained, kinds) for ft in finetuned]

    # --- what it holds -------------------------------------------------------------------------
    def part(self, *kinds: Kind) -> dict[str, torch.Tensor]:
        """The tensors of some kinds; carried kinds as their mean."""
        return {k: (t / self.weight if self.kinds[k] in CARRIED and self.weight != 1 else t)
                for k, t in self.tensors.items() if self.kinds[k] in kinds}

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The movement of every pretrained parameter: ``tau``."""
        return self.part(PARAM)

    def __repr__(self) -> str:
        n = {kd.value: len(keys_of(self.kinds, kd)) for kd in Kind}
        return f"DataVector({n}, weight={self.weight:g})"

    # --- arithmetic ----------------------------------------------------------------------------
    def _check_same_layout(self, other: "DataVector") -> None:
        if not isinstance(other, DataVector):
            raise TypeError(f"cannot add a DataVector and a {type(other).__name__}")
        problems = layout_problems([self.tensors, other.tensors], ["left", "right"])
        problems += [f"'{k}': {self.kinds[k].value} on the left, {other.kinds[k].value} on the right"
                     for k in self.kinds if k in other.kinds and self.kinds[k] != other.kinds[k]]
        fail(problems, "data vectors of different models")

    @torch.no_grad()
    def __add__(self, other: "DataVector") -> "DataVector":
        self._check_same_layout(other)
        out = {k: (torch.maximum(t, other.tensors[k]) if self.kinds[k] == COUNTER else _work(t) + _work(other.tensors[k]))
               for k, t in self.tensors.items()}
        return DataVector(out, self.kinds, self.weight + other.weight)

    def __radd__(self, other) -> "DataVector":
        if isinstance(other, (int, float)) and other == 0:  # sum() starts from 0
            return self
        return self.__add__(other)

    @torch.no_grad()
    def __mul__(self, lam: float) -> "DataVector":
        """Scale the movement (PARAM keys) by ``lam``: the paper's lambda."""
        lam = finite_number(lam, "scaling factor")
        return DataVector({k: _work(t) * lam if self.kinds[k] == PARAM else t for k, t in self.tensors.items()},
                          self.kinds, self.weight)

    __rmul__ = __mul__

    @torch.no_grad()
    def weighted(self, w: float) -> "DataVector":
        """This vector counted ``w`` times in a sum (movement and carried values), e.g. by sample count."""
        w = finite_number(w, "weight", low=0.0)
        return DataVector({k: t if self.kinds[k] == COUNTER else _work(t) * w for k, t in self.tensors.items()},
                          self.kinds, self.weight * w)

    @torch.no_grad()
    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "DataVector":
        """A copy with every movement replaced by ``fn(key, tau)`` (random vectors, DARE's drop)."""
        return DataVector({k: fn(k, _work(t)) if self.kinds[k] == PARAM else t for k, t in self.tensors.items()},
                          self.kinds, self.weight)

    def with_params(self, params: Mapping[str, torch.Tensor]) -> "DataVector":
        """A copy whose movements are ``params`` (every PARAM key, same shapes)."""
        fail([f"'{k}': missing or of another shape" for k in keys_of(self.kinds, PARAM)
              if k not in params or params[k].shape != self.tensors[k].shape], "bad movement")
        return DataVector({k: params[k] if self.kinds[k] == PARAM else t for k, t in self.tensors.items()},
                          self.kinds, self.weight)

    @torch.no_grad()
    def with_bn_moved(self, pretrained: StateDict) -> "DataVector":
        """BN statistics treated like weights (``bn_i - bn_pre``, then scaled): the failure case of
        ``bn_buffers="arithmetic"``, kept to show why the statistics must be restored instead."""
        fail([f"'{k}': a BatchNorm statistic with no pretrained value of its shape" for k, kd in self.kinds.items()
              if kd == BN_STAT and (k not in pretrained or pretrained[k].shape != self.tensors[k].shape)],
             "cannot move the BatchNorm statistics")
        kinds = {k: PARAM if kd == BN_STAT else kd for k, kd in self.kinds.items()}
        out = {k: _work(t) / self.weight - _work(pretrained[k]) if self.kinds[k] == BN_STAT else t
               for k, t in self.tensors.items()}
        return DataVector(out, kinds, self.weight)

    @torch.no_grad()
    def apply_to(self, pretrained: StateDict) -> dict[str, torch.Tensor]:
        """The full state dict: ``theta_pre + tau`` for PARAM keys (in the pretrained dtype), the
        carried means, the counters; pretrained key order, then any head key it lacks."""
        problems = [f"'{k}': in the pretrained state dict but not in the vector" for k in pretrained
                    if k not in self.tensors]
        problems += [f"'{k}': a parameter movement with no pretrained value" for k in keys_of(self.kinds, PARAM)
                     if k not in pretrained]
        problems += [f"'{k}': vector {tuple(self.tensors[k].shape)} vs pretrained {tuple(pretrained[k].shape)}"
                     for k in self.tensors if k in pretrained and self.tensors[k].shape != pretrained[k].shape]
        fail(problems, "cannot apply the data vector")
        if self.weight <= 0 and any(kd in CARRIED for kd in self.kinds.values()):
            fail(["the weights of the models summed add up to 0: heads and BN statistics have no mean"],
                 "cannot apply the data vector")
        out = {}
        for k in list(pretrained) + [k for k in self.tensors if k not in pretrained]:
            t, kind = self.tensors[k], self.kinds[k]
            dtype = pretrained[k].dtype if k in pretrained else t.dtype
            if kind == PARAM:
                out[k] = torch.add(_work(pretrained[k]), t).to(dtype)
            elif kind in CARRIED:
                out[k] = (_work(t) / self.weight).to(dtype)
            else:
                out[k] = t.clone()
        return out

    # --- geometry (Figure 2) -------------------------------------------------------------------
    @torch.no_grad()
    def norms(self) -> dict[str, float]:
        """L2 norm of each parameter's movement, in float64."""
        return {k: float(torch.linalg.vector_norm(t, dtype=torch.float64)) for k, t in self.params.items()}

    @torch.no_grad()
    def cosine(self, other: "DataVector", keys: Sequence[str] | None = None) -> dict[str, float]:
        """Per-parameter cosine similarity of two movements, float64; NaN where either is zero."""
        keys = list(keys) if keys is not None else keys_of(self.kinds, PARAM)
        fail([f"'{k}': not a parameter movement of both vectors" for k in keys
              if self.kinds.get(k) != PARAM or other.kinds.get(k) != PARAM], "cannot compare data vectors")
        out = {}
        for k in keys:
            a, b = self.tensors[k].reshape(-1).double(), other.tensors[k].reshape(-1).double()  # exact enough
            den = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(b))
            out[k] = float(a @ b) / den if den > 0 else math.nan
        return out
