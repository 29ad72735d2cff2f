"""``adabatch demo``: an adaptive batch size against a fixed small and a fixed large batch on digits.

Three runs of an MLP (one hidden layer of 32) on scikit-learn's digits, all with AdaGrad and the same seed, with the
settings that did best in ``adabatch experiment adadagrad`` (docs/experiments.md):

* ``small``: a fixed batch of ``--batch-size`` (8) examples for ``--steps`` steps, learning rate ``--lr``;
* ``adaptive``: the noise-scale rule (``--rule``, constant ``--eta``: it asks for about B_simple/η² examples),
  starting at ``--batch-size`` and capped at ``--max-batch-size``, learning rate ``--adaptive-lr``, for a quarter
  as many steps;
* ``large``: a fixed batch of ``--large-batch-size`` for a quarter as many steps, learning rate ``--lr``.

The *target* is the small-batch run's final test accuracy (the mean of its last three evaluations, to damp the
noise of a 359-example test set) less ``--target-tolerance`` (0.005, as in the experiment); a run *reaches* it at
the first evaluation where the mean of its last three evaluations is at least the target. Every ratio compares
steps (samples) *to the target* on both sides. Writes ``runs/<name>/``: ``metrics.jsonl``, ``summary.json``, PNG
plots.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from adabatch.cli._args import at_least, check, choice, non_negative_float, output_dir, positive_float
from adabatch.cli._train import RULES, build_tx, run_config, write_plots

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
    """One row per run; every ratio compares steps (samples) *to the target* on both sides."""
    base = reached(histories["small"], target)
    lines = [
        f"target: {target:.4f}, the small-batch run's final test accuracy (mean of its last 3 evaluations) less the "
        "tolerance",
        "ratios: the small run's steps to the target / this run's steps to the target (× fewer steps), and this "
        "run's samples to the target / the small run's (× samples)",
        "",
        f"{'run':<10}{'batch':>10}{'steps':>7}{'samples':>9}{'test acc':>10}  {'target at step':>14}"
        f"{'samples':>9}{'× fewer steps':>15}{'× samples':>11}{'compiles':>10}{'wall s':>8}",
    ]
    for name, summary in summaries.items():
        sizes = summary["batch_sizes"]
        batch = f"{sizes[0]}" if min(sizes) == max(sizes) else f"{sizes[0]}→{max(sizes)}"
        hit = reached(histories[name], target)
        at = ("not reached", "", "", "") if hit is None else (f"{hit[0]}", f"{hit[1]}", "", "")
        if hit is not None and base is not None and name != "small":
            at = (at[0], at[1], f"{base[0] / hit[0]:.2f}", f"{hit[1] / base[1]:.2f}")
        lines.append(
            f"{name:<10}{batch:>10}{summary['steps']:>7}{summary['samples']:>9}{summary['test_accuracy']:>10.4f}  "
            f"{at[0]:>14}{at[1]:>9}{at[2]:>15}{at[3]:>11}{summary['compilations']:>10}{summary['wall_time_s']:>8.1f}"
        )
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    from adabatch.datasets import load_digits
    from adabatch.flax.models import MLP

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
    model = MLP(features=(8,) if args.quick else (32,))
    short = max(args.steps // 4, 1)
    fixed = {"rule": "none", "optimizer": "adagrad", "lr": args.lr, "eta": args.eta}
    configs = {
        "small": (fixed, args.batch_size, args.steps),
        "adaptive": (
            {"rule": args.rule, "optimizer": "adagrad", "lr": args.adaptive_lr, "eta": args.eta},
            args.batch_size,
            short,
        ),
        "large": (fixed, args.large_batch_size, short),
    }
    summaries: dict[str, Any] = {}
    histories: dict[str, list[dict]] = {}
    with open(os.path.join(out, "metrics.jsonl"), "w") as metrics_file:
        for name, (config, batch_size, steps) in configs.items():
            if not args.quiet:
                print(f"[{name}] batch {batch_size}{' (adaptive)' if name == 'adaptive' else ''}, {steps} steps")
            tx = build_tx(**config, max_batch_size=args.max_batch_size, init_batch_size=args.batch_size)
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
    target = _smoothed(histories["small"])[-1][2] - args.target_tolerance
    base = reached(histories["small"], target)
    for name, summary in summaries.items():
        hit = reached(histories[name], target)
        summary["target_test_accuracy"] = target
        summary["reached_target"] = None if hit is None else {"steps": hit[0], "samples": hit[1]}
        # like for like: steps and samples *to the target* on both sides
        summary["fewer_steps_to_target"] = base[0] / hit[0] if hit and base else None
        summary["samples_to_target_ratio"] = hit[1] / base[1] if hit and base else None
        config, batch_size, _ = configs[name]
        summary["config"] = config | {
            "seed": args.seed,
            "batch_size": batch_size,
            "max_batch_size": args.max_batch_size,
            "model": "MLP(32)" if not args.quick else "MLP(8)",
        }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    write_plots(out, histories, title="digits demo", target=target, cap=args.max_batch_size)
    print(_table(summaries, histories, target))
    adaptive = summaries["adaptive"]
    if adaptive["fewer_steps_to_target"] is None:
        print("\nadaptive: did not reach the target (or the small run did not)")
    else:
        fewer, ratio = adaptive["fewer_steps_to_target"], adaptive["samples_to_target_ratio"]
        met = "meets" if fewer >= 2 and ratio <= 1.5 else "misses"
        print(
            f"\nadaptive against small, to the target: {fewer:.2f}× fewer steps with {ratio:.2f}× the samples "
            f"({met} the goal of ≥ 2× fewer steps with ≤ 1.5× the samples)"
        )
    print(f"\nwrote {out}/metrics.jsonl, summary.json and plots")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="an adaptive batch size (noise-scale rule + AdaGrad) vs fixed small and large batches on digits",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--name", default="demo", help="write runs/<name>/")
    parser.add_argument("--out", type=output_dir, default=None, help="output directory (overrides --name)")
    parser.add_argument("--steps", type=at_least(4), default=2000, help="steps of the small run (others: a quarter)")
    parser.add_argument("--batch-size", type=at_least(2), default=8, help="small batch, and the adaptive run's first")
    parser.add_argument("--max-batch-size", type=at_least(2), default=1024, help="the rule's cap")
    parser.add_argument("--large-batch-size", type=at_least(1), default=256, help="the large fixed batch")
    parser.add_argument("--rule", type=choice(RULES[:-1], "rule"), default="noise_scale", help="the adaptive rule")
    parser.add_argument("--eta", type=positive_float, default=1.0, help="the rule's constant (asks for B_simple/η²)")
    parser.add_argument("--lr", type=positive_float, default=0.0625, help="AdaGrad learning rate, fixed batches")
    parser.add_argument("--adaptive-lr", type=positive_float, default=0.125, help="AdaGrad learning rate, adaptive")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of the initialisation and data order")
    parser.add_argument("--eval-every", type=at_least(1), default=10, help="evaluate the test accuracy every N steps")
    parser.add_argument(
        "--target-tolerance", type=non_negative_float, default=0.005, help="target = small run's final accuracy − this"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny MLP (smoke test)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_main)
