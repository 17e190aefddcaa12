"""``dvlib site finetune|restore`` (run at a hospital) and ``dvlib merge`` (run by the coordinator).

Thin wrappers over :mod:`dvlib.site`; see ``docs/multi-site.md`` for the workflow.
"""
from __future__ import annotations

import argparse

from dvlib.presets import PRESETS

# kept here (not imported) so that building the parser does not import torch; the library checks them
RESTORE_MODES = ("recalibrate", "finetune_epoch")
MERGE_METHODS = ("data_vector", "params_mean", "random_vector", "ties", "dare", "weighted")
BN_MODES = ("mean", "pretrained", "arithmetic")
_DATA_HELP = ("local images: a folder with one sub-folder per class (optional patients.csv mapping file "
              "stems to patient ids), or a registered dataset name")


def register(sub) -> None:
    site = sub.add_parser("site", help="hospital side of the multi-site workflow: fine-tune and export a "
                                       "data-vector file; restore a merged model's BatchNorm statistics",
                          description="Commands a hospital runs on its own data. Nothing leaves the hospital "
                                      "except the files these commands write (see docs/multi-site.md).")
    ssub = site.add_subparsers(dest="site_command", metavar="{finetune,restore}")
    ssub.required = True

    p = ssub.add_parser("finetune", help="fine-tune on local data and write the site's data-vector file",
                        description="Fine-tune the shared pretrained network on the local images (a patient-"
                                    "disjoint train/test split of them) and write a .safetensors vector file "
                                    "holding only the data vector, the new head, BatchNorm statistics and "
                                    "metadata (no images, no file names, no patient ids).")
    p.add_argument("--data", required=True, metavar="DIR_OR_DATASET", help=_DATA_HELP)
    p.add_argument("--out", required=True, help="vector file to write, e.g. site_a.dv.safetensors")
    p.add_argument("--site", help="site label recorded in the file (default: the data folder's name)")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="the class list all sites agreed on, in order (default: this site's class folders); "
                        "needed when a site has no images of some class, so that the vector files merge")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="settings preset (default: quick)")
    p.add_argument("--arch", help="efficientnet_lite0, resnet50 or smallcnn (default: the preset's)")
    p.add_argument("--weights", help="pretrained weights: imagenet, random or a path (default: the preset's); "
                                     "every site must use the same")
    p.add_argument("--head", choices=["append", "replace"], help="head mode (default: the preset's)")
    p.add_argument("--image-size", type=int, help="crop size in pixels")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--seed", type=int, help="seed of the local split, model build and training (default: the "
                                            "preset's)")
    p.add_argument("--test-frac", type=float, help="fraction of local patients held out for testing (default 0.2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=cmd_finetune)

    p = ssub.add_parser("restore", help="one restore visit: accumulate the merged model's BatchNorm statistics "
                                        "over the local images (or one labelled epoch)",
                        description="Run at each hospital in turn. recalibrate (label-free): the first visit "
                                    "resets the BatchNorm statistics, later visits continue the cumulative "
                                    "average, so the result equals recalibrating over all visited sites' images "
                                    "at once. The output records every visit (site, images).")
    p.add_argument("model", help="merged (or already restored) checkpoint, .safetensors")
    p.add_argument("--data", required=True, metavar="DIR_OR_DATASET", help=_DATA_HELP)
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. merged.bn.safetensors")
    p.add_argument("--mode", default="recalibrate", choices=RESTORE_MODES,
                   help="recalibrate (images only, default) or finetune_epoch (one epoch with labels)")
    p.add_argument("--site", help="site label recorded in the visit (default: the data folder's name)")
    p.add_argument("--split", default="train", choices=["train", "all"],
                   help="local images used: the site's train split (default; keeps the local test split "
                        "unseen) or all")
    p.add_argument("--split-seed", type=int, help="seed of the local split (default: the sites' recorded one)")
    p.add_argument("--test-frac", type=float, help="test fraction of the local split (default: the recorded one)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--image-size", type=int, help="crop size (default: the model's recorded one)")
    p.add_argument("--lr", type=float, help="learning rate for finetune_epoch (default: the sites')")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--allow-revisit", action="store_true",
                   help="let a site label contribute twice to the same BatchNorm statistics")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("merge", help="coordinator: merge site data-vector files into one model checkpoint",
                       description="Check that the vector files can be merged (every problem reported at once), "
                                   "rebuild the pretrained weights from their metadata (refused unless the "
                                   "sha256 matches), merge and write a checkpoint (+ .json sidecar).")
    p.add_argument("files", nargs="+", metavar="FILE", help="site vector files (.safetensors), at least 2")
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. merged.safetensors")
    p.add_argument("--method", default="data_vector", choices=MERGE_METHODS,
                   help="merge method (default: data_vector = theta_pre + lam * sum(tau_i))")
    p.add_argument("--lam", type=float, default=0.5, help="scaling lambda (default 0.5)")
    p.add_argument("--bn-buffers", default="mean", choices=BN_MODES,
                   help="BatchNorm buffers of the merged model before restore (default: mean)")
    p.add_argument("--weights", help="pretrained weights (imagenet, random or a path) instead of the spec "
                                     "recorded in the files; must match their sha256")
    p.add_argument("--seed", type=int, default=0, help="seed of random methods (random_vector, dare)")
    p.set_defaults(func=cmd_merge)


def cmd_finetune(args: argparse.Namespace) -> int:
    from dvlib.site import finetune_site, format_metrics

    meta = finetune_site(args.data, args.out, preset=args.preset, site=args.site, device=args.device,
                         progress=args.progress, classes=args.classes, arch=args.arch, weights=args.weights, head=args.head,
                         image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, test_frac=args.test_frac)
    print(f"site {meta['site']}: {meta['sample_count']} training / {meta['test_count']} test images, "
          f"{meta['arch']} ({meta['weights']}, head {meta['head']}), {meta['hyperparameters']['epochs']} epochs")
    print(f"  local test: {format_metrics(meta['metrics'])}")
    print(f"  wrote {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from dvlib.site import merge_sites

    meta = merge_sites(args.files, args.out, method=args.method, lam=args.lam, bn_buffers=args.bn_buffers,
                       weights=args.weights, seed=args.seed)
    sites = ", ".join(f"{s['site']} ({s['sample_count']})" for s in meta["sources"])
    print(f"merged {len(meta['sources'])} sites [{sites}] with {meta['method']} (lam={meta['lam']}, "
          f"bn_buffers={meta['bn_buffers']}); pretrained sha256 {meta['pretrained_sha256'][:16]}...")
    for w in meta["warnings"]:
        print(f"  note: {w}")
    print(f"  wrote {args.out}; next: `dvlib site restore {args.out} --data DIR --out ...` at each site")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from dvlib.site import restore_site

    meta = restore_site(args.model, args.data, args.out, mode=args.mode, site=args.site, split=args.split,
                        split_seed=args.split_seed, test_frac=args.test_frac, batch_size=args.batch_size,
                        image_size=args.image_size, lr=args.lr, device=args.device,
                        allow_revisit=args.allow_revisit)
    v = meta["restore_visits"][-1]
    done = ", ".join(f"{x['site']}:{x['mode']}({x['images']})" for x in meta["restore_visits"])
    print(f"site {v['site']}: {v['mode']} on {v['images']} {v['split']} images"
          + (" (statistics reset first)" if v.get("reset") else ""))
    print(f"  visits so far: {done}; BatchNorm statistics over {meta['bn_images']} images")
    print(f"  wrote {args.out}")
    return 0
