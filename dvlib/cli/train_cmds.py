"""``dvlib split``, ``dvlib finetune`` (simulated hospitals of a run) and ``dvlib evaluate``."""
from __future__ import annotations

import argparse

import pandas as pd

from dvlib.cli.common import FRACTION, IMAGE_SIZE, SEED, add_run_args, int_in, run_from_args
from dvlib.io import DvlibError


def register(sub) -> None:
    p = sub.add_parser("split", help="simulate hospitals: write the run's patient-disjoint split manifest(s)",
                       description="Split the dataset into patient-disjoint, label-stratified hospitals, each "
                                   "with its own train/test split; the manifest is written once and reused.")
    add_run_args(p)
    p.add_argument("--strict", action="store_true",
                   help="fail if metadata rows lack images or images lack metadata rows (default: count them)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("finetune", help="fine-tune each simulated hospital's model (and Full Training)",
                       description="Run `dvlib site finetune` for one simulated hospital of a run (or all of them, "
                                   "or the pooled data) and print its test metrics.")
    add_run_args(p)
    p.add_argument("--hospitals", "--hospital", nargs="+", default=None,
                   help="hospitals 1..N and/or 'full' (default: every hospital and full)")
    p.add_argument("--devices", nargs="+", metavar="DEVICE",
                   help="train the models in parallel, one process per device, e.g. cuda:0 cuda:1 (default: "
                        "every visible GPU when --device is auto and there are several, else --device)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a model file on local data folders (or on a run's test splits)",
                       description="Evaluate a model file (or a site vector file) on one or more local data folders "
                                   "(each, and pooled): metrics as CSV and JSON and a confusion-matrix PNG.")
    p.add_argument("model", help="a .safetensors model or vector file written by dvlib")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", metavar="DIR_OR_DATASET", help="evaluate on these folders or dataset names")
    d.add_argument("--subset", "--split", dest="subset", default="all", choices=["all", "test", "train"],
                   help="all images (default), or each folder's own test/train split as the site made it")
    d.add_argument("--manifest", metavar="CSV", help="a saved split to use instead of making one (one --data)")
    d.add_argument("--hospital", type=int_in(0), nargs="+", help="with --manifest: the hospital(s) whose rows to use, each "
                                                          "evaluated, and pooled")
    d.add_argument("--split-seed", type=SEED, help="seed of the local split (default 0; the site's own, never the model file's)")
    d.add_argument("--test-frac", type=FRACTION, help="test fraction of the local split (default 0.2; the site's own)")
    d.add_argument("--site", help="site label (one --data)")
    p.add_argument("--out", help="output prefix for <out>.eval.csv, .eval.json, .confusion.png (default: next to the model)")
    p.add_argument("--image-size", type=IMAGE_SIZE, help="crop size (default: the model's)")
    p.add_argument("--weights", help="pretrained weights for a vector file (imagenet, random or a path)")
    p.add_argument("--weights-dir", action="append", default=[], metavar="DIR", help="folder holding the weights file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.set_defaults(func=cmd_evaluate)


def _print(df: pd.DataFrame) -> None:
    with pd.option_context("display.width", 160, "display.max_columns", 30):
        print(df.to_string(index=False))


def cmd_split(args: argparse.Namespace) -> int:
    from dvlib.data import load_dataset
    from dvlib.experiment import step_split
    from dvlib.presets import get_preset

    if args.strict:
        load_dataset(args.dataset or get_preset(args.preset).dataset, strict=True)
    with run_from_args(args) as run:
        table = step_split(run)
    print(f"run {run.name}: manifests in {run.dir}")
    _print(table)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from dvlib.experiment import step_finetune, step_split

    targets = None
    if args.hospitals:
        bad = [h for h in args.hospitals if h != "full" and not h.isdigit()]
        if bad:
            raise DvlibError(f"--hospitals: {bad[0]!r} is neither a hospital number nor 'full'")
        targets = ["full" if h == "full" else f"hospital_{int(h)}" for h in args.hospitals]
    with run_from_args(args) as run:  # held from the split to the last model: nobody starts it afresh meanwhile
        step_split(run)
        table = step_finetune(run, targets, progress=args.progress, devices=args.devices)
    if targets is not None:
        table = table[table["model"].isin(targets)]
    cols = ["split_seed", "train_seed", "model", "eval_on", "n", "accuracy", "balanced_accuracy", "macro_f1", "auc_ovr"]
    _print(table[cols].round(4))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dvlib.checks import distinct_outputs
    from dvlib.cli.site_cmds import open_local_from
    from dvlib.coordinator import open_model
    from dvlib.site import evaluate_sites, evaluation_paths, write_evaluation

    if not args.data:
        raise DvlibError("evaluate: give --data DIR [DIR ...] (a run's models are evaluated by its steps)")
    if len(args.data) > 1 and (args.manifest or args.site):
        raise DvlibError("evaluate: --manifest and --site go with one --data folder")
    _, meta = open_model(args.model, args.weights, args.weights_dir)
    locals_, hospitals = [], args.hospital or [None]
    for d in args.data:
        for h in hospitals:
            args.data, args.hospital = d, h
            locals_.append(open_local_from(args, classes=meta["classes"], meta=meta,
                                           source=f"the classes of {args.model}"))
    prefix = Path(args.out) if args.out else Path(args.model).with_suffix("")
    inputs = {"the model": args.model, "--manifest": args.manifest,
              **({"--weights": args.weights} if args.weights not in (None, "imagenet", "random") else {})}
    distinct_outputs({str(p): p for p in evaluation_paths(prefix)}, inputs)  # before the work, not after
    table, record = evaluate_sites(args.model, locals_, subset=args.subset, device=args.device,
                                   image_size=args.image_size, weights=args.weights, weights_dirs=args.weights_dir)
    paths = write_evaluation(prefix, table, record, inputs)
    _print(table.drop(columns=["model"]).round(4))
    print("wrote " + ", ".join(map(str, paths)))
    return 0
