"""Time per sample of ``adabatch.make_train_step`` against hand-written jitted loops, in one run.

Same model (the digits CNN of ``adabatch.flax.models``), same optimizer (norm test + AdaGrad-Norm), same fixed
batch, same device-resident data:

* ``hand-written (vmap stats)``: one ``jax.jit`` function computing the per-example gradients with
  ``jax.vmap(jax.grad(...))``, the statistics (count, mean, Σ‖g_i‖²) by hand, and
  ``tx.update(mean, state, params, grad_stats=...)`` — the apples-to-apples reference;
* ``make_train_step``: the library step (``micro_batch_size=None``, and a micro-batched variant);
* ``plain gradient (no statistics)``: ``jax.grad`` of the mean loss and AdaGrad-Norm alone, reported separately
  (what the per-example statistics cost at all).

Variants are timed in interleaved rounds (so a change of machine load hits them alike); the median round is
reported. Usage: ``adabatch bench train-step [--batch 256] [--steps 20] [--rounds 7] [--markdown]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adabatch import rules
from adabatch.flax.models import CNN, classification_loss
from adabatch.optimizers import adagrad_norm
from adabatch.stats import GradStats
from adabatch.training import init_train_state, make_train_step


def build(batch: int, micro: int):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, 8, 8, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    model = CNN()
    params = model.init(jax.random.key(0), x[:1])["params"]
    loss_fn = classification_loss(model.apply)
    # A huge η keeps the decision at the batch itself: every variant does the same work every step.
    tx = optax.chain(rules.norm_test(100.0, max_batch_size=batch), adagrad_norm(0.1))

    @jax.jit
    def hand(params, opt_state, x, y):
        def one(p, xi, yi):
            return loss_fn(p, (xi[None], yi[None]))[0]

        losses, grads = jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0))(params, x, y)
        mean = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
        q = cast(jax.Array, sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))  # a sum of arrays
        stats = GradStats(count=jnp.asarray(x.shape[0], jnp.int32), mean=mean, sq_norm_sum=q)
        updates, opt_state = tx.update(mean, opt_state, params, grad_stats=stats)
        return optax.apply_updates(params, updates), opt_state, jnp.mean(losses)

    plain_tx = adagrad_norm(0.1)

    @jax.jit
    def plain(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, (x, y))))(params)
        updates, opt_state = plain_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    library = make_train_step(loss_fn, tx)
    micro_step = make_train_step(loss_fn, tx, micro_batch_size=micro)

    def run_hand(n):
        p, o = params, tx.init(params)
        for _ in range(n):
            p, o, loss = hand(p, o, x, y)
        return loss

    def run_plain(n):
        p, o = params, plain_tx.init(params)
        for _ in range(n):
            p, o, loss = plain(p, o, x, y)
        return loss

    def run_library(step):
        def run(n):
            state = init_train_state(params, tx)
            for _ in range(n):
                state, metrics = step(state, (x, y))
            return metrics["loss"]

        return run

    return {
        "hand-written (vmap stats)": run_hand,
        "make_train_step": run_library(library),
        f"make_train_step (micro-batch {micro})": run_library(micro_step),
        "plain gradient (no statistics)": run_plain,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``adabatch bench train-step`` (also ``python -m adabatch.benchmarks.train_step``)."""
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return measure(parser.parse_args(argv))


def execute(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (the ``adabatch bench train-step`` entry point)."""
    measure(args)
    return 0


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Time the variants; print and return the median time per sample of each."""
    for name in ("batch", "micro", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be a positive integer, got {getattr(args, name)}")
    variants = build(args.batch, args.micro)
    for run in variants.values():  # compile and warm up
        jax.block_until_ready(run(2))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(run(args.steps))
            times[name].append((time.perf_counter() - start) / (args.steps * args.batch))
    per_sample = {name: statistics.median(t) for name, t in times.items()}
    reference = per_sample["hand-written (vmap stats)"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()})"
    print(f"batch {args.batch}, {args.steps} steps x {args.rounds} interleaved rounds (median); {machine}")
    if args.markdown:
        print("\n| variant | µs / sample | ratio to hand-written |\n|---|---:|---:|")
    for name, value in per_sample.items():
        if args.markdown:
            print(f"| {name} | {value * 1e6:.2f} | {value / reference:.3f} |")
        else:
            print(f"{name:<36} {value * 1e6:8.2f} µs/sample   ratio {value / reference:.3f}")
    return per_sample


if __name__ == "__main__":
    main()
