"""``dvlib data``: download, verify and describe the paper's datasets.

``register(subparsers)`` adds the ``data`` command to the main parser; each subcommand's
handler takes the argparse Namespace and returns an exit code. Errors are raised as
:class:`~dvlib.io.DvlibError` for the main entry point to print.
"""
from __future__ import annotations

import argparse
import json

from dvlib.data.download import SOURCES, download, format_info, info, verify

_NAMES = sorted(SOURCES)
_ROOT_HELP = "data root holding <NAME>/ (default: $DVLIB_DATA, else data/raw)"


def cmd_download(args: argparse.Namespace) -> int:
    dest = download(args.name, root=args.root, url=args.url, progress=not args.no_progress,
                    sha256=args.sha256, verify_hash=not args.no_verify_hash)
    report = verify(args.name, root=dest.parent)
    src = report.source or {}
    checked = "checked" if src.get("sha256_checked") else "NOT checked"
    print(f"{args.name}: installed in {dest}")
    print(f"  sha256 {src.get('sha256')} ({checked}); recorded in {dest / 'SOURCE.json'}")
    print(report.text())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(args.name, root=args.root)
    print(report.text())
    if report.ok or (report.partial and args.allow_partial):
        return 0
    return 1


def cmd_info(args: argparse.Namespace) -> int:
    d = info(args.name)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``data download|verify|info`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "data", help="download, verify and describe the paper's datasets",
        description="Download, verify and describe the paper's datasets and the ODIR fundus subset: "
                    + ", ".join(_NAMES) + ".")
    sub = p.add_subparsers(dest="data_command", metavar="{download,verify,info}")
    sub.required = True

    d = sub.add_parser(
        "download", help="download a dataset into the data root",
        description="Download NAME (resumable), check the archive's sha256, extract and validate it, "
                    "and install it as <root>/NAME/ only when everything succeeded. A failed run "
                    "leaves no dataset folder; an interrupted transfer keeps "
                    "<root>/.downloads/NAME/<file>.part and a rerun resumes it. No sha256 is recorded "
                    "for these archives yet: give --sha256 or --no-verify-hash.")
    d.add_argument("name", choices=_NAMES, metavar="NAME", help="dataset: " + ", ".join(_NAMES))
    d.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
    d.add_argument("--url", metavar="URL",
                   help="download from URL instead of the registry's (e.g. a mirror, or "
                        "file:///path/to/archive.zip for an archive downloaded by hand)")
    d.add_argument("--sha256", metavar="HEX", help="expected sha256 of the archive (64 hex characters)")
    d.add_argument("--no-verify-hash", action="store_true",
                   help="do not check the archive's sha256 (needed when none is known); the computed "
                        "hash is printed and recorded in <root>/NAME/SOURCE.json as unchecked")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_download)

    v = sub.add_parser(
        "verify", help="count images per class and patients, compare with the published numbers",
        description="Count the images per class and the patients of <root>/NAME/ and compare them "
                    "with the published counts (per-class diff table). Says plainly when the copy "
                    "is partial. Exit code 0 only when the copy is complete (or partial with "
                    "--allow-partial), else 1.")
    v.add_argument("name", choices=_NAMES, metavar="NAME", help="dataset: " + ", ".join(_NAMES))
    v.add_argument("--root", metavar="DIR", help=_ROOT_HELP)
    v.add_argument("--allow-partial", action="store_true", help="exit 0 for a partial copy too")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser(
        "info", help="source, licence, citation and published counts of a dataset",
        description="Print where NAME comes from (URL, sha256 if known), its licence, citation, "
                    "published counts, expected layout and the paper's Full Training accuracy.")
    i.add_argument("name", choices=_NAMES, metavar="NAME", help="dataset: " + ", ".join(_NAMES))
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)
    return p
