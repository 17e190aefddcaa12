"""``dvlib split``, ``dvlib finetune``, ``dvlib evaluate``."""
from __future__ import annotations

import argparse

import pandas as pd

from dvlib.cli.common import add_run_args, open_or_create


def register(sub) -> None:
    p = sub.add_parser("split", help="simulate hospitals: write the run's patient-disjoint split manifest(s)",
                       description="Split the dataset into patient-disjoint, label-stratified hospitals, each "
                                   "with its own train/test split; the manifest is written once and reused.")
    add_run_args(p)
    p.add_argument("--strict", action="store_true",
                   help="fail if metadata rows lack images or images lack metadata rows (default: count them)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("finetune", help="fine-tune each hospital's model (and Full Training)",
                       description="Fine-tune the pretrained network on one hospital's training split (or all "
                                   "of them, or the pooled data) and print its test metrics.")
    add_run_args(p)
    p.add_argument("--hospitals", "--hospital", nargs="+", default=None,
                   help="hospital indices and/or 'full' (default: every hospital and full)")
    p.add_argument("--devices", nargs="+", metavar="DEVICE",
                   help="train the models in parallel, one process per device, e.g. cuda:0 cuda:1 (default: "
                        "every visible GPU when --device is auto and there are several, else --device)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a run's test splits, or on data folders",
                       description="Evaluate a .safetensors checkpoint on every hospital's test split and on "
                                   "all test images of the run; write metrics as CSV and JSON. With --data: "
                                   "evaluate a checkpoint (or a site vector file) on one or more local data "
                                   "folders (and pooled) and also write a confusion-matrix PNG.")
    p.add_argument("checkpoint", help="a .safetensors checkpoint with its .json sidecar (with --data also a "
                                      "site vector file)")
    add_run_args(p)
    p.add_argument("--out", help="output prefix for <out>.eval.csv / <out>.eval.json (and <out>.confusion.png "
                                 "with --data) (default: next to the checkpoint)")
    d = p.add_argument_group("data folders (instead of a run)")
    d.add_argument("--data", nargs="+", metavar="DIR_OR_DATASET",
                   help="evaluate on these folders (one sub-folder per class) or dataset names, each and pooled")
    d.add_argument("--split", default="all", choices=["all", "test", "train"],
                   help="with --data: all images (default), or each folder's own patient-disjoint test/train "
                        "split as `dvlib site finetune` made it")
    d.add_argument("--split-seed", type=int, help="with --data: seed of that split (default: the one recorded "
                                                  "in the model's metadata, else 0); --test-frac likewise")
    p.set_defaults(func=cmd_evaluate)


def _print(df: pd.DataFrame) -> None:
    with pd.option_context("display.width", 160, "display.max_columns", 30):
        print(df.to_string(index=False))


def cmd_split(args: argparse.Namespace) -> int:
    from dvlib.experiment import step_split

    run = open_or_create(args)
    if args.strict:
        from dvlib.data import load_dataset

        load_dataset(run.preset.dataset, strict=True)
    table = step_split(run)
    print(f"run {run.name}: manifests in {run.dir}")
    _print(table)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from dvlib.experiment import step_finetune, step_split

    run = open_or_create(args)
    step_split(run)
    targets = None
    if args.hospitals:
        targets = ["full" if h == "full" else f"hospital_{int(h)}" for h in args.hospitals]
    table = step_finetune(run, targets, progress=not args.no_progress, devices=args.devices)
    if targets is not None:
        table = table[table["model"].isin(targets)]
    cols = ["seed", "model", "eval_on", "n", "accuracy", "balanced_accuracy", "macro_f1", "auc_ovr"]
    _print(table[cols].round(4))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dvlib.checkpoint import load_checkpoint
    from dvlib.experiment import Session
    from dvlib.io import DvlibError, write_csv, write_json

    if args.data:
        return _evaluate_data(args)
    run = open_or_create(args)
    sd, meta = load_checkpoint(args.checkpoint)
    rows = []
    for seed in run.seeds:
        s = Session(run, seed)
        if list(meta["classes"]) != s.classes:
            raise DvlibError(f"{args.checkpoint}: classes {meta['classes']} differ from the run's {s.classes}")
        rows += s.evaluate(s.model_from(sd), model=Path(args.checkpoint).stem)
    table = pd.DataFrame(rows)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix("")
    write_csv(out.with_name(out.name + ".eval.csv"), table)
    write_json(out.with_name(out.name + ".eval.json"), rows)
    _print(table.drop(columns=["confusion"]).round(4))
    return 0


def _evaluate_data(args: argparse.Namespace) -> int:
    """``evaluate --data``: a model on local data folders (see :func:`dvlib.site.evaluate_folders`)."""
    from pathlib import Path

    from dvlib.io import DvlibError
    from dvlib.site import evaluate_folders

    if args.run:
        raise DvlibError("evaluate: give either --run (a run's test splits) or --data (folders), not both")
    table, _ = evaluate_folders(args.checkpoint, args.data, split=args.split, split_seed=args.split_seed,
                                test_frac=args.test_frac, image_size=args.image_size, device=args.device,
                                out=args.out, weights=args.weights)
    prefix = Path(args.out) if args.out else Path(args.checkpoint).with_suffix("")
    _print(table.drop(columns=["model"]).round(4))
    print(f"wrote {prefix}.eval.json, {prefix}.eval.csv, {prefix}.confusion.png")
    return 0
