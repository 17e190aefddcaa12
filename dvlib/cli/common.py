"""Flags shared by commands; names match the notebooks' parameters (``--n-hospitals`` = ``n_hospitals``)."""
from __future__ import annotations

import argparse

from dvlib.presets import PRESETS

OVERRIDES = ("dataset", "arch", "weights", "head", "n_hospitals", "scheme", "alpha", "test_frac", "image_size",
             "epochs", "batch_size", "lr", "lam")


def add_override_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("preset overrides (fixed in the run's settings)")
    o.add_argument("--arch", help="efficientnet_lite0, resnet50 or smallcnn")
    o.add_argument("--weights", help="imagenet, random or a path to backbone weights")
    o.add_argument("--head", choices=["append", "replace"], help="new head appended after, or replacing, the 1000-way layer")
    o.add_argument("--n-hospitals", type=int, help="number of simulated hospitals")
    o.add_argument("--scheme", choices=["iid", "dirichlet"], help="hospital split scheme")
    o.add_argument("--alpha", type=float, help="Dirichlet concentration (scheme dirichlet)")
    o.add_argument("--test-frac", type=float, help="fraction of each hospital's patients held out for testing")
    o.add_argument("--image-size", type=int, help="training/evaluation crop size in pixels")
    o.add_argument("--epochs", type=int, help="fine-tuning epochs")
    o.add_argument("--batch-size", type=int, help="batch size")
    o.add_argument("--lr", type=float, help="Adam learning rate")
    o.add_argument("--lam", type=float, help="data-vector scaling lambda")


def add_run_args(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--run", help="run name; outputs go to <runs>/<run>/ (default: <preset>-<dataset>)")
    g.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="settings preset (default: quick)")
    if dataset:
        g.add_argument("--dataset", help="dataset name or a folder of class sub-folders (default: the preset's)")
    g.add_argument("--seeds", type=int, nargs="+", help="split seeds: which patients go to which hospital (default 0)")
    g.add_argument("--train-seeds", type=int, nargs="+",
                   help="training seeds per split: heads, shuffling, augmentation, random methods (default: the preset's)")
    g.add_argument("--runs-dir", help="folder holding run folders (default: $DVLIB_RUNS or runs/)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--overwrite", action="store_true", help="start the run afresh if its settings changed")
    add_override_args(p)


def run_name(args) -> str:
    from dvlib.presets import get_preset

    dataset = getattr(args, "dataset", None) or get_preset(args.preset).dataset
    return args.run or f"{args.preset}-{str(dataset).replace('/', '_')}"


def open_from_args(args):
    """The run named by the flags (created if new): :func:`dvlib.runs.open_run`."""
    from dvlib.runs import open_run

    over = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    return open_run(run_name(args), args.preset, seeds=args.seeds, train_seeds=args.train_seeds,
                    root=args.runs_dir, device=args.device, overwrite=args.overwrite, **over)
