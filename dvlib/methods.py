"""Merge methods: each registered once (name, label, what lambda means, options, reference).

A method maps the hospitals' data vectors to one data vector; :func:`dvlib.merging.merge` applies it
to the pretrained weights. CLI choices, notebook parameter comments and ``docs/methods.md`` are made
from :data:`METHODS` (``python -m dvlib.methods`` prints the table). Randomness (``random_vector``,
``dare``) comes from ``torch.Generator().manual_seed(seed)`` on the CPU, drawn model by model, key by
key in state-dict order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dvlib.checks import finite_number
from dvlib.io import DvlibError

if TYPE_CHECKING:
    from dvlib.vectors import DataVector


@dataclass(frozen=True)
class MergeMethod:
    name: str
    label: str                 # as in the paper's tables
    formula: str               # with tau_i = theta_i - theta_pre
    lam: float | None          # default lambda; None: the method has none
    lam_meaning: str
    reference: str
    fn: Callable[..., "DataVector"] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)  # name -> default
    lam_from_run: bool = False  # a run's --lam sets it (the data-vector family), else its own default

    def resolve(self, lam: float | None, weights: Sequence[float] | None, opts: dict) -> tuple[float | None, dict]:
        """The lambda and options this method runs with; every bad value named."""
        if self.lam is None:
            lam = None  # ignored, whatever was asked
        else:
            # a negative lambda would move the model away from what the hospitals learnt
            lam = finite_number(self.lam if lam is None else lam, "lam", low=0.0)
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            raise DvlibError(f"method {self.name!r} got unknown option(s) {unknown}; its options: "
                             f"{', '.join(self.options) or 'none'}")
        if weights is not None and self.name != "weighted":
            raise DvlibError(f"weights are only used by method 'weighted', not {self.name!r}")
        return lam, {**self.options, **opts}


METHODS: dict[str, MergeMethod] = {}
BN_MODES = ("mean", "pretrained", "arithmetic")  # what a merge does with BatchNorm statistics (dvlib.merging)


def register(name: str, label: str, formula: str, lam: float | None, lam_meaning: str, reference: str,
             lam_from_run: bool = False, **options: Any) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS[name] = MergeMethod(name, label, formula, lam, lam_meaning, reference, fn, options, lam_from_run)
        return fn
    return deco


# the models the merges are compared with (the paper's other columns), labelled beside the methods
BASELINES = {"base_model": "Base Model", "full_training": "Full Training", "pretrained": "Pretrained (no merge)"}


def label(name: str) -> str:
    """How tables and figures name a merge method or a baseline model (as the paper does)."""
    if name not in METHODS and name not in BASELINES:
        raise DvlibError(f"no label for {name!r}; valid: {', '.join([*METHODS, *BASELINES])}")
    return METHODS[name].label if name in METHODS else BASELINES[name]


def run_lam(name: str, lam: float) -> float | None:
    """The lambda a run uses ``name`` with: the run's ``lam`` for the data-vector family, the
    method's own default otherwise (TIES 1.0), None where the method has none."""
    m = get(name)
    return None if m.lam is None else (float(lam) if m.lam_from_run else m.lam)


def get(name: str) -> MergeMethod:
    if name not in METHODS:
        raise DvlibError(f"unknown merge method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        raise DvlibError("method 'weighted' needs weights (e.g. the hospitals' sample counts), one per model")
    w = [finite_number(x, f"weights[{i}]", low=0.0) for i, x in enumerate(weights)]
    if len(w) != n:
        raise DvlibError(f"weights: got {len(w)} values for {n} models")
    if sum(w) <= 0:
        raise DvlibError(f"weights must not all be zero, got {w}")
    return [x / sum(w) for x in w]


# --- the methods ----------------------------------------------------------------------------------

@register("data_vector", "Data Vector", "theta_pre + lam * sum_i tau_i", 0.5,
          "scales the summed vector (paper: 0.5)",
          "Tian et al. 2024, arXiv:2408.13038, sections 3.3-3.4; task arithmetic: Ilharco et al. 2023, "
          "https://arxiv.org/abs/2212.04089", lam_from_run=True)
def data_vector(taus: Sequence["DataVector"], *, lam: float, **_) -> "DataVector":
    return lam * sum(taus)


@register("params_mean", "Params Mean", "mean_i theta_i", None, "none (the plain average)",
          "Wortsman et al. 2022, model soups, https://arxiv.org/abs/2203.05482")
def params_mean(taus: Sequence["DataVector"], **_) -> "DataVector":
    return (1.0 / len(taus)) * sum(taus)


@register("weighted", "Weighted Mean", "sum_i w_i theta_i, w = sample counts / their sum", None,
          "none (weights are the hospitals' training sample counts)",
          "FedAvg's weighting, McMahan et al. 2017, https://arxiv.org/abs/1602.05629")
def weighted(taus: Sequence["DataVector"], *, weights: Sequence[float] | None = None, **_) -> "DataVector":
    return sum(t.weighted(w) for t, w in zip(taus, normalize_weights(weights, len(taus))))


def random_like(tau, gen):
    """Gaussian noise with the L2 norm of ``tau`` (same shape and dtype), from ``gen``."""
    import torch

    g = torch.randn(tau.shape, generator=gen, dtype=torch.float32)
    norm, gnorm = torch.linalg.vector_norm(tau, dtype=torch.float64), torch.linalg.vector_norm(g, dtype=torch.float64)
    return (g.double() * (norm / gnorm)).to(tau.dtype) if float(gnorm) > 0 else g.to(tau.dtype)


@register("random_vector", "Random Vector", "theta_pre + lam * sum_i r_i, r_i Gaussian with tau_i's per-layer norms",
          0.5, "as for data_vector", "the paper's control (Tian et al. 2024, section 4.2)", lam_from_run=True)
def random_vector(taus: Sequence["DataVector"], *, lam: float, seed: int = 0, **_) -> "DataVector":
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    return lam * sum(t.map(lambda k, x: random_like(x, gen)) for t in taus)


@register("dare", "DARE", "theta_pre + lam * sum_i (m_i * tau_i) / (1 - p), m_i ~ Bernoulli(1 - p)", 0.5,
          "as for data_vector", "Yu et al. 2024, https://arxiv.org/abs/2311.03099", lam_from_run=True, p=0.5)
def dare(taus: Sequence["DataVector"], *, lam: float, seed: int = 0, p: float = 0.5, **_) -> "DataVector":
    import torch

    p = finite_number(p, "dare: drop probability p", low=0.0)
    if p >= 1:
        raise DvlibError(f"dare: drop probability p must be in [0, 1), got {p!r}")
    gen = torch.Generator().manual_seed(int(seed))

    def drop(_k, x):
        keep = torch.rand(x.shape, generator=gen, dtype=torch.float32) >= p
        return x * keep.to(x.device) / (1.0 - p)

    return lam * sum(t.map(drop) for t in taus)


def ties_threshold(abs_rows, density: float):
    """Per row, the k-th largest value, ``k = ceil(density * n)`` (at least 1); shape (rows, 1)."""
    n = abs_rows.shape[1]
    k = min(n, max(1, math.ceil(round(density * n, 6))))
    return abs_rows.kthvalue(n - k + 1, dim=1, keepdim=True).values


def ties_trim_elect(taus, thr):
    """Trimmed taus (below their threshold zeroed) and the elected sign per column (0 if tied)."""
    import torch

    trimmed = taus * (taus.abs() >= thr)
    return trimmed, torch.sign(trimmed.sum(0))


def ties_disjoint_mean(trimmed, sign):
    agree = trimmed * sign > 0  # same non-zero sign as elected; nothing agrees with a 0 sign
    total = (trimmed * agree).sum(0)
    return total / agree.sum(0).clamp(min=1).to(total.dtype)


@register("ties", "TIES", "theta_pre + lam * disjoint_mean(elect(trim(tau_i)))", 1.0,
          "scales a mean, so 1.0 (the TIES paper's setting)", "Yadav et al. 2023, https://arxiv.org/abs/2306.01708",
          density=0.2, scope="per_key")
def ties(taus: Sequence["DataVector"], *, lam: float, density: float = 0.2, scope: str = "per_key", **_) -> "DataVector":
    """Trim each tau_i to its top ``density`` by magnitude (ties at the threshold kept), elect a sign
    per element (sign of the trimmed sum; a zero sum takes the majority of the elected signs in the
    scope, as the reference code), average the entries agreeing with it. ``scope``: top-k per tensor
    (``per_key``, like mergekit) or per model over all parameters (``global``, like the TIES code)."""
    import torch

    density = finite_number(density, "ties: density", low=0.0)
    if not 0 < density <= 1:
        raise DvlibError(f"ties: density must be in (0, 1], got {density!r}")
    if scope not in ("per_key", "global"):
        raise DvlibError(f"ties: scope must be 'per_key' or 'global', got {scope!r}")
    mean = (1.0 / len(taus)) * sum(taus)  # heads and BN statistics: averaged as everywhere; checks the layouts
    movements = [t.params for t in taus]
    stacked = {k: torch.stack([m[k].reshape(-1) for m in movements]) for k in movements[0]}
    merged = {}
    if scope == "per_key":
        for k, s in stacked.items():
            trimmed, sign = ties_trim_elect(s, ties_threshold(s.abs(), density))
            sign[sign == 0] = torch.sign(sign.sum())
            merged[k] = ties_disjoint_mean(trimmed, sign)
    elif stacked:
        thr = ties_threshold(torch.cat([s.abs() for s in stacked.values()], dim=1), density)
        elected = {k: ties_trim_elect(s, thr) for k, s in stacked.items()}
        majority = torch.sign(sum(sign.sum() for _, sign in elected.values()))
        for k, (trimmed, sign) in elected.items():
            sign[sign == 0] = majority
            merged[k] = ties_disjoint_mean(trimmed, sign)
    return lam * mean.with_params({k: v.view(movements[0][k].shape) for k, v in merged.items()})


def robust_vector(taus: Sequence["DataVector"], lam: float, centre: Callable) -> "DataVector":
    """``lam * N * centre(tau_i)`` for the movement, ``centre`` of the heads and BatchNorm statistics
    (a robust mean equals the mean on identical vectors, so this is the data vector there), the
    largest counter; ``centre`` maps a (N, ...) stack to its element-wise statistic."""
    import torch

    from dvlib.vectors import COUNTER, PARAM, DataVector

    total = sum(taus)  # checks the layouts, as every method's arithmetic does
    out = {}
    for k, kind in total.kinds.items():
        if kind == COUNTER:
            out[k] = total.tensors[k]
            continue
        stack = torch.stack([t.part(kind)[k].double() for t in taus])
        value = centre(stack) * (lam * len(taus) if kind == PARAM else 1.0)
        out[k] = value.to(torch.float64 if total.tensors[k].dtype == torch.float64 else torch.float32)
    return DataVector(out, total.kinds)


@register("median", "Median", "theta_pre + lam * N * median_i tau_i (element-wise; heads and BN statistics: "
          "their median)", 0.5, "as for data_vector (lam * N * median = lam * sum on identical vectors)",
          "coordinate-wise median: Yin et al. 2018, https://arxiv.org/abs/1803.01498; Flower's FedMedian",
          lam_from_run=True)
def median(taus: Sequence["DataVector"], *, lam: float, **_) -> "DataVector":
    """The two middle values averaged for an even count (numpy's median): two sites give their mean."""
    def centre(s):
        v = s.sort(dim=0).values
        return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2

    return robust_vector(taus, lam, centre)


def trim_count(n: int, trim: float) -> int:
    """Sites cut from each end: ``ceil(trim * n)``, at most ``(n - 1) // 2`` so one is always kept."""
    return min(math.ceil(round(trim * n, 9)), (n - 1) // 2)


@register("trimmed_mean", "Trimmed Mean", "theta_pre + lam * N * trimmed_mean_i tau_i (element-wise, "
          "ceil(trim * N) cut from each end; heads and BN statistics: their trimmed mean)", 0.5,
          "as for data_vector (lam * N * trimmed mean = lam * sum on identical vectors)",
          "Yin et al. 2018, https://arxiv.org/abs/1803.01498; Flower's FedTrimmedAvg", lam_from_run=True, trim=0.2)
def trimmed_mean(taus: Sequence["DataVector"], *, lam: float, trim: float = 0.2, **_) -> "DataVector":
    trim = finite_number(trim, "trimmed_mean: trim", low=0.0)
    if trim >= 0.5:
        raise DvlibError(f"trimmed_mean: trim must be in [0, 0.5), got {trim!r}")
    k = trim_count(len(taus), trim)
    return robust_vector(taus, lam, lambda s: s.sort(dim=0).values[k:len(s) - k].mean(dim=0))


def table() -> str:
    """The registry as a Markdown table (docs/methods.md, README)."""
    rows = ["| method | label | formula | lambda | options | reference |", "|---|---|---|---|---|---|"]
    for m in METHODS.values():
        opts = ", ".join(f"{k}={v}" for k, v in m.options.items()) or "–"
        lam = "–" if m.lam is None else f"{m.lam:g}: {m.lam_meaning}"
        rows.append(f"| `{m.name}` | {m.label} | `{m.formula}` | {lam} | {opts} | {m.reference} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(table())
