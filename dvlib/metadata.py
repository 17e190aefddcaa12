"""What the metadata inside a model file must hold: every field named, typed and bounded.

A file another site made is never trusted to have the right types, so the optional fields later
commands read (split, hyperparameters, restore visits, ...) are checked here too, and every problem
comes back as one readable line (:func:`dvlib.checks.fail` raises them together).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

from dvlib.checks import MAX_BUILD_SEED, MAX_COUNT, MAX_IMAGE_SIZE, MAX_SEED, bare_name, label_problem
from dvlib.io import DvlibError

MODEL_KINDS = ("merged", "restored", "model")
VECTOR_KIND = "site_vector"
BUILTIN_WEIGHTS = ("imagenet", "random")
REQUIRED = ("kind", "arch", "head", "classes", "pretrained_sha256", "weights", "build_seed", "image_size")
MAX_CLASSES = 10_000


def _int_problem(meta: Mapping[str, Any], key: str, low: int, high: int, where: str) -> list[str]:
    v = meta.get(key)
    if key in meta and (isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high):
        return [f"{where}: metadata '{key}' must be an integer in [{low}, {high}], got {_short(v)}"]
    return []


def _short(v: Any, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _label(v: Any, what: str, where: str) -> list[str]:
    why = label_problem(v, what)
    return [f"{where}: {why}"] if why else []


def _count_problems(meta: Mapping[str, Any], where: str) -> list[str]:
    """Counts are non-negative integers, class counts name classes, metrics lie in [0, 1] (NaN: undefined)."""
    from dvlib.metrics import METRICS

    p = _int_problem(meta, "test_count", 0, MAX_COUNT, where)
    counts = meta.get("train_class_counts")
    if counts is not None:
        classes = meta.get("classes") if isinstance(meta.get("classes"), list) else []
        if not isinstance(counts, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                   and 0 <= v <= MAX_COUNT for v in counts.values()):
            p.append(f"{where}: metadata 'train_class_counts' must map classes to integers in [0, {MAX_COUNT}], "
                     f"got {_short(counts)}")
        elif set(counts) - set(map(str, classes)):
            p.append(f"{where}: metadata 'train_class_counts' names classes not in 'classes': "
                     f"{_short(sorted(set(counts) - set(map(str, classes))))}")
    metrics = meta.get("metrics")
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            if k in METRICS and (isinstance(v, bool) or not isinstance(v, (int, float))
                                 or not (math.isnan(v) or 0.0 <= v <= 1.0)):
                p.append(f"{where}: metadata 'metrics.{k}' must be a number in [0, 1], got {_short(v)}")
            elif k in ("n", "nonfinite_outputs") and (isinstance(v, bool) or not isinstance(v, int)
                                                      or not 0 <= v <= MAX_COUNT):
                p.append(f"{where}: metadata 'metrics.{k}' must be an integer in [0, {MAX_COUNT}], got {_short(v)}")
    return p


def _section_problems(meta: Mapping[str, Any], where: str) -> list[str]:
    """The optional fields later commands read: each of the type they expect, or absent/None."""
    p: list[str] = []
    for key in ("site", "dvlib_version", "preset", "method"):  # printed and compared as names
        if meta.get(key) is not None:
            p += _label(meta[key], f"metadata '{key}'", where)
    split = meta.get("split")
    if split is not None:
        if not isinstance(split, dict):
            p.append(f"{where}: metadata 'split' must be an object, got {_short(split)}")
        else:
            seed, frac = split.get("seed"), split.get("test_frac")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
                p.append(f"{where}: metadata 'split.seed' must be an integer in [0, {MAX_SEED}], got {_short(seed)}")
            if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float))
                                     or not 0.0 < frac < 1.0):
                p.append(f"{where}: metadata 'split.test_frac' must be a number in (0, 1), got {_short(frac)}")
    for key in ("hyperparameters", "metrics"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            p.append(f"{where}: metadata '{key}' must be an object, got {_short(meta[key])}")
    hyper = [("hyperparameters", meta.get("hyperparameters"))]
    sources = meta.get("sources")
    if sources is not None:
        if not isinstance(sources, list) or not all(isinstance(x, dict) for x in sources):
            p.append(f"{where}: metadata 'sources' must be a list of objects, got {_short(sources)}")
        else:
            hyper += [(f"sources[{i}].hyperparameters", x.get("hyperparameters")) for i, x in enumerate(sources)]
            p += [f"{where}: metadata 'sources[{i}].hyperparameters' must be an object, got "
                  f"{_short(x['hyperparameters'])}" for i, x in enumerate(sources)
                  if x.get("hyperparameters") is not None and not isinstance(x["hyperparameters"], dict)]
    for what, h in hyper:  # restore takes its batch size and lr from here
        if not isinstance(h, dict):
            continue
        b, lr = h.get("batch_size"), h.get("lr")
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_COUNT):
            p.append(f"{where}: metadata '{what}.batch_size' must be an integer >= 1, got {_short(b)}")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                               or lr < 0):
            p.append(f"{where}: metadata '{what}.lr' must be a finite number >= 0, got {_short(lr)}")
    visits = meta.get("restore_visits")
    if visits is not None:
        if not isinstance(visits, list) or not all(isinstance(v, dict) for v in visits):
            p.append(f"{where}: metadata 'restore_visits' must be a list of objects, got {_short(visits)}")
        else:
            for i, v in enumerate(visits):
                n = v.get("images")
                if not isinstance(v.get("mode"), str) or not isinstance(v.get("reset", False), bool) \
                        or isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_COUNT \
                        or label_problem(v.get("site"), "site"):
                    p.append(f"{where}: metadata 'restore_visits[{i}]' needs 'site' (a label), 'mode' (a string), "
                             f"'images' (an integer >= 0) and 'reset' (true/false), got {_short(v)}")
    p += _count_problems(meta, where)
    for key in ("warnings", "history"):
        if meta.get(key) is not None and not isinstance(meta[key], list):
            p.append(f"{where}: metadata '{key}' must be a list, got {_short(meta[key])}")
    return p


def meta_problems(meta: Mapping[str, Any], where: str) -> list[str]:
    """Every missing, ill-typed or out-of-range metadata field, named (also the optional fields that
    later commands read: a file another site made is never trusted to have the right types)."""
    from dvlib.models import ARCHS, HEADS

    p = [f"{where}: metadata lacks '{k}'" for k in REQUIRED if k not in meta]
    kind = meta.get("kind")
    if kind is not None and kind not in (VECTOR_KIND, *MODEL_KINDS):
        p.append(f"{where}: metadata 'kind' {_short(kind)} is not one of {VECTOR_KIND}, {', '.join(MODEL_KINDS)}")
    if "arch" in meta and meta["arch"] not in ARCHS:
        p.append(f"{where}: metadata 'arch' {_short(meta['arch'])} is not one of {', '.join(ARCHS)}")
    if "head" in meta and meta["head"] not in HEADS:
        p.append(f"{where}: metadata 'head' {_short(meta['head'])} is not one of {', '.join(HEADS)}")
    c = meta.get("classes")
    if "classes" in meta:
        if not isinstance(c, list) or not 2 <= len(c) <= MAX_CLASSES or len(set(map(repr, c))) != len(c):
            p.append(f"{where}: metadata 'classes' must be a list of 2 to {MAX_CLASSES} distinct names, got {_short(c)}")
        else:
            p += [line for i, x in enumerate(c) for line in _label(x, f"metadata 'classes[{i}]'", where)]
    sha = meta.get("pretrained_sha256")
    if "pretrained_sha256" in meta and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        p.append(f"{where}: metadata 'pretrained_sha256' must be 64 hex digits, got {_short(sha)}")
    p += _int_problem(meta, "build_seed", 0, MAX_BUILD_SEED, where)
    p += _int_problem(meta, "image_size", 1, MAX_IMAGE_SIZE, where)
    p += _int_problem(meta, "sample_count", 0, MAX_COUNT, where)
    if kind == VECTOR_KIND and "sample_count" not in meta:
        p.append(f"{where}: metadata lacks 'sample_count'")
    w = meta.get("weights")
    if "weights" in meta and w not in BUILTIN_WEIGHTS:
        try:
            bare_name(w, f"{where}: metadata 'weights'")
            p += _label(w, "metadata 'weights'", where)
        except DvlibError as e:
            p.append(str(e))
    return p + _section_problems(meta, where)
