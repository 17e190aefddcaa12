"""``dvlib run``: the whole notebook chain with papermill."""
from __future__ import annotations

import argparse

from dvlib.cli.common import OVERRIDES, add_override_args


def register(sub) -> None:
    p = sub.add_parser("run", help="execute the notebook chain (split → finetune → merge → restore → "
                                   "similarity → results) with papermill",
                       description="Execute notebooks/01..06 with papermill into reports/<run>/ (executed "
                                   ".ipynb + HTML, per-step logs) and figures/<run>/. Steps whose outputs "
                                   "exist are skipped unless --overwrite.")
    p.add_argument("--run", help="run name (default: <preset>-<dataset>)")
    p.add_argument("--preset", default="quick", help="smoke, quick or paper (default: quick)")
    p.add_argument("--dataset", default="", help="dataset (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's seed)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--runs-dir", default="", help="folder of run folders (default: runs/)")
    p.add_argument("--reports-dir", default="", help="executed notebooks (default: reports/<run>/)")
    p.add_argument("--figures-dir", default="", help="figures (default: figures/<run>/)")
    p.add_argument("--steps", nargs="+", help="only these notebooks, e.g. 03_merge 06_results")
    p.add_argument("--overwrite", action="store_true", help="re-run steps whose outputs exist")
    p.add_argument("--no-html", action="store_true", help="skip HTML rendering")
    add_override_args(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from dvlib.pipeline import run_chain
    from dvlib.presets import get_preset

    p = get_preset(args.preset)
    dataset = args.dataset or ""
    seeds = args.seeds if args.seeds else [p.seed]
    name = args.run or f"{args.preset}-{(dataset or p.dataset).replace('/', '_')}"
    extra = {k: getattr(args, k) for k in OVERRIDES if k != "dataset" and getattr(args, k, None) is not None}
    run_chain(name, args.preset, dataset, seeds, args.device, args.runs_dir, args.reports_dir, args.figures_dir,
              overwrite=args.overwrite, steps=args.steps, html=not args.no_html, extra=extra)
    return 0
