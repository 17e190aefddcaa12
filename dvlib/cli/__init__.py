"""The ``dvlib`` command line: ``dvlib <command> --help`` for each command.

Every failure a user can cause (a bad flag value, a bad or hostile input file, a failed write) is a
:class:`~dvlib.io.DvlibError`: one message naming the file, key or value, exit code 2, no traceback,
nothing half-written left behind. Ctrl-C exits 130 and SIGTERM 143, with one line; the files being
written are discarded (:func:`dvlib.io.atomic_path` removes its temporary file on any exception).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

from dvlib import __version__
from dvlib.io import DvlibError

# each module defines register(subparsers) and sets func=handler(args) -> int on its parsers
COMMAND_MODULES = ["dvlib.cli.train_cmds", "dvlib.cli.data_cmds", "dvlib.cli.run_cmd", "dvlib.cli.site_cmds"]


class UsageError(DvlibError):
    """A bad command line (unknown flag, a value out of range): argparse's message, exit code 2."""


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that every open write is discarded on the way out."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a :class:`UsageError` (printed and exit 2 by :func:`main`)
    instead of a ``SystemExit`` from inside ``parse_args``; subcommand parsers are of this class too."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dvlib", description="Merge medical image classifiers fine-tuned at several hospitals "
                                  "(data vectors) and report the results.")
    parser.add_argument("--version", action="version", version=f"dvlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_exception():
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _error(message: str) -> int:
    print(f"dvlib: error: {message}", file=sys.stderr)
    return 2


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _error(str(e))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DvlibError as e:
        return _error(str(e))
    except OSError as e:  # an environment failure no check foresaw (I/O error, a file vanishing): named
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _error(f"{where}{e.strerror or e}")


def main(argv: list[str] | None = None) -> int:
    try:
        with _sigterm_as_exception():
            return _main(argv)
    except KeyboardInterrupt:
        print("dvlib: interrupted; files being written were discarded", file=sys.stderr)
        return 130
    except Terminated:
        print("dvlib: terminated; files being written were discarded", file=sys.stderr)
        return 143
