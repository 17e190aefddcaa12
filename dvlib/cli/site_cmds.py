"""``dvlib site finetune|restore`` (at a hospital), ``dvlib merge`` (the coordinator), ``dvlib inspect``.

Thin wrappers over :mod:`dvlib.site` and :mod:`dvlib.coordinator`; see ``docs/multi-site.md``. The
choices come from the registries (:mod:`dvlib.methods`, :mod:`dvlib.restore`, ``models.HEADS``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from dvlib import methods, restore
from dvlib.cli.common import BATCH, FRACTION, IMAGE_SIZE, LAM, LR, POSITIVE, SEED, int_in
from dvlib.io import DvlibError, all_or_nothing
from dvlib.models import HEADS
from dvlib.presets import PRESETS

_DATA_HELP = ("local images: a folder with one sub-folder per class (optional patients.csv mapping file "
              "stems to patient ids), or a registered dataset name")


def add_local_args(p: argparse.ArgumentParser, split_default: str = "0 and 0.2, as at site finetune") -> None:
    """Where the site's images are and how they are split into train and test."""
    p.add_argument("--data", required=True, metavar="DIR_OR_DATASET", help=_DATA_HELP)
    p.add_argument("--site", help="site label recorded in the files (default: the data folder's name)")
    g = p.add_argument_group("local split (the same at every command of a site)")
    g.add_argument("--manifest", metavar="CSV", help="a saved split (columns image, patient, label, hospital, "
                                                     "subset), e.g. written by --save-split; reused as it is")
    g.add_argument("--hospital", type=int_in(0), help="with --manifest: the hospital whose rows are this site's")
    g.add_argument("--split-seed", type=SEED, help=f"seed of the patient-disjoint train/test split (default: {split_default})")
    g.add_argument("--test-frac", type=FRACTION, help=f"fraction of patients held out for testing (default: {split_default})")


def _sha256(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 hex digits)")
    return text.strip().lower()


def register(sub) -> None:
    site = sub.add_parser("site", help="hospital side: fine-tune and export a data-vector file; restore a merged model",
                          description="Commands a hospital runs on its own data. Nothing leaves the hospital "
                                      "except the files these commands write (see docs/multi-site.md).")
    ssub = site.add_subparsers(dest="site_command", metavar="{finetune,restore}")
    ssub.required = True

    p = ssub.add_parser("finetune", help="fine-tune on local data and write the site's data-vector file",
                        description="Fine-tune the shared pretrained network on the local training images and "
                                    "write a .safetensors vector file holding only the data vector, the new head, "
                                    "BatchNorm statistics and metadata (no images, no file names, no patient ids).")
    add_local_args(p, split_default="0 and 0.2")
    p.add_argument("--out", required=True, help="vector file to write, e.g. site_a.dv.safetensors")
    p.add_argument("--save-split", metavar="CSV", help="also write the local split here (it names images: keep it "
                                                       "at the hospital); reuse it with --manifest")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="the class list all sites agreed on, in order (default: this site's class folders); "
                        "needed when a site has no images of some class, so that the vector files merge")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="settings preset (default: quick)")
    p.add_argument("--arch", help="efficientnet_lite0, resnet50 or smallcnn (default: the preset's)")
    p.add_argument("--weights", help="pretrained weights: imagenet, random or a path; every site the same")
    p.add_argument("--head", choices=HEADS, help="head mode (default: the preset's)")
    p.add_argument("--image-size", type=IMAGE_SIZE, help="crop size in pixels")
    p.add_argument("--epochs", type=POSITIVE, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=BATCH, help="batch size")
    p.add_argument("--lr", type=LR, help="Adam learning rate")
    p.add_argument("--seed", type=SEED, help="training seed: shuffling, augmentation (default: the preset's)")
    p.add_argument("--head-seed", type=SEED, default=0, help="seed of the new head, the same at every site (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=cmd_finetune)

    p = ssub.add_parser("restore", help="one restore visit at this site (BatchNorm statistics, or one epoch)",
                        description="Run at each hospital in turn. recalibrate (label-free): the first visit resets "
                                    "the BatchNorm statistics, later visits continue the cumulative average, so the "
                                    "result equals recalibrating over all visited sites' images at once. The output "
                                    "records every visit (site, images).")
    p.add_argument("model", help="merged (or already restored) model file, .safetensors")
    add_local_args(p)
    p.add_argument("--out", required=True, help="model file to write, e.g. merged.bn.safetensors")
    p.add_argument("--mode", default="recalibrate", choices=restore.VISITS,
                   help="; ".join(f"{m}: {restore.MODES[m].description}" for m in restore.VISITS))
    p.add_argument("--subset", default="train", choices=["train", "all"],
                   help="local images used: the train split (default; keeps the local test split unseen) or all")
    p.add_argument("--batch-size", type=BATCH, help=f"batch size (default: {restore.BN_BATCH} to recalibrate, the "
                                                  "sites' training batch size for an epoch)")
    p.add_argument("--image-size", type=IMAGE_SIZE, help="crop size (default: the model's)")
    p.add_argument("--lr", type=LR, help="learning rate of finetune_epoch (default: the sites')")
    p.add_argument("--seed", type=SEED, default=0, help="seed of finetune_epoch's shuffling (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--allow-revisit", action="store_true",
                   help="let a site label contribute twice to the same BatchNorm statistics")
    p.add_argument("--merged-sha256", type=_sha256, metavar="HEX",
                   help="the merged weights' sha256 the coordinator announced (custody.sha256 in `dvlib inspect` "
                        "of the merged file): the file's chain of custody must start from it")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("merge", help="coordinator: merge site data-vector files into one model file",
                       description="Check that the vector files can be merged (every problem reported at once), "
                                   "rebuild the pretrained weights (refused unless their sha256 matches the sites'), "
                                   "merge, check the result is finite, and write one model file.")
    p.add_argument("files", nargs="+", metavar="FILE", help="site vector files (.safetensors), at least 2")
    p.add_argument("--out", required=True, help="model file to write, e.g. merged.safetensors")
    p.add_argument("--method", default="data_vector", choices=list(methods.METHODS),
                   help="; ".join(f"{m.name}: {m.formula}" for m in methods.METHODS.values()))
    p.add_argument("--lam", type=LAM, help="lambda, >= 0 (default: the method's; "
                   + ", ".join(f"{m.name} {m.lam:g}" for m in methods.METHODS.values() if m.lam is not None) + ")")
    p.add_argument("--bn-buffers", default="mean", choices=methods.BN_MODES,
                   help="BatchNorm statistics of the merged model before restore (default: mean)")
    p.add_argument("--weights", help="the pretrained weights (imagenet, random or a path) instead of those named "
                                     "in the files; must match their sha256")
    p.add_argument("--weights-dir", action="append", default=[], metavar="DIR",
                   help="a folder to look in for the weights file the sites name (never a path from a file)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of random methods (random_vector, dare)")
    p.add_argument("--keep-outliers", action="store_true",
                   help="merge sites the screen finds outliers (norm, cosine, head bias, BatchNorm variance; see "
                        "dvlib.screening) instead of refusing them; they are marked in the report")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="print the metadata a model or vector file carries",
                       description="Print the metadata JSON stored in a dvlib .safetensors file's header (after "
                                   "the same checks every command applies), and its tensors' count.")
    p.add_argument("file", help="a .safetensors file written by dvlib")
    p.set_defaults(func=cmd_inspect)


def open_local_from(args, classes=None, meta: dict | None = None, source: str = "--classes"):
    """The site's images split as its own flags say (default: seed 0, test fraction 0.2, as at
    ``site finetune``); a model file's ``meta`` never chooses the split, and one that records another
    split than this site's is refused (:func:`dvlib.site.check_split`) unless every image is used."""
    from dvlib.local import open_local
    from dvlib.site import check_split

    seed = args.split_seed if args.split_seed is not None else 0
    frac = args.test_frac if args.test_frac is not None else 0.2
    local = open_local(args.data, split_seed=seed, test_frac=frac, classes=classes, manifest=args.manifest,
                       hospital=args.hospital, site=args.site, source=source)
    if meta is not None and getattr(args, "subset", "train") != "all":
        check_split(meta, local, getattr(args, "model", "the model file"))
    return local


def cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dvlib import stages
    from dvlib.checks import distinct_outputs
    from dvlib.coordinator import check_out
    from dvlib.files import BUILTIN_WEIGHTS, save_vector
    from dvlib.io import check_writable
    from dvlib.presets import get_preset
    from dvlib.site import finetune_site, format_metrics
    from dvlib.split import save_manifest

    over = {k: getattr(args, k) for k in ("arch", "weights", "head", "image_size", "epochs", "batch_size", "lr")}
    p = get_preset(args.preset, **over)
    if args.save_split is not None and Path(args.save_split).suffix != ".csv":
        raise DvlibError(f"{args.save_split}: --save-split writes a .csv file")
    check_out(args.out, [], "the vector file")  # before the training, not after it
    if args.save_split is not None:
        check_writable(args.save_split)
    distinct_outputs({"--out": args.out, "--save-split": args.save_split},
                     {"--weights": p.weights if p.weights not in BUILTIN_WEIGHTS else None,
                      "--manifest": args.manifest, "patients.csv of --data": Path(args.data) / "patients.csv"})
    local = open_local_from(args, classes=args.classes)
    if local.index.info.get("hidden_note"):  # .thumbnails, @eaDir: skipped, and said so
        print(f"  note: {local.index.info['hidden_note']}")
    seed = args.seed if args.seed is not None else p.seed
    tau, meta = finetune_site(local, stages.TrainSettings.from_preset(p), seed=seed, build_seed=args.head_seed,
                              device=args.device, progress=args.progress, preset=args.preset)
    with all_or_nothing():
        save_vector(args.out, tau, meta)
        if args.save_split:
            save_manifest(local.manifest, args.save_split)
    print(f"site {meta['site']}: {meta['sample_count']} training / {meta['test_count']} test images "
          f"(split: {json.dumps(local.split)}), {meta['arch']} ({meta['weights']}, head {meta['head']}), "
          f"{meta['hyperparameters']['epochs']} epochs")
    print(f"  local test: {format_metrics(meta['metrics'])}")
    print(f"  wrote {args.out}" + (f"; the local split in {args.save_split} (keep it here)" if args.save_split else ""))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from dvlib.coordinator import merge_files

    meta = merge_files(args.files, args.out, method=args.method, lam=args.lam, bn_buffers=args.bn_buffers,
                       weights=args.weights, weights_dirs=args.weights_dir, seed=args.seed,
                       keep_outliers=args.keep_outliers)
    sites = ", ".join(f"{s['site']} ({s['sample_count']})" for s in meta["sources"])
    print(f"merged {len(meta['sources'])} sites [{sites}] with {meta['method']} (lam={meta['lam']}, "
          f"bn_buffers={meta['bn_buffers']}); pretrained sha256 {meta['pretrained_sha256'][:16]}...")
    print_screen(meta["screening"])
    for w in meta["warnings"]:
        print(f"  note: {w}")
        if w == meta["screening"]["effective_step_warning"]:
            print(f"dvlib: warning: {w}", file=sys.stderr)
    print(f"  weights sha256 {meta['custody']['sha256']} (sites may check it: dvlib site restore --merged-sha256)")
    print(f"  wrote {args.out}; next: `dvlib site restore {args.out} --data DIR --out ...` at each site")
    return 0


def print_screen(rep: dict) -> None:
    """The merge report's per-site statistics, one line a site (all of them: ``dvlib inspect``)."""
    print("  screen (dvlib.screening): site | norm | cosine to the others | head bias shift | worst BN var ratio")
    for s in rep["sites"]:
        cos = "n/a" if s["cosine_to_others"] is None else f"{s['cosine_to_others']:.3f}"
        mark = f"  OUTLIER KEPT: {'; '.join(s['outlier'])}" if s["outlier"] else ""
        print(f"    {s['label']} | {s['norm']:.4g} | {cos} | {s['head_bias_shift']:.3g} | {s['bn_var_ratio']:.3g}{mark}")
    step = rep["effective_step"]
    print(f"  effective step: {'n/a' if step is None else f'{step:.3g}'} x the sites' mean vector "
          f"(bound {rep['rule']['step_max']:g})")


def cmd_restore(args: argparse.Namespace) -> int:
    from dvlib.coordinator import open_model
    from dvlib.site import restore_site

    model, meta = open_model(args.model)
    local = open_local_from(args, classes=meta["classes"], meta=meta, source=f"the classes of {args.model}")
    new = restore_site(args.model, local, args.out, mode=args.mode, seed=args.seed, subset=args.subset,
                       batch_size=args.batch_size, image_size=args.image_size, lr=args.lr, device=args.device,
                       allow_revisit=args.allow_revisit, model=model, meta=meta, merged_sha256=args.merged_sha256)
    v = new["restore_visits"][-1]
    done = ", ".join(f"{x['site']}:{x['mode']}({x['images']})" for x in new["restore_visits"])
    print(f"site {v['site']}: {v['mode']} on {v['images']} {v['subset']} images"
          + (" (statistics reset first)" if v.get("reset") else ""))
    print(f"  visits so far: {done}; BatchNorm statistics over {new['bn_images']} images")
    if meta.get("custody"):
        print(f"  custody: checked against the merged weights (sha256 {meta['custody']['sha256']}); "
              f"after this visit {v['sha256_after']}")
    else:
        print("  note: the file records no merged weights hash (made before dvlib recorded one): its chain is not checked")
    print(f"  wrote {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from dvlib.files import read

    meta, tensors = read(args.file)
    print(json.dumps({**meta, "tensors": len(tensors)}, indent=2))
    return 0
