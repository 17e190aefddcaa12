"""``dvlib run``: the whole notebook chain with papermill."""
from __future__ import annotations

import argparse

from dvlib.cli.common import LAM, OVERRIDES, SEED, add_override_args, float_in, int_in
from dvlib.pipeline import EXTRAS
from dvlib.privacy_budget import DELTA_FACTOR, MIN_BOOT

# notebook 08's budget, refused as it is parsed (exit 2, nothing written); delta against each
# hospital's training images is checked once the run is known, still before any notebook runs
EPSILON = float_in(0.0, low_open=True)
DELTA = float_in(0.0, 1.0, low_open=True, high_open=True)
N_BOOT = int_in(MIN_BOOT)


def register(sub) -> None:
    p = sub.add_parser("run", help="execute the notebook chain (split → finetune → merge → restore → "
                                   "similarity → results) with papermill",
                       description="Execute notebooks/01..06 (and 07, 08 with --with) with papermill into reports/<run>/ (executed "
                                   ".ipynb + HTML, per-step logs) and figures/<run>/. Steps that succeeded "
                                   "are skipped unless --overwrite; a failed step is kept as <step>.failed.ipynb "
                                   "and the command exits 2.")
    p.add_argument("--run", help="run name (default: <preset>-<dataset>)")
    p.add_argument("--preset", default="quick", help="smoke, quick or paper (default: quick)")
    p.add_argument("--dataset", default="", help="dataset (default: the preset's)")
    p.add_argument("--seeds", type=SEED, nargs="+", default=None, help="split seeds: which patients go to which "
                                                                      "hospital (default 0)")
    p.add_argument("--train-seeds", type=SEED, nargs="+", default=None,
                   help="training seeds per split (default: the preset's seed)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--runs-dir", default="", help="folder of run folders (default: runs/)")
    p.add_argument("--reports-dir", default="", help="executed notebooks (default: reports/<run>/)")
    p.add_argument("--figures-dir", default="", help="figures (default: figures/<run>/)")
    p.add_argument("--steps", nargs="+", help="only these notebooks, e.g. 03_merge 06_results")
    p.add_argument("--with", dest="extras", nargs="+", default=[], choices=sorted(EXTRAS),
                   help="also run these notebooks after the chain: federated (07, Flower's FedAvg/FedBN; needs "
                        "the fl extra) and privacy (08, membership inference and DP-SGD; needs the privacy extra)")
    p.add_argument("--overwrite", action="store_true", help="re-run steps that are done (a failed step always runs again)")
    p.add_argument("--no-html", action="store_true", help="skip HTML rendering")
    add_override_args(p)
    n = p.add_argument_group("notebook parameters (each goes to the notebooks that declare it; default: theirs)")
    n.add_argument("--hospitals", nargs="+", metavar="H", help="02: targets to train, e.g. 1 2 full")
    n.add_argument("--devices", nargs="+", metavar="DEVICE",
                   help="02: fine-tune in parallel, one process per device, e.g. cuda:0 cuda:1 (default: every "
                        "visible GPU when --device is auto and there are several)")
    n.add_argument("--methods", nargs="+", metavar="METHOD", help="03: merge methods")
    n.add_argument("--lambdas", nargs="+", type=LAM, metavar="LAM", help="03: lambda sweep of the data-vector merge")
    n.add_argument("--restore-modes", nargs="+", metavar="MODE", help="04: restore modes to compare")
    n.add_argument("--finetune-methods", nargs="+", metavar="METHOD",
                   help="04: methods that get the training-based restore")
    n.add_argument("--restore", help="06: restore mode of the merged models in the paper-layout tables")
    n.add_argument("--fl-methods", nargs="+", metavar="METHOD", help="07: federated baselines (fedavg, fedbn)")
    n.add_argument("--fl-rounds", nargs="+", type=int, metavar="R", help="07: rounds R, each dividing the epochs")
    n.add_argument("--epsilons", nargs="+", type=EPSILON, metavar="EPS",
                   help="08: DP-SGD privacy budgets, each finite and > 0")
    n.add_argument("--delta", type=DELTA, help=f"08: DP-SGD's delta at every hospital (default 1/n, n its "
                                                f"training images); refused at or above {DELTA_FACTOR:g}/n")
    n.add_argument("--dp-trainable", help="08: what DP-SGD trains (all_but_bn, last_stages, head)")
    n.add_argument("--dp-train-seeds", nargs="+", type=SEED, metavar="SEED", help="08: training seeds DP runs for")
    n.add_argument("--n-boot", type=N_BOOT, help=f"08: bootstrap resamples (whole patients) per interval, "
                                                  f"at least {MIN_BOOT}")
    p.set_defaults(func=cmd_run)


NOTEBOOK_PARAMS = ("hospitals", "devices", "methods", "lambdas", "restore_modes", "finetune_methods", "restore",
                   "fl_methods", "fl_rounds", "epsilons", "delta", "dp_trainable", "dp_train_seeds", "n_boot")


def cmd_run(args: argparse.Namespace) -> int:
    from dvlib.pipeline import run_chain
    from dvlib.presets import get_preset

    p = get_preset(args.preset)
    dataset = args.dataset or ""
    seeds = args.seeds if args.seeds else [0]
    name = args.run or f"{args.preset}-{(dataset or p.dataset).replace('/', '_')}"
    extra = {k: getattr(args, k) for k in OVERRIDES if k != "dataset" and getattr(args, k, None) is not None}
    nb_params = {k: getattr(args, k) for k in NOTEBOOK_PARAMS if getattr(args, k) is not None}
    steps = args.steps
    if args.extras:
        from dvlib.pipeline import CHAIN

        steps = list(steps or CHAIN) + [EXTRAS[e] for e in args.extras if EXTRAS[e] not in (steps or [])]
    run_chain(name, args.preset, dataset, seeds, args.train_seeds, args.device, args.runs_dir, args.reports_dir,
              args.figures_dir, overwrite=args.overwrite, steps=steps, html=not args.no_html, extra=extra,
              notebook_params=nb_params)
    return 0
