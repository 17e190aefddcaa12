"""The ``dvlib`` command line: ``dvlib <command> --help`` for each command."""
from __future__ import annotations

import argparse
import importlib
import sys

from dvlib import __version__
from dvlib.io import DvlibError

# each module defines register(subparsers) and sets func=handler(args) -> int on its parsers
COMMAND_MODULES = ["dvlib.cli.train_cmds", "dvlib.cli.data_cmds", "dvlib.cli.run_cmd", "dvlib.cli.site_cmds"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvlib", description="Merge medical image classifiers fine-tuned at several hospitals "
                                  "(data vectors) and report the results.")
    parser.add_argument("--version", action="version", version=f"dvlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DvlibError as e:
        print(f"dvlib: error: {e}", file=sys.stderr)
        return 2
