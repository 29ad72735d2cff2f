"""The ``adabatch`` command line: one sub-command per private module of this package
(``_demo``, ``_train``, ``_experiment``, ``_bench``, ``_launch``).

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` (called with the
parsed namespace, returning an exit code). Modules are imported only when the command line is built, so the
library itself never imports the command-line dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from adabatch.cli._args import CommandError, Parser

__all__ = ["build_parser", "main"]

COMMAND_MODULES = ("demo", "train", "experiment", "bench", "launch")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command."""
    parser = Parser(
        prog="adabatch", description="Adaptive batch sizes and learning rates from gradient noise (JAX + Optax)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"adabatch.cli._{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"adabatch.cli._{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:  # flags that cannot run together: one line naming them, nothing written
        print(f"adabatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
