"""The ``vstore`` command line: parses arguments and calls one library function per command.

Each command group lives in its own module with ``register(subparsers)``; every handler returns an
exit code. A :class:`~vstore.errors.VstoreError` ends in a one-line message and exit code 2; the
parameters a :class:`~vstore.errors.UsageError` names are shown as the flags that set them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rich.markup import escape

from .. import native_status
from .._version import __version__
from ..errors import UsageError, VstoreError, disk_full
from .common import FLAGS, console_err

__all__ = ["main", "make_parser"]

_GROUPS = ("vstore.cli.build", "vstore.cli.data", "vstore.cli.rank", "vstore.cli.ablate", "vstore.cli.study",
           "vstore.cli.report", "vstore.cli.show", "vstore.cli.compare")


def make_parser() -> argparse.ArgumentParser:
    """The full argument parser (every command group that is installed)."""
    parser = argparse.ArgumentParser(
        prog="vstore",
        description=(
            "Find the neurons of a language model that encode a concept, out of core.\n"
            "Pipeline: build (model + stories -> Zarr store) -> rank (scores -> neuron sets) -> "
            "ablate (value consistency with those neurons switched off)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vstore {__version__}\n{native_status()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _GROUPS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 command failed its own test, 2 bad input)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except VstoreError as e:
        msg = e.for_cli(FLAGS) if isinstance(e, UsageError) else str(e)
        console_err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
        return 2
    except BrokenPipeError:  # the reader went away (`vstore info --json | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a full disk while writing a result, a cache, a story file: one line, not a traceback
        full = disk_full(e, "an output")
        if full is None:
            raise
        console_err.print(f"[bold red]error:[/] {escape(str(full))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console_err.print("interrupted; an incomplete store resumes when the same build is run again")
        return 130


if __name__ == "__main__":
    sys.exit(main())
