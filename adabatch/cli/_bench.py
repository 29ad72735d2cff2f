"""``adabatch bench``: benchmarks, from the installed :mod:`adabatch.benchmarks` package (its optional PyTorch
peers come with the ``bench`` extra).

* ``adabatch bench stats [--quick] [--out docs/benchmarks.md]``: the per-example statistics producers against a
  plain gradient step and the PyTorch peers;
* ``adabatch bench train-step [--markdown]``: ``make_train_step`` against hand-written jitted loops.
* ``adabatch bench curvature [--quick] [--out docs/benchmarks.md]``: a Hessian-vector product, a Lanczos step and
  SLQ spectra against a plain gradient.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["register"]

BENCHMARKS = {
    "stats": ("stats", "per-example statistics: ghost, vmap, microbatch, JVP vs a plain step and PyTorch peers"),
    "train-step": ("train_step", "time per sample of make_train_step vs hand-written jitted loops"),
    "curvature": ("curvature", "one HVP, one Lanczos step and SLQ spectra vs a plain gradient"),
    "multihost": ("multihost", "step time of 2 processes x 2 CPU devices vs 1 process x 4 devices (gloo)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its sub-commands to the ``adabatch`` parser."""
    parser = subparsers.add_parser("bench", help="run a benchmark", description=__doc__.splitlines()[0])
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for command, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(f"adabatch.benchmarks.{module_name}")
        sub = benchmarks.add_parser(command, help=help_text, description=(module.__doc__ or help_text).splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(func=module.execute)
