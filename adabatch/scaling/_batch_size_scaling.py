r"""Learning rate as a function of batch size: linear, square-root and surge rules, AdaScale, and schedules keyed on
examples seen or on AdaScale's progress.

When the batch grows from the base size :math:`B_0` (where the learning rate was tuned) to :math:`B`, the step must
follow, and how depends on the optimizer. :func:`scale_by_batch_size` multiplies the updates by

==========  ==========================================================================================
``linear``  :math:`B/B_0` (SGD; Goyal et al. 2017, Granziol et al. 2022 in the noise-dominated regime)
``sqrt``    :math:`\sqrt{B/B_0}` (Adam-style methods; Granziol et al. 2022, Malladi et al. 2022)
``surge``   :math:`\epsilon_\text{opt}(B)/\epsilon_\text{opt}(B_0)`, with Li et al.'s (2024) law for sign-like
            optimizers :math:`\epsilon_\text{opt}(B)=\epsilon_{\max}/\bigl(\tfrac12(\sqrt{B_\text{noise}/B}+
            \sqrt{B/B_\text{noise}})\bigr)`: rises as :math:`\sqrt B`, peaks at :math:`B=B_\text{noise}`, falls beyond
==========  ==========================================================================================

reading the current :math:`B` from the ``batch_size`` extra argument. :func:`adascale` computes the AdaScale gain
from per-example statistics instead (``grad_stats`` extra argument). All of them are plain
``optax.GradientTransformationExtraArgs`` that go *after* the optimizer in an ``optax.chain`` (they multiply its
final step by a positive factor, so the sign is kept) and work inside ``optax.inject_hyperparams``.

References:
  Granziol, Zohren, Roberts, "Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach to Neural
  Network Training", JMLR 2022, https://arxiv.org/abs/2006.09092.
  Li et al., "Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling", NeurIPS 2024,
  https://arxiv.org/abs/2405.14578.
  McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018,
  https://arxiv.org/abs/1812.06162.
  Johnson, Agrawal, Gu, Guestrin, "AdaScale SGD: A User-Friendly Algorithm for Distributed Training", ICML 2020,
  https://arxiv.org/abs/2007.05105.
  Qiao et al., "Pollux: Co-adaptive Cluster Scheduling for Goodput-Optimized Deep Learning", OSDI 2021,
  https://arxiv.org/abs/2008.12260.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch import stats as st
from adabatch._validation import check_choice, check_positive, check_positive_int, is_concrete

__all__ = [
    "ScaleByBatchSizeState",
    "ScaleBySampleScheduleState",
    "batch_size_factor",
    "scale_by_batch_size",
    "scale_by_sample_schedule",
    "surge_learning_rate",
]

RULES = ("linear", "sqrt", "surge")
FORMS = ("sgd", "adam")


def _read_batch_size(batch_size: Any, who: str) -> jax.Array:
    """The ``batch_size`` extra argument as an int32 scalar; ValueError for what can be checked at trace time."""
    if batch_size is None:
        raise ValueError(
            f"{who} needs the current batch size as the extra argument batch_size (an integer >= 1), e.g. "
            "tx.update(updates, state, params, batch_size=256); it was missing"
        )
    dtype = jnp.result_type(batch_size)
    if isinstance(batch_size, bool) or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"batch_size must be an integer (e.g. int32), got {batch_size!r} of dtype {dtype}")
    if jnp.ndim(batch_size) != 0:
        raise ValueError(f"batch_size must be a scalar, got shape {jnp.shape(batch_size)}")
    if is_concrete(batch_size) and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return jnp.asarray(batch_size, jnp.int32)


def surge_learning_rate(batch_size: Any, noise_scale: Any, max_learning_rate: Any = 1.0) -> jax.Array:
    r"""Li et al.'s optimal learning rate of a sign-like optimizer (their Theorem 3),

    .. math:: \epsilon_\text{opt}(B) = \epsilon_{\max}\Big/\tfrac12\Bigl(\sqrt{B_\text{noise}/B}
        +\sqrt{B/B_\text{noise}}\Bigr),

    peaking at :math:`B=B_\text{noise}` with value :math:`\epsilon_{\max}` = ``max_learning_rate``.

    Example:
      >>> from adabatch.scaling import surge_learning_rate
      >>> [round(float(surge_learning_rate(b, 64.0)), 4) for b in (16, 64, 256)]
      [0.8, 1.0, 0.8]
    """
    b = jnp.asarray(batch_size, jnp.float32)
    bn = jnp.asarray(noise_scale, jnp.float32)
    return jnp.asarray(max_learning_rate, jnp.float32) / (0.5 * (jnp.sqrt(bn / b) + jnp.sqrt(b / bn)))


def batch_size_factor(rule: str, batch_size: Any, base_batch_size: Any, noise_scale: Any = None) -> jax.Array:
    r"""The multiplier of ``rule`` at batch size :math:`B` relative to :math:`B_0` (float32 scalar).

    ``"linear"``: :math:`B/B_0`; ``"sqrt"``: :math:`\sqrt{B/B_0}`; ``"surge"``:
    :math:`\epsilon_\text{opt}(B)/\epsilon_\text{opt}(B_0) = (\sqrt{B_n/B_0}+\sqrt{B_0/B_n}) /
    (\sqrt{B_n/B}+\sqrt{B/B_n})` with :math:`B_n` = ``noise_scale`` (:math:`\epsilon_{\max}` cancels). As
    :math:`B_n\to\infty` the surge factor tends to the square-root rule.

    Example:
      >>> from adabatch.scaling import batch_size_factor
      >>> [round(float(batch_size_factor(r, 64, 32, 64.0)), 4) for r in ("linear", "sqrt", "surge")]
      [2.0, 1.4142, 1.0607]
    """
    check_choice("rule", rule, RULES)
    b = jnp.asarray(batch_size, jnp.float32)
    b0 = jnp.asarray(base_batch_size, jnp.float32)
    if rule == "linear":
        return b / b0
    if rule == "sqrt":
        return jnp.sqrt(b / b0)
    if noise_scale is None:
        raise ValueError("rule='surge' needs noise_scale (B_noise > 0)")
    return surge_learning_rate(b, noise_scale) / surge_learning_rate(b0, noise_scale)


def _scale(updates: Any, factor: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda u: u * factor.astype(jnp.result_type(u)), updates)


class ScaleByBatchSizeState(NamedTuple):
    """State of :func:`scale_by_batch_size`."""

    factor: jax.Array  # float32[]: the factor applied at the last update (1 before the first)
    invalid_count: jax.Array  # int32[]: updates whose traced batch_size was < 1 (the previous factor was kept)
    noise: Any  # NoiseScaleState of the online B_noise estimator (rule="surge", noise_scale not a number); else None


def scale_by_batch_size(
    rule: str,
    base_batch_size: int,
    *,
    noise_scale: float | optax.GradientTransformation | None = None,
    max_factor: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Multiply the updates by a learning-rate-vs-batch-size rule's factor at the current batch size.

    With :math:`B` the ``batch_size`` extra argument and :math:`B_0` = ``base_batch_size`` (the batch size the
    learning rate was tuned at), the factor is :func:`batch_size_factor`: :math:`B/B_0` (``"linear"``),
    :math:`\sqrt{B/B_0}` (``"sqrt"``) or :math:`\epsilon_\text{opt}(B)/\epsilon_\text{opt}(B_0)` (``"surge"``),
    then :math:`\min(\cdot,` ``max_factor`` :math:`)`. For ``"surge"``, :math:`B_\text{noise}` is ``noise_scale``
    when it is a number; otherwise it is estimated online as the smoothed :math:`B_\text{simple}` of a
    :func:`adabatch.stats.noise_scale` tracker (``noise_scale=None``: the default tracker; or pass one,
    e.g. ``noise_scale(preconditioner="adam")``), which reads the ``grad_stats`` extra argument. A clamped
    estimate (noise hides the signal) is used as clamped: the upper bound makes the factor the square-root rule,
    the surge curve's small-batch limit.

    Put it after the optimizer: ``optax.chain(optax.adam(lr), scale_by_batch_size("sqrt", 32))``. A traced
    ``batch_size`` below 1 (it cannot raise inside ``jit``) keeps the previous factor and is counted in
    ``invalid_count``.

    Args:
      rule: ``"linear"``, ``"sqrt"`` or ``"surge"``.
      base_batch_size: :math:`B_0\ge1`, where the factor is 1.
      noise_scale: ``"surge"`` only: :math:`B_\text{noise}>0`, or a noise-scale tracker, or None (online, default
        tracker).
      max_factor: optional cap on the factor (> 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`ScaleByBatchSizeState`. ``update`` requires the
      extra argument ``batch_size`` (integer >= 1) and, for online ``"surge"``, ``grad_stats``
      (:class:`~adabatch.GradStats` of the current batch).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adabatch.scaling import scale_by_batch_size
      >>> tx = optax.chain(optax.sgd(0.1), scale_by_batch_size("linear", base_batch_size=32))
      >>> params = jnp.zeros(2)
      >>> updates, state = tx.update(jnp.ones(2), tx.init(params), params, batch_size=128)
      >>> updates.tolist()
      [-0.4000000059604645, -0.4000000059604645]

    References:
      Granziol et al., JMLR 2022, https://arxiv.org/abs/2006.09092; Li et al., NeurIPS 2024,
      https://arxiv.org/abs/2405.14578.
    """
    check_choice("rule", rule, RULES)
    check_positive_int("base_batch_size", base_batch_size)
    if max_factor is not None:
        check_positive("max_factor", max_factor)
    tracker = None
    if rule == "surge":
        if noise_scale is None:
            tracker = st.noise_scale()
        elif isinstance(noise_scale, optax.GradientTransformation):
            tracker = noise_scale
        else:
            check_positive("noise_scale", noise_scale)
    elif noise_scale is not None:
        raise ValueError(f"noise_scale is only used by rule='surge', got rule={rule!r} and noise_scale={noise_scale!r}")

    def init_fn(params):
        noise = None
        if tracker is not None:
            noise = tracker.init(params)
            if not isinstance(noise, st.NoiseScaleState):
                raise ValueError(
                    "noise_scale must be a number or a tracker from adabatch.stats.noise_scale(...); "
                    f"its state is a {type(noise).__name__}"
                )
        return ScaleByBatchSizeState(
            factor=jnp.ones((), jnp.float32), invalid_count=jnp.zeros((), jnp.int32), noise=noise
        )

    def update_fn(updates, state, params=None, *, batch_size=None, grad_stats=None, **extra_args):
        del extra_args
        b = _read_batch_size(batch_size, "scale_by_batch_size")
        noise = state.noise
        bn = noise_scale
        if tracker is not None:
            if grad_stats is None:
                raise ValueError(
                    "scale_by_batch_size('surge') without a numeric noise_scale estimates B_noise online and needs the "
                    "extra argument grad_stats (adabatch.grad_stats of the current batch); it was missing"
                )
            _, noise = tracker.update(updates, noise, params, grad_stats=grad_stats)
            bn = jnp.where(noise.num_estimates > 0, noise.b_simple, st.DEFAULT_MAX_NOISE_SCALE)
        factor = batch_size_factor(rule, b, base_batch_size, bn)
        if max_factor is not None:
            factor = jnp.minimum(factor, jnp.asarray(max_factor, jnp.float32))
        ok = b >= 1
        factor = jnp.where(ok, factor, state.factor)
        new_state = ScaleByBatchSizeState(
            factor=factor, invalid_count=state.invalid_count + (~ok).astype(jnp.int32), noise=noise
        )
        return _scale(updates, factor), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleBySampleScheduleState(NamedTuple):
    """State of :func:`scale_by_sample_schedule`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates seen
    samples: jax.Array  # float32[]: examples seen before the next update (float: exact up to 2**24, then ~1e-7 rel.)


def scale_by_sample_schedule(schedule: Callable[[jax.Array], Any]) -> optax.GradientTransformationExtraArgs:
    r"""Multiply the updates by ``schedule(samples seen)`` instead of ``schedule(step)``.

    Like ``optax.scale_by_schedule``, but the schedule's argument is :math:`n_t = \sum_{s<t} B_s`, the number of
    examples consumed by the previous updates (0 at the first), read from the ``batch_size`` extra argument; so a
    warm-up or decay written in examples stays put when the batch size changes. The AdAdaGrad reference code
    indexes its schedules this way. The sign is kept: use ``optax.chain(opt_with_lr_1, scale_by_sample_schedule(
    lr_of_samples))`` for an optimizer whose step is linear in the learning rate (SGD, Adam, AdaBelief), or negate
    (``optax.scale(-1.0)``) after a ``scale_by_*`` block. A schedule keyed on AdaScale's progress is
    :func:`adascale`'s ``schedule`` argument. Inside ``optax.inject_hyperparams`` pass ``static_args="schedule"``.

    Args:
      schedule: a function of the (float32) number of examples seen, e.g. an optax schedule written in examples.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`ScaleBySampleScheduleState`; ``update``
      requires the extra argument ``batch_size`` (integer >= 1).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adabatch.scaling import scale_by_sample_schedule
      >>> lr = optax.linear_schedule(1.0, 0.0, transition_steps=1000)  # in examples
      >>> tx = optax.chain(optax.sgd(1.0), scale_by_sample_schedule(lr))
      >>> state, params = tx.init(jnp.zeros(1)), jnp.zeros(1)
      >>> for b in (100, 400):
      ...     u, state = tx.update(jnp.ones(1), state, params, batch_size=b)
      ...     print(round(float(u[0]), 3))
      -1.0
      -0.9
    """
    if not callable(schedule):
        raise ValueError(f"schedule must be a callable of the number of examples seen, got {schedule!r}")

    def init_fn(params):
        del params
        return ScaleBySampleScheduleState(count=jnp.zeros((), jnp.int32), samples=jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None, *, batch_size=None, **extra_args):
        del params, extra_args
        b = _read_batch_size(batch_size, "scale_by_sample_schedule")
        factor = jnp.asarray(schedule(state.samples), jnp.float32)
        new_state = ScaleBySampleScheduleState(
            count=optax.safe_increment(state.count), samples=state.samples + jnp.maximum(b, 0).astype(jnp.float32)
        )
        return _scale(updates, factor), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
