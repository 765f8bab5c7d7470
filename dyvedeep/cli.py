"""The ``dyvedeep`` command. Each stage module registers its own sub-command through a
``register(subparsers)`` function; this file only wires them together and turns a
:class:`~dyvedeep.errors.DyveError` into one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Sequence

from . import __version__
from .errors import DyveError

# Stage modules that provide sub-commands, in the order of the data flow.
COMMAND_MODULES = (
    "dyvedeep.fetch",
    "dyvedeep.convert",
    "dyvedeep.evaluate",
    "dyvedeep.bench",
    "dyvedeep.calibrate",
    "dyvedeep.gate_calibrate",
    "dyvedeep.prune",
    "dyvedeep.headroom",
    "dyvedeep.remote",
)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error (sub-command
    parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        print(f"dyvedeep: error: {DyveError(f'{self.prog}: {message}')}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command registered."""
    parser = OneLineParser(prog="dyvedeep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dyvedeep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # stage not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dyvedeep`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DyveError as err:
        print(f"dyvedeep: error: {err}", file=sys.stderr)
        return err.exit_code
    except MemoryError:
        subject = getattr(args, "model", None) or getattr(args, "source", None) or args.command
        print(f"dyvedeep: error: {DyveError(f'{subject}: out of memory (input too large?)')}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or directory the checks before could not foresee
        where = f"{err.filename}: " if err.filename else ""
        print(f"dyvedeep: error: {DyveError(f'{where}{err.strerror or err}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dyvedeep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
