"""The merge's screen of its inputs: per-site statistics and the outlier rule (issue 27).

Statistics, per site, in float64, against the rebuilt pretrained weights:

- ``vector_norm``: L2 norm of the data vector; ``norm``: of the site's whole movement (the data
  vector and the head's change from its initial weights); ``norm_groups``: ``norm`` per layer group
  (backbone stages, ``bn``: the BatchNorm affine parameters, ``head``);
- ``cosine_to_others``: cosine of the data vector to the mean of the OTHER sites' vectors;
- ``head_bias_shift``: the largest change of a head bias from its initial value (logits);
- ``bn_var_ratio``: per BatchNorm layer, mean running_var over the pretrained mean (channels where
  either is 0, dead channels, left out); the layer furthest from 1 (in decades) is reported.

The rule (a site breaking any part is refused, naming file, site and number; ``keep_outliers``
keeps it and marks it in the report):

1. a data vector (or whole movement) of norm 0: the site moved nothing, whatever it claims;
2. ``ln norm`` is more than ``ln(NORM_FACTOR)`` from the median over the sites AND its robust
   z-score ``|ln norm - median| / (1.4826 MAD)`` exceeds ``NORM_Z`` (the floor keeps honest sites
   with close norms, whose MAD is tiny, from being refused). With two sites the median is their
   midpoint and the z-score says nothing: both are refused when their norms differ more than
   ``NORM_FACTOR ** 2`` times (which one is wrong cannot be told);
3. ``cosine_to_others < COSINE_MIN`` (with 2 sites: both, for the same reason);
4. ``head_bias_shift > HEAD_BIAS_MAX``;
5. a BatchNorm layer's variance ratio beyond ``BN_VAR_DECADES`` decades either way.

The merge then measures its effective step, ``|merged movement| / |mean of the sites' movements|``
(``lam * N`` for the data vector); beyond ``STEP_MAX`` it is named in a warning.
"""
from __future__ import annotations

import hashlib
import math
import statistics
from typing import Mapping, Sequence

import torch

from dvlib.io import DvlibError
from dvlib.vectors import BN_STAT, HEAD, PARAM, DataVector, keys_of

NORM_FACTOR = 10.0      # honest sites' norms differ far less; a scaled or zeroed vector far more
NORM_Z = 3.5            # the usual robust z-score cut (Iglewicz and Hoaglin)
COSINE_MIN = -0.5       # honest sites fine-tuned from one model do not point away from each other
HEAD_BIAS_MAX = 10.0    # a bias moved by e^10 in odds is not learnt in a fine-tuning
BN_VAR_DECADES = 3.0    # x1000 either way from the pretrained statistics
STEP_MAX = 4.0          # effective step beyond which the merged model leaves where the sites went
RULE = {"norm_factor": NORM_FACTOR, "norm_z": NORM_Z, "cosine_min": COSINE_MIN, "head_bias_max": HEAD_BIAS_MAX,
        "bn_var_decades": BN_VAR_DECADES, "step_max": STEP_MAX}


def content_sha256(tau: DataVector) -> str:
    """A hash of the tensors alone (names, dtypes, shapes, bytes): the same site whatever its metadata."""
    h = hashlib.sha256()
    for k in sorted(tau.tensors):
        t = tau.tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def layer_group(key: str, kinds: Mapping, tensors: Mapping) -> str:
    """``head``, ``bn`` (affine parameters of a BatchNorm layer) or the backbone stage of ``key``."""
    if kinds[key] == HEAD:
        return "head"
    module = key.rsplit(".", 1)[0]
    if f"{module}.running_var" in tensors:
        return "bn"
    parts = key.split(".")
    # 'backbone.blocks.3.1.conv' -> 'backbone.blocks.3'; 'backbone.layer2.0.conv1' -> 'backbone.layer2'
    n = 3 if len(parts) > 3 and parts[2].isdigit() and not parts[1][-1:].isdigit() else 2
    return ".".join(parts[:n])


def _sq(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()) ** 2)


def site_statistics(tau: DataVector, pretrained: Mapping[str, torch.Tensor]) -> dict:
    """One site's norms, head and BatchNorm statistics (see the module docstring)."""
    groups: dict[str, float] = {}
    moves = dict(tau.params)
    moves.update({k: t.double() - pretrained[k].double() for k, t in tau.part(HEAD).items()
                  if k in pretrained and pretrained[k].shape == t.shape})
    for k, t in moves.items():
        g = layer_group(k, tau.kinds, tau.tensors)
        groups[g] = groups.get(g, 0.0) + _sq(t)
    bias = [float((t.double() - pretrained[k].double()).abs().max()) for k, t in tau.part(HEAD).items()
            if k.endswith(".bias") and k in pretrained and pretrained[k].shape == t.shape and t.numel()]
    worst, worst_layer = 1.0, None
    for k, v in tau.part(BN_STAT).items():
        if k.endswith("running_var") and k in pretrained and pretrained[k].shape == v.shape:
            live = (v > 0) & (pretrained[k] > 0)  # dead channels (variance 0) are legitimate: left out
            if not live.any():
                continue
            ratio = float(v.double()[live].mean() / pretrained[k].double()[live].mean())
            if abs(math.log10(ratio)) > abs(math.log10(worst)):
                worst, worst_layer = ratio, k
    return {"norm": math.sqrt(sum(groups.values())), "vector_norm": math.sqrt(sum(map(_sq, tau.params.values()))),
            "norm_groups": {g: math.sqrt(s) for g, s in groups.items()},
            "head_bias_shift": max(bias) if bias else 0.0,
            "bn_var_ratio": worst, "bn_var_layer": worst_layer}


def cosines_to_others(taus: Sequence[DataVector]) -> list[float]:
    """Cosine of each site's data vector to the mean of the other sites' (NaN where one is zero)."""
    keys = keys_of(taus[0].kinds, PARAM)
    flat = [torch.cat([t.tensors[k].reshape(-1).double() for k in keys]) for t in taus]
    total = sum(flat)
    out = []
    for f in flat:
        rest = (total - f) / max(len(flat) - 1, 1)
        den = float(torch.linalg.vector_norm(f)) * float(torch.linalg.vector_norm(rest))
        out.append(float(f @ rest) / den if den > 0 else math.nan)
    return out


def _number(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _norm_outliers(norms: list[float]) -> list[str | None]:
    logs = [math.log(n) for n in norms if n > 0]
    if len(logs) < 2:
        return [None if n > 0 else "" for n in norms]
    med = statistics.median(logs)
    mad = statistics.median(abs(x - med) for x in logs) * 1.4826
    out = []
    for n in norms:
        if n <= 0:
            out.append("")
            continue
        dev = abs(math.log(n) - med)
        z = math.inf if len(norms) < 3 or mad == 0 else dev / mad
        out.append(f"{math.exp(dev):.3g}x from the sites' median norm {math.exp(med):.4g}, robust z {z:.3g}"
                   if dev > math.log(NORM_FACTOR) and z > NORM_Z else None)
    return out


def screen(labels: Sequence[str], taus: Sequence[DataVector], pretrained: Mapping[str, torch.Tensor],
           keep_outliers: bool = False) -> dict:
    """The per-site statistics and the outliers by the rule; a :class:`DvlibError` naming every
    outlier (its label: file and site) and its number unless ``keep_outliers``."""
    sites = [site_statistics(t, pretrained) for t in taus]
    for s, c in zip(sites, cosines_to_others(taus)):
        s["cosine_to_others"] = c
    for label, s, norm_why in zip(labels, sites, _norm_outliers([s["norm"] for s in sites])):
        why = []
        if s["vector_norm"] == 0:
            why.append("data vector is all zeros (norm 0): the site moved nothing, whatever it claims")
        if norm_why == "":
            why.append("vector norm 0: the site moved nothing")
        elif norm_why:
            why.append(f"vector norm {s['norm']:.4g}: {norm_why} (bound {NORM_FACTOR:g}x and z {NORM_Z:g})")
        if s["cosine_to_others"] < COSINE_MIN:
            why.append(f"cosine to the other sites' mean {s['cosine_to_others']:.3g} < {COSINE_MIN:g}")
        if s["head_bias_shift"] > HEAD_BIAS_MAX:
            why.append(f"head bias moved by {s['head_bias_shift']:.4g} > {HEAD_BIAS_MAX:g}")
        r = s["bn_var_ratio"]
        if abs(math.log10(r)) > BN_VAR_DECADES:
            why.append(f"BatchNorm running_var {r:.3g} x the pretrained in '{s['bn_var_layer']}' "
                       f"(bound 1e{BN_VAR_DECADES:g} either way)")
        s.update(label=label, outlier=why)
    bad = [f"{s['label']}: {'; '.join(s['outlier'])}" for s in sites if s["outlier"]]
    for s in sites:  # JSON has no NaN: an undefined cosine (a zero vector) is None
        s["cosine_to_others"] = _number(s["cosine_to_others"])
    if bad and not keep_outliers:
        raise DvlibError(f"{len(bad)} of {len(sites)} sites are outliers by the merge's screen (dvlib.screening); "
                         "nothing was written; --keep-outliers merges them anyway:\n  - " + "\n  - ".join(bad))
    return {"rule": dict(RULE), "sites": sites, "kept_outliers": [s["label"] for s in sites if s["outlier"]]}


def effective_step(merged: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
                   taus: Sequence[DataVector]) -> float | None:
    """|merged - pretrained| / |mean of the sites' vectors| over the data-vector keys (lam * N for
    the data vector); None when the sites moved nothing."""
    keys = keys_of(taus[0].kinds, PARAM)
    moved = math.sqrt(sum(_sq(merged[k].double() - pretrained[k].double()) for k in keys))
    mean = math.sqrt(sum(_sq(sum(t.tensors[k].double() for t in taus) / len(taus)) for k in keys))
    return moved / mean if mean > 0 else None


def step_warning(step: float | None, method: str, lam, n: int) -> str | None:
    if step is None or not step > STEP_MAX:
        return None
    return (f"effective step {step:.3g} x the sites' mean vector (method {method}, lam={lam}, {n} sites) is beyond "
            f"{STEP_MAX:g}: the merged model lands far past where the sites went; lower --lam (e.g. {STEP_MAX / n:.3g})")
