"""``adabatch experiment``: experiments that test the papers' claims (see ``docs/experiments.md``).

``adabatch experiment adadagrad [--data digits|text] [--quick] [--out DIR]`` runs AdAdaGrad's batch-size tests with
AdaGrad and AdaGrad-Norm against fixed batches, a batch-size warm-up and AdaScale at equal sample budgets
(:mod:`adabatch.experiments.adadagrad`).

``adabatch experiment optimizers [--data digits|text] [--quick] [--out DIR]`` compares every optimizer of the library
with a fixed batch and with the norm test (and SGD with the learned optimal batch size) at equal sample budgets
(:mod:`adabatch.experiments.optimizers`).

``adabatch experiment batch-hessian [--data digits|text|both] [--quick] [--out DIR] [--seeds N] [--lr-results DIR]
[--reanalyse]`` measures the extremal eigenvalues of batch Hessians and Gauss-Newton matrices against the full-data
ones, the learning rates they predict, and compares them with lr-vs-batch's measured optima
(:mod:`adabatch.experiments.batch_hessian`).

``adabatch experiment lr-vs-batch --optimizer sgd|adam|adabelief|sign [--data digits|text] [--quick] [--out DIR]``
trains a grid of batch sizes × learning rates, finds the optimal learning rate per batch size, fits the linear,
square-root and surge laws with confidence intervals, measures the gradient noise scale and writes
``results.json``, ``summary.md`` and PNG plots to ``DIR`` (default ``results/lr-vs-batch-<optimizer>-<data>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any

from adabatch.cli._args import at_least, name_list, output_dir, positive_float

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``experiment`` command and its sub-commands."""
    from adabatch.experiments.lr_vs_batch import DATASETS, OPTIMIZERS

    parser = subparsers.add_parser("experiment", help="run an experiment that tests a paper's claim")
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    lr = experiments.add_parser(
        "lr-vs-batch",
        help="optimal learning rate against batch size: linear, sqrt and surge laws vs the measured noise scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lr.add_argument("--optimizer", choices=OPTIMIZERS, required=True)
    lr.add_argument("--data", choices=DATASETS, default="digits", help="digits (MLP) or text (small transformer LM)")
    lr.add_argument("--quick", action="store_true", help="a tiny grid that runs in seconds (for tests)")
    lr.add_argument("--out", default=None, help="output folder (default results/lr-vs-batch-<optimizer>-<data>)")
    lr.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    lr.add_argument("--samples", type=int, default=None, help="override the training budget in examples")
    lr.add_argument("--no-progress", action="store_true", help="no progress bar")
    lr.set_defaults(func=_lr_vs_batch)
    for name in _VARIABLE_BATCH:
        _register_variable_batch(experiments, name)
    _register_batch_hessian(experiments)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


# name -> (help, the protocol fields a flag may override, how to print a result's conclusions)
_VARIABLE_BATCH = {
    "adadagrad": (
        "AdAdaGrad's batch-size tests against fixed batches, a warm-up and AdaScale at equal sample budgets",
        ("seeds", "epochs"),
        lambda result: [f"  {line}" for line in result["analysis"]["verdict"]],
    ),
    "optimizers": (
        "every optimizer with a fixed batch and with the norm test at equal sample budgets",
        ("seeds", "optimizers"),
        lambda result: [
            f"  {c['optimizer']}: {c['claim']}: {c['verdict']} ({c['evidence']})" for c in result["analysis"]["claims"]
        ],
    ),
}


def _register_variable_batch(experiments: argparse._SubParsersAction, name: str) -> None:
    """One experiment built on the variable-batch engine: the same flags, the same run / re-analyse logic."""
    module = importlib.import_module(f"adabatch.experiments.{name}")
    help_text, overrides, _ = _VARIABLE_BATCH[name]
    parser = experiments.add_parser(
        name, help=help_text, description=(module.__doc__ or "").split("\n\n")[0] + " See docs/experiments.md."
    )
    parser.add_argument(
        "--data",
        choices=module.DATASETS,
        default="digits",
        help="digits (MLP), digits-cnn (the CNN; adadagrad only) or text (LM)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny protocol that runs in seconds (for tests)")
    parser.add_argument("--out", type=output_dir, default=None, help=f"output folder (default results/{name}-<data>)")
    parser.add_argument("--seeds", type=at_least(2), default=None, help="override the number of evaluation seeds")
    if "epochs" in overrides:
        parser.add_argument("--epochs", type=positive_float, default=None, help="override the budget in epochs")
    if "optimizers" in overrides:
        known = tuple(module.LEARNING_RATES)
        parser.add_argument(
            "--optimizers",
            type=name_list(known, "optimizer"),
            default=None,
            help=f"comma-separated optimizers to run (default: {', '.join(module.OPTIMIZERS)}; "
            f"also {', '.join(module.EXTRA_OPTIMIZERS)})",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--reanalyse", action="store_true", help="recompute summary.md and the plots from --out's results.json only"
    )
    parser.set_defaults(func=lambda args: _variable_batch(args, name))


def _reanalyse(module: Any, out: str) -> int:
    """``--reanalyse``: an experiment module's summary and plots redone from ``out/results.json`` (exit status 2,
    one line, when there is none)."""
    try:
        result = module.reanalyse(out)
    except FileNotFoundError as exc:
        print(f"--reanalyse: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}/summary.md, {', '.join(result['plots'])}")
    return 0


def _variable_batch(args: argparse.Namespace, name: str) -> int:
    module = importlib.import_module(f"adabatch.experiments.{name}")
    _, overrides, conclusions = _VARIABLE_BATCH[name]
    out = args.out or f"results/{name}-{args.data}"
    if args.reanalyse:
        return _reanalyse(module, out)
    protocol = module.default_protocol(args.data, args.quick)
    for field in overrides:
        if getattr(args, field) is not None:
            protocol = dataclasses.replace(protocol, **{field: getattr(args, field)})
            if field == "optimizers":  # an explicit choice of optimizers runs all their arms
                protocol = dataclasses.replace(protocol, only=())
    command = "adabatch " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else ""
    result = module.run(protocol=protocol, quick=args.quick, out=out, progress=not args.no_progress, command=command)
    print(f"wrote {out}/results.json, summary.md, {', '.join(result.get('plots', []))} ({result['elapsed_s']:.0f} s)")
    for line in conclusions(result):
        print(line)
    return 0


def _lr_vs_batch(args: argparse.Namespace) -> int:
    from adabatch.experiments.lr_vs_batch import default_grid, run

    grid = default_grid(args.optimizer, args.data, args.quick)
    for name in ("seeds", "samples"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                print(f"--{name} must be >= 1, got {value}", file=sys.stderr)
                return 2
            grid = dataclasses.replace(grid, **{name: value})
    out = args.out or f"results/lr-vs-batch-{args.optimizer}-{args.data}"
    command = "adabatch " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else ""
    result = run(
        args.optimizer,
        args.data,
        quick=args.quick,
        out=out,
        grid=grid,
        progress=not args.no_progress,
        command=command,
    )
    print(f"wrote {out}/results.json, summary.md, {', '.join(result.get('plots', []))} ({result['elapsed_s']:.0f} s)")
    for line in result["verdict"]:
        print(" ", line)
    return 0


def _register_batch_hessian(experiments: argparse._SubParsersAction) -> None:
    from adabatch.experiments import batch_hessian

    parser = experiments.add_parser(
        "batch-hessian",
        help="batch-Hessian and Gauss-Newton extremal eigenvalues against batch size, and the learning rates they "
        "predict vs lr-vs-batch",
        description=(batch_hessian.__doc__ or "").split("\n\n")[0] + " See docs/experiments.md.",
    )
    parser.add_argument(
        "--data", choices=(*batch_hessian.DATASETS, "both"), default="both", help="digits, text or both"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny protocol that runs in seconds (for tests)")
    parser.add_argument("--out", type=output_dir, default=None, help="output folder (default results/batch-hessian)")
    parser.add_argument("--seeds", type=at_least(1), default=None, help="override the number of seeds")
    parser.add_argument(
        "--lr-results",
        default="results",
        help="folder holding lr-vs-batch-<optimizer>-<data>/results.json (missing ones are measured here with a "
        "reduced grid)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--reanalyse", action="store_true", help="recompute summary.md and the plots from --out's results.json only"
    )
    parser.set_defaults(func=_batch_hessian)


def _batch_hessian(args: argparse.Namespace) -> int:
    from adabatch.experiments import batch_hessian

    out = args.out or "results/batch-hessian"
    if args.reanalyse:
        return _reanalyse(batch_hessian, out)
    data = batch_hessian.DATASETS if args.data == "both" else (args.data,)
    command = "adabatch " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else ""
    result = batch_hessian.run(
        data=data,
        quick=args.quick,
        out=out,
        seeds=args.seeds,
        lr_results=args.lr_results,
        progress=not args.no_progress,
        command=command,
    )
    print(f"wrote {out}/results.json, summary.md, {', '.join(result.get('plots', []))} ({result['elapsed_s']:.0f} s)")
    for name, d in result["analysis"].items():
        for c in d["claims"]:
            print(f"  {name}: {c['verdict']}: {c['claim']} ({c['evidence']})")
    return 0
