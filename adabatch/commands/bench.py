"""``adabatch bench``: benchmarks. ``adabatch bench stats [--quick] [--out docs/benchmarks.md]`` times and sizes the
per-example statistics producers against a plain gradient step and the PyTorch peers (``benchmarks/stats.py``).

The benchmark scripts live in the source repository's ``benchmarks/`` folder (they are development tools, with
optional dependencies in the ``bench`` extra), so this command needs a source checkout (an editable install).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["add_stats_arguments", "load_benchmark", "register"]

BENCHMARKS = {"stats": "per-example statistics: ghost, vmap, microbatch, JVP vs a plain step and PyTorch peers"}


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` from the source checkout this package lives in."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(
            f"adabatch bench {name} needs the source repository (benchmarks/{name}.py not found at {path})"
        )
    spec = importlib.util.spec_from_file_location(f"adabatch_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: argparse.Namespace) -> int:
    return load_benchmark(args.benchmark).execute(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its sub-commands to the ``adabatch`` parser."""
    parser = subparsers.add_parser("bench", help="run a benchmark", description=__doc__.splitlines()[0])
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    stats = benchmarks.add_parser("stats", help=BENCHMARKS["stats"])
    add_stats_arguments(stats)
    stats.set_defaults(func=_run)


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``adabatch bench stats`` (also used by ``python benchmarks/stats.py``)."""
    parser.add_argument("--quick", action="store_true", help="tiny models, one batch size (a smoke test)")
    parser.add_argument("--out", default=None, help="write the '## Per-example statistics' section into this file")
    parser.add_argument("--models", default="mlp,cnn,lm", help="comma-separated subset of mlp,cnn,lm")
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes (default 32,64,...,1024)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    parser.add_argument("--conclusion", default=None, help="a Markdown file whose text ends the section")
