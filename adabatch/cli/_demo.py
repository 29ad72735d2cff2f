"""``adabatch demo``: AdAdaGrad-Norm with the norm test against a fixed small and a fixed large batch.

Three runs of ``adabatch.flax.models.CNN`` on scikit-learn's digits, all with AdaGrad-Norm and the same learning
rate and seed:

* ``small``: a fixed batch of ``--batch-size`` examples for ``--steps`` steps;
* ``adaptive``: the norm test (``--eta``), starting at ``--batch-size`` and capped at ``--max-batch-size``, for
  half as many steps;
* ``large``: a fixed batch of ``--large-batch-size`` for half as many steps.

The *target* is the small-batch run's final test accuracy (the mean of its last three evaluations, to damp the
noise of a 359-example test set); a run *reaches* it at the first evaluation where the mean of its last three
evaluations is at least the target. The table reports, for each run, the final test accuracy, steps, samples and
where it reached the target. Writes ``runs/<name>/``: ``metrics.jsonl``, ``summary.json``, PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from adabatch.cli._args import at_least, check, output_dir, positive_float
from adabatch.cli._train import build_tx, run_config, write_plots

__all__ = ["reached", "register"]


def _smoothed(history: list[dict]) -> list[tuple[int, int, float]]:
    """(step, samples, mean of the last three test accuracies) at every evaluation."""
    points = [(h["step"], h["samples"], h["test_accuracy"]) for h in history if "test_accuracy" in h]
    out = []
    for i, (step, samples, _) in enumerate(points):
        window = [acc for _, _, acc in points[max(0, i - 2) : i + 1]]
        out.append((step, samples, sum(window) / len(window)))
    return out


def reached(history: list[dict], target: float) -> tuple[int, int] | None:
    """(steps, samples) at the first evaluation whose smoothed test accuracy is at least ``target``, else None."""
    return next(((step, samples) for step, samples, acc in _smoothed(history) if acc >= target), None)


def _table(summaries: dict[str, dict], histories: dict[str, list[dict]], target: float) -> str:
    small = summaries["small"]
    lines = [
        f"target: the small-batch run's final test accuracy {target:.4f} (mean of its last 3 evaluations)",
        "",
        f"{'run':<10}{'batch':>10}{'steps':>8}{'samples':>9}{'test acc':>10}  {'reached the target at':<40}"
        f"{'compiles':>8}{'wall s':>8}",
    ]
    for name, summary in summaries.items():
        sizes = summary["batch_sizes"]
        batch = f"{sizes[0]}" if min(sizes) == max(sizes) else f"{sizes[0]}→{max(sizes)}"
        hit = reached(histories[name], target)
        if hit is None:
            where = "not reached"
        elif name == "small":
            where = f"step {hit[0]} (its own final accuracy)"
        else:
            where = f"step {hit[0]} ({small['steps'] / hit[0]:.1f}× fewer), {hit[1] / small['samples']:.2f}× samples"
        lines.append(
            f"{name:<10}{batch:>10}{summary['steps']:>8}{summary['samples']:>9}{summary['test_accuracy']:>10.4f}  "
            f"{where:<40}{summary['compilations']:>8}{summary['wall_time_s']:>8.1f}"
        )
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    from adabatch.datasets import load_digits
    from adabatch.flax.models import CNN, MLP

    if args.quick:
        args.steps, args.eval_every = min(args.steps, 8), min(args.eval_every, 4)
        args.max_batch_size, args.large_batch_size = min(args.max_batch_size, 32), min(args.large_batch_size, 32)
    check(
        2 <= args.batch_size <= args.max_batch_size,
        f"--batch-size {args.batch_size} must be at least 2 (the adaptive run's rule estimates a variance) and at "
        f"most --max-batch-size {args.max_batch_size}",
    )
    out = args.out or os.path.join("runs", args.name)
    os.makedirs(out, exist_ok=True)
    data = load_digits(seed=args.seed)
    model = MLP(features=(16,)) if args.quick else CNN()
    half = args.steps // 2
    configs = {
        "small": (
            build_tx("none", "adagrad_norm", lr=args.lr, eta=args.eta, max_batch_size=args.max_batch_size),
            args.batch_size,
            args.steps,
        ),
        "adaptive": (
            build_tx(
                "norm",
                "adagrad_norm",
                lr=args.lr,
                eta=args.eta,
                max_batch_size=args.max_batch_size,
                init_batch_size=args.batch_size,
            ),
            args.batch_size,
            half,
        ),
        "large": (
            build_tx("none", "adagrad_norm", lr=args.lr, eta=args.eta, max_batch_size=args.max_batch_size),
            args.large_batch_size,
            half,
        ),
    }
    summaries: dict[str, Any] = {}
    histories: dict[str, list[dict]] = {}
    with open(os.path.join(out, "metrics.jsonl"), "w") as metrics_file:
        for name, (tx, batch_size, steps) in configs.items():
            if not args.quiet:
                print(f"[{name}] batch {batch_size}{' (adaptive)' if name == 'adaptive' else ''}, {steps} steps")
            summaries[name], histories[name] = run_config(
                name,
                tx,
                data=data,
                model=model,
                batch_size=batch_size,
                steps=steps,
                seed=args.seed,
                eval_every=args.eval_every,
                metrics_file=metrics_file,
                progress=not args.quiet,
            )
    target = _smoothed(histories["small"])[-1][2]
    for name, summary in summaries.items():
        hit = reached(histories[name], target)
        summary["target_test_accuracy"] = target
        summary["reached_target"] = None if hit is None else {"steps": hit[0], "samples": hit[1]}
        summary["config"] = {
            "lr": args.lr,
            "eta": args.eta,
            "seed": args.seed,
            "batch_size": configs[name][1],
            "rule": "norm" if name == "adaptive" else "none",
            "optimizer": "adagrad_norm",
            "max_batch_size": args.max_batch_size,
        }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    write_plots(out, histories)
    print(_table(summaries, histories, target))
    print(f"\nwrote {out}/metrics.jsonl, summary.json and plots")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="adaptive batch size (AdAdaGrad-Norm) vs fixed small and large batches on digits",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--name", default="demo", help="write runs/<name>/")
    parser.add_argument("--out", type=output_dir, default=None, help="output directory (overrides --name)")
    parser.add_argument("--steps", type=at_least(2), default=400, help="steps of the small-batch run (others: half)")
    parser.add_argument("--batch-size", type=at_least(2), default=16, help="small batch, and the adaptive run's first")
    parser.add_argument("--max-batch-size", type=at_least(2), default=48, help="the rule's cap")
    parser.add_argument("--large-batch-size", type=at_least(1), default=256, help="the large fixed batch")
    parser.add_argument("--eta", type=positive_float, default=0.8, help="the norm test's η")
    parser.add_argument("--lr", type=positive_float, default=0.3, help="AdaGrad-Norm learning rate (all runs)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of the initialisation and data order")
    parser.add_argument("--eval-every", type=at_least(1), default=5, help="evaluate the test accuracy every N steps")
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny MLP (smoke test)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_main)
