"""The privacy budget notebook 08 may be given: DP-SGD's epsilon and delta, and the bootstrap size of
its membership-inference audit.

One definition for every place these values enter: ``dvlib run``'s flags as they are parsed, delta
against the hospitals' training images before any notebook runs (:func:`check_notebook_budget`),
and the privacy study's own functions (the study imports this module; the core
never imports the study). A value out of range is a :class:`~dvlib.io.DvlibError` naming it, before
anything trains.
"""
from __future__ import annotations

import math
import numbers

from dvlib.io import DvlibError

MIN_BOOT = 10  # fewer resamples leave no 2.5 % and 97.5 % percentiles to speak of
# delta >= DELTA_FACTOR / n is refused: publishing DELTA_FACTOR random training images in full is
# (0, DELTA_FACTOR / n)-DP, so such a delta promises nothing. 1/n, the default (the committed reports
# use it), is already weak: the usual advice is delta well below 1/n, e.g. 1e-5 (:func:`weak_delta`).
DELTA_FACTOR = 2.0


def _real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_epsilon(value, what: str = "epsilon") -> float:
    """``value`` as a float if it is finite and > 0 (an infinite epsilon promises nothing, yet
    Opacus would still train with its largest noise and report it as epsilon = inf)."""
    if not (_real(value) and value > 0):
        raise DvlibError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def check_delta(value, n: int | None = None, what: str = "delta", where: str = "") -> float:
    """``value`` as a float if 0 < delta < 1 and, given ``n`` training images, delta < DELTA_FACTOR / n
    (``where``: which hospital has those ``n`` images, for the message)."""
    if not (_real(value) and 0 < value < 1):
        raise DvlibError(f"{what} must be a finite number in (0, 1), got {value!r}")
    if n is not None and value >= DELTA_FACTOR / n:
        raise DvlibError(f"{what} {value!r} is at least {DELTA_FACTOR:g}/n = {DELTA_FACTOR / n:.4g}{where} "
                         f"(n = {n} training images): publishing {DELTA_FACTOR:g} random training images in "
                         "full meets such a delta, so it promises nothing; use delta below 1/n, e.g. 1e-5")
    return float(value)


def resolve_delta(delta, n: int, what: str = "delta") -> float:
    """DP-SGD's delta on ``n`` training images: ``delta`` checked, or 1/n when it is None."""
    return 1.0 / n if delta is None else check_delta(delta, n, what)


def weak_delta(delta: float, n: int) -> bool:
    """Whether delta is at least 1/n: allowed (1/n is the default), but far from the usual advice."""
    return delta >= 1.0 / n  # not delta * n >= 1: 1/49 * 49 < 1 in floating point


def check_n_boot(value, what: str = "n_boot") -> int:
    """``value`` as an int if it is an integer >= :data:`MIN_BOOT`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < MIN_BOOT:
        raise DvlibError(f"{what} must be an integer >= {MIN_BOOT}, got {value!r}")
    return int(value)


def training_images(run) -> dict[tuple[int, int], int]:
    """Each (split seed, hospital)'s training images: from the split manifests, or, before notebook
    01 has written them, the same split computed in memory (nothing is written)."""
    from dvlib.experiment.session import dataset_index
    from dvlib.split import load_manifest, make_split

    counts = {}
    for s in run.split_seeds:
        if run.manifest_path(s).exists():
            manifest = load_manifest(run.manifest_path(s))
        else:  # what step_split will write
            p = run.preset
            manifest = make_split(dataset_index(run), p.n_hospitals, p.scheme, p.alpha, p.test_frac, seed=s,
                                  allow_missing_classes=p.scheme == "dirichlet", test_design=p.test_design)
        train = manifest[manifest["subset"] == "train"]
        counts.update({(s, int(h)): int(n) for h, n in train.groupby("hospital").size().items()})
    return counts


def check_run_delta(run, delta, what: str = "delta", split_seeds=None) -> dict[tuple[int, int], int]:
    """Refuse ``delta`` unless it suits every hospital of the run (the smallest bounds it); returns
    :func:`training_images` (of ``split_seeds`` only, when given)."""
    counts = {k: n for k, n in training_images(run).items() if split_seeds is None or k[0] in split_seeds}
    if delta is not None and counts:
        (s, h), n = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
        check_delta(delta, n, what, where=f" for hospital {h} of split seed {s}")
    return counts


def check_notebook_budget(run, params: dict) -> None:
    """Notebook 08's budget among the parameters ``dvlib run`` passes it, named by their flags."""
    for e in params.get("epsilons") or ():
        check_epsilon(e, "--epsilons")
    if params.get("n_boot") is not None:
        check_n_boot(params["n_boot"], "--n-boot")
    if params.get("delta") is not None:
        check_run_delta(run, params["delta"], "--delta")
