r"""One training run whose batch size changes from step to step, compiled once as a single ``lax.scan``.

The batch size :math:`b_t` of step :math:`t` comes from a *schedule* (a fixed batch, or a warm-up that doubles it
every ``period`` steps) or from a *rule* (any transformation whose state holds a ``next_batch_size`` decision,
read with :func:`adabatch.next_batch_size`). Shapes must be static under ``jit``, so each step runs in the branch
of a ``lax.switch`` whose *bucket* (a static size :math:`P\ge b_t`: powers of two and the cap) holds the batch,
with the :math:`P-b_t` padding examples masked out of the gradient and of the statistics. The work per step is
therefore at most twice that of the batch itself, and one compilation serves every batch size, learning rate,
seed and rule constant (all are traced arguments).

Examples are read in order from a per-seed *stream* (concatenated random permutations of the training set, i.e.
sampling without replacement within epochs as a shuffling data loader does), so every arm of one seed sees the
same examples in the same order (common random numbers: differences between arms are not differences of data).
The run stops at a budget of examples; the last batch is cut to the examples left, so all arms consume exactly
the same number. Evaluations happen at a fixed grid of sample counts *and* of step counts (geometric), so curves
are resolved both against samples and against steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adabatch import curvature as curv
from adabatch import optimizers as opt
from adabatch import rules
from adabatch import stats as st

__all__ = ["Problem", "Run", "buckets", "eval_marks", "make_run", "record", "rle", "stream"]

_FOREVER = 1 << 30  # a warm-up period that never doubles: a fixed batch


@dataclasses.dataclass(frozen=True)
class Problem:
    """A supervised problem: per-example loss, initialiser, training arrays and the evaluation function.

    ``evaluate(params) -> dict`` returns scalar metrics (``test`` — accuracy for classification, loss for a language
    model — and ``val_loss``, ``val_metric``); ``higher_is_better`` says how ``test`` orders.
    """

    name: str
    loss_fn: Callable  # (params, (x, y)) -> (b,)
    init_fn: Callable  # key -> params
    x: jax.Array
    y: jax.Array
    evaluate: Callable  # params -> dict of scalars
    higher_is_better: bool
    metric: str  # name of the test metric
    noise_examples: int = 0  # B_simple on the first this many training examples (0: all of them)


@dataclasses.dataclass(frozen=True)
class Run:
    """Static description of what one compiled run does (everything else is a traced argument)."""

    make_tx: Callable[[Any], optax.GradientTransformation]  # constant -> transformation with learning rate 1
    rule: bool  # the batch size comes from the transformation's ``next_batch_size`` decision
    needs: st.GradStatsNeeds | None  # statistics the transformation reads (None: the mean gradient only)
    min_batch_size: int  # the smallest batch the run can take (sets the number of scan steps)
    max_batch_size: int
    samples: int  # budget of examples
    sample_evals: int  # evaluations at multiples of samples / sample_evals
    measure_noise_scale: bool  # B_simple at every evaluation of the runs that ask for it (``measure``)


def buckets(min_batch_size: int, max_batch_size: int) -> tuple[int, ...]:
    """The static batch shapes: powers of two from ``min_batch_size`` up, then the cap.

    Example:
      >>> from adabatch.experiments._variable_batch import buckets
      >>> buckets(8, 100)
      (8, 16, 32, 64, 100)
    """
    sizes, p = [], 1 << max(0, math.ceil(math.log2(min_batch_size)))
    while p < max_batch_size:
        sizes.append(p)
        p *= 2
    return tuple(sizes) + (max_batch_size,)


def eval_marks(samples: int, sample_evals: int, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample counts (``sample_evals`` equally spaced) and step counts (1, 2, 3, 4, 6, 8, 11, ... about √2 apart)
    at which the run evaluates.

    Example:
      >>> from adabatch.experiments._variable_batch import eval_marks
      >>> s, t = eval_marks(100, 4, 20)
      >>> s.tolist(), t.tolist()
      ([25, 50, 75, 100], [1, 2, 3, 4, 6, 8, 11, 16, 20])
    """
    by_samples = np.unique(np.ceil(np.arange(1, sample_evals + 1) * samples / sample_evals).astype(np.int64))
    geometric = np.unique(np.round(np.sqrt(2.0) ** np.arange(0, 2 * math.log2(max(max_steps, 2)) + 1)))
    by_steps = np.unique(np.append(geometric[geometric < max_steps], max_steps)).astype(np.int64)
    return by_samples, by_steps


def stream(n: int, length: int, seed: int) -> np.ndarray:
    """``length`` example indices: random permutations of ``range(n)`` one after another (seeded)."""
    rng = np.random.default_rng([seed, 2402])
    return np.concatenate([rng.permutation(n) for _ in range(-(-length // n))])[:length].astype(np.int32)


def _measured_b_simple(problem: Problem, params: Any) -> jax.Array:
    """B_simple = tr Σ / ‖∇F‖² of the whole training set (its mean is the true gradient; Σ divides by n), or the
    unbiased estimate from the first ``problem.noise_examples`` examples."""
    k = problem.noise_examples or problem.x.shape[0]
    stats = st.grad_stats(problem.loss_fn, params, (problem.x[:k], problem.y[:k]), chunk_size=512)
    assert isinstance(stats, st.GradStats)
    if k < problem.x.shape[0]:
        return st.clamp_noise_scale(*st.estimate_from_stats(stats))[0]
    n = jnp.asarray(stats.count, jnp.float32)
    return st.clamp_noise_scale(st.trace_covariance(stats) * (n - 1) / n, st.mean_sq_norm(stats))[0]


def make_run(problem: Problem, spec: Run) -> Callable[..., dict[str, jax.Array]]:
    """A jitted ``run(params, stream, lr, constant, start_batch, period, measure) -> traces``.

    ``lr`` multiplies the transformation's update; ``constant`` is passed to ``spec.make_tx`` (a rule's η, θ or
    multiplier); ``start_batch`` and ``period`` define the schedule of a non-rule run (``period = 0``: fixed);
    ``measure`` (a traced bool) measures B_simple at every evaluation when ``spec.measure_noise_scale`` (0
    otherwise): it costs a pass of per-example gradients over the measurement set, so tuning runs skip it.
    The traces: ``batch`` (the batch size of every step, 0 after the budget), ``eval_step``, ``eval_samples`` and
    one array per metric at each evaluation (``eval_count`` of them are valid), ``steps`` and ``samples``.
    """
    sizes = buckets(spec.min_batch_size, spec.max_batch_size)
    max_steps = -(-spec.samples // spec.min_batch_size)
    sample_marks, step_marks = eval_marks(spec.samples, spec.sample_evals, max_steps)
    n_evals = len(sample_marks) + len(step_marks) + 2
    budget = spec.samples

    def metrics(params, measure):
        out = dict(problem.evaluate(params))
        if spec.measure_noise_scale:
            zero = jnp.zeros((), jnp.float32)
            out["b_simple"] = jax.lax.cond(measure, lambda: _measured_b_simple(problem, params), lambda: zero)
        return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}

    def run(params, order, lr, constant, start_batch, period, measure):
        tx = spec.make_tx(constant)
        opt_state = tx.init(params)
        period = jnp.where(period > 0, period, _FOREVER)

        def branch(size):
            def step(args):
                params, opt_state, pointer, b = args
                idx = jax.lax.dynamic_slice(order, (pointer,), (size,))
                batch = (problem.x[idx], problem.y[idx])
                mask = (jnp.arange(size) < b).astype(jnp.float32)

                def mean_grad(p):
                    return jax.grad(lambda q: jnp.sum(problem.loss_fn(q, batch) * mask) / b)(p)

                extra: dict[str, Any] = {}
                if spec.needs is None:
                    grads = mean_grad(params)
                else:
                    stats = st.grad_stats(
                        problem.loss_fn,
                        params,
                        batch,
                        mask=mask,
                        sq_sum=spec.needs.sq_sum,
                        inner_sq_sum=spec.needs.inner_sq_sum,
                        leaf_sq_norm_sum=spec.needs.leaf_sq_norm_sum,
                    )
                    assert isinstance(stats, st.GradStats)
                    grads, extra["grad_stats"] = stats.mean, stats
                if curv.declared_curvature(opt_state) is not None:  # the SLQ learner's spectrum of this batch
                    key = jax.random.fold_in(jax.random.key(0), pointer)
                    extra["curvature"] = curv.requested_spectrum(
                        problem.loss_fn, params, batch, opt_state, key=key, mask=mask
                    )
                if opt.needs_extrapolated_grads(opt_state):  # EXTRAP-SGD: the same batch's gradient at θ̃
                    extra["extrapolated_grads"] = mean_grad(opt.extrapolate(params, opt_state, grads))
                updates, opt_state = tx.update(grads, opt_state, params, **extra)
                params = jax.tree_util.tree_map(lambda p, u: p + (lr * u).astype(p.dtype), params, updates)
                return params, opt_state

            return step

        branches = [lambda args: args[:2]] + [branch(size) for size in sizes]

        def body(carry, t):
            params, opt_state, samples, evals, count = carry
            if spec.rule:
                wanted = rules.next_batch_size(opt_state)
            else:
                wanted = start_batch * jnp.left_shift(1, jnp.minimum(t // period, 30))
            b = jnp.clip(jnp.minimum(wanted, spec.max_batch_size), 1, jnp.maximum(budget - samples, 0))
            b = jnp.where(samples >= budget, 0, b).astype(jnp.int32)
            index = jnp.where(b == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), b))
            params, opt_state = jax.lax.switch(index, branches, (params, opt_state, samples, b))
            new_samples = samples + b
            step = t + 1
            due = (b > 0) & (
                jnp.any((samples < sample_marks) & (new_samples >= sample_marks))
                | jnp.any(step == step_marks)
                | (new_samples >= budget)
            )

            def record(evals):
                values = metrics(params, measure) | {"step": step, "samples": new_samples}
                return {k: evals[k].at[count].set(jnp.asarray(values[k], evals[k].dtype)) for k in evals}

            evals = jax.lax.cond(due, record, lambda e: e, evals)
            return (params, opt_state, new_samples, evals, count + due.astype(jnp.int32)), b

        first = metrics(params, measure) | {"step": jnp.int32(0), "samples": jnp.int32(0)}
        evals = {k: jnp.zeros((n_evals,), jnp.asarray(v).dtype).at[0].set(v) for k, v in first.items()}
        carry = (params, opt_state, jnp.int32(0), evals, jnp.int32(1))
        (params, opt_state, samples, evals, count), batch = jax.lax.scan(body, carry, jnp.arange(max_steps))
        return {"batch": batch, "evals": evals, "eval_count": count, "samples": samples}

    return jax.jit(run)


def rle(batch: np.ndarray) -> list[list[int]]:
    """Run-length encoding ``[[size, steps], ...]`` of the per-step batch sizes (budget exhausted: dropped)."""
    batch = batch[batch > 0]
    if len(batch) == 0:
        return []
    starts = np.flatnonzero(np.diff(batch, prepend=-1))
    lengths = np.diff(np.append(starts, len(batch)))
    return [[int(batch[s]), int(k)] for s, k in zip(starts, lengths, strict=True)]


def record(out: dict) -> dict[str, Any]:
    """The JSON record of one run's traces (``make_run``'s output, on the host): the valid evaluations, the batch
    sizes run-length encoded, the number of steps and of samples."""
    k = int(out["eval_count"])
    evals = {name: np.asarray(v)[:k].tolist() for name, v in out["evals"].items()}
    batch = np.asarray(out["batch"])
    return {"evals": evals, "batch": rle(batch), "steps": int((batch > 0).sum()), "samples": int(out["samples"])}
