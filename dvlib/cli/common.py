"""Flags shared by commands; names match the notebooks' parameters (``--n-hospitals`` = ``n_hospitals``).

Numeric flags are checked as they are parsed (:func:`int_in`, :func:`float_in`): a value out of
range is refused naming the flag, before any work starts.
"""
from __future__ import annotations

import argparse
import contextlib
import math

from dvlib.checks import MAX_IMAGE_SIZE, MAX_SEED
from dvlib.models import HEADS
from dvlib.presets import PRESETS
from dvlib.split import SCHEMES, TEST_DESIGNS


def int_in(low: int, high: int | None = None):
    """An argparse ``type``: an integer in [low, high]."""
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be an integer {f'in [{low}, {high}]' if high is not None else f'>= {low}'}"
                                             f", got {text!r}")
        return v
    return conv


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse ``type``: a finite float in the given interval."""
    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = math.isfinite(v) and (low is None or (v > low if low_open else v >= low)) \
            and (high is None or (v < high if high_open else v <= high))
        if not ok:
            bounds = (f"{'(' if low_open else '['}{low if low is not None else '-inf'}, "
                      f"{high if high is not None else 'inf'}{')' if high_open or high is None else ']'}")
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {text!r}")
        return v
    return conv


POSITIVE = int_in(1)
IMAGE_SIZE = int_in(1, MAX_IMAGE_SIZE)
BATCH = int_in(2)            # BatchNorm needs more than one image per batch
SEED = int_in(0, MAX_SEED)
LR = float_in(0.0, low_open=True)
LAM = float_in(0.0)
FRACTION = float_in(0.0, 1.0, low_open=True, high_open=True)

OVERRIDES = ("dataset", "arch", "weights", "head", "n_hospitals", "scheme", "alpha", "test_frac", "test_design",
             "image_size", "epochs", "batch_size", "lr", "lam")


def add_override_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("preset overrides (fixed in the run's settings)")
    o.add_argument("--arch", help="efficientnet_lite0, resnet50 or smallcnn")
    o.add_argument("--weights", help="imagenet, random or a path to backbone weights")
    o.add_argument("--head", choices=HEADS, help="new head appended after, or replacing, the 1000-way layer")
    o.add_argument("--n-hospitals", type=POSITIVE, help="number of simulated hospitals")
    o.add_argument("--scheme", choices=SCHEMES, help="hospital split scheme")
    o.add_argument("--alpha", type=float_in(0.0, low_open=True), help="Dirichlet concentration (scheme dirichlet)")
    o.add_argument("--test-frac", type=FRACTION, help="fraction of each hospital's patients held out for testing")
    o.add_argument("--test-design", choices=TEST_DESIGNS,
                   help="per_hospital (the paper's) or shared: the same test patients for every split scheme")
    o.add_argument("--image-size", type=IMAGE_SIZE, help="training/evaluation crop size in pixels")
    o.add_argument("--epochs", type=POSITIVE, help="fine-tuning epochs")
    o.add_argument("--batch-size", type=BATCH, help="batch size")
    o.add_argument("--lr", type=LR, help="Adam learning rate")
    o.add_argument("--lam", type=LAM, help="data-vector scaling lambda")


def add_run_args(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--run", help="run name; outputs go to <runs>/<run>/ (default: <preset>-<dataset>)")
    g.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="settings preset (default: quick)")
    if dataset:
        g.add_argument("--dataset", help="dataset name or a folder of class sub-folders (default: the preset's)")
    g.add_argument("--seeds", type=SEED, nargs="+", help="split seeds: which patients go to which hospital (default 0)")
    g.add_argument("--train-seeds", type=SEED, nargs="+",
                   help="training seeds per split: heads, shuffling, augmentation, random methods (default: the preset's)")
    g.add_argument("--runs-dir", help="folder holding run folders (default: $DVLIB_RUNS or runs/)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--overwrite", action="store_true", help="start the run afresh if its settings changed")
    add_override_args(p)


def run_name(args) -> str:
    from dvlib.presets import get_preset

    dataset = getattr(args, "dataset", None) or get_preset(args.preset).dataset
    return args.run or f"{args.preset}-{str(dataset).replace('/', '_')}"


@contextlib.contextmanager
def run_from_args(args):
    """The run named by the flags, locked for the whole command (:func:`dvlib.runs.using_run`): no
    other command starts it afresh meanwhile, and a failed first command leaves no run behind."""
    from dvlib.runs import using_run

    over = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    with using_run(run_name(args), args.preset, seeds=args.seeds, train_seeds=args.train_seeds,
                   root=args.runs_dir, device=args.device, overwrite=args.overwrite, **over) as run:
        yield run
