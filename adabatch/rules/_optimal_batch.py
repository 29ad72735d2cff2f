r"""The learned optimal batch size of SGD (Alfarra, Hanzely, Albasyoni, Ghanem & Richtárik 2020).

For a finite sum :math:`F = \tfrac1n\sum_{i=1}^n f_i` of convex :math:`L_{\max}`-smooth :math:`f_i` with an
:math:`L`-smooth, :math:`\mu`-strongly convex :math:`F`, SGD with :math:`\tau`-nice sampling (batches of :math:`\tau`
distinct examples) has the expected smoothness and gradient noise at the optimum (Gower et al. 2019)

.. math::

    \mathcal L(\tau) = \frac{n(\tau-1)}{\tau(n-1)}L + \frac{n-\tau}{\tau(n-1)}L_{\max}, \qquad
    \sigma(\tau) = \frac{n-\tau}{\tau(n-1)}\,h^\star, \qquad h^\star = \tfrac1n\sum_i\lVert\nabla f_i(x^\star)\rVert^2,

and with the step :math:`\gamma(\tau) = \min\{1/(2\mathcal L(\tau)),\ \epsilon\mu/(4\sigma(\tau))\}` reaches
:math:`\mathbb E\lVert x_k - x^\star\rVert^2 \le \epsilon` after :math:`\max\{2\mathcal L(\tau)/\mu,\
4\sigma(\tau)/(\epsilon\mu^2)\}\log(2\lVert x_0-x^\star\rVert^2/\epsilon)` steps. The work :math:`\tau\times` steps
is the larger of an increasing and a decreasing function of :math:`\tau`; it is least where they cross,

.. math:: \tau^\star = \operatorname{clip}_{[1,n]}
    \frac{n\,(2h^\star + \epsilon\mu(L - L_{\max}))}{2h^\star + \epsilon\mu(nL - L_{\max})},

where the two terms of :math:`\gamma(\tau^\star)` are equal. :math:`h^\star` is unknown; Alfarra et al. learn it
along the run from the per-example gradient norms at the current iterates, so :math:`\tau_k` and :math:`\gamma_k`
adapt at every step. ``docs/rules/optimal_batch_rule.md`` has the derivation, the estimator and every choice.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch._validation import (
    check_choice,
    check_flag,
    check_positive,
    check_positive_int,
    check_unit_interval,
    is_concrete,
    one_minus_pow,
    tree_accumulation_dtype,
)
from adabatch.rules._common import (
    DEFAULT_INIT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    check_rule_arguments,
    round_batch_size,
)
from adabatch.stats import GradStats, GradStatsNeeds, read_statistics, trace_covariance

__all__ = ["ESTIMATORS", "OptimalBatchRuleState", "optimal_batch_rule", "optimal_batch_size", "sgd_step_size"]

ESTIMATORS = ("second_moment", "variance")


class OptimalBatchRuleState(NamedTuple):
    """State of :func:`optimal_batch_rule` (scalars in the parameters' accumulation dtype, at least float32)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates seen
    next_batch_size: jax.Array  # int32[]: the decision, size of the next batch
    step_size: jax.Array  # float[]: γ_k = min(1/(2 L(b)), εμ/(4 σ(b))) for the batch b just used
    optimal_batch: jax.Array  # float[]: τ* in [1, n] (before capping and rounding) at the last decision
    noise: jax.Array  # float[]: ĥ_k, the bias-corrected running estimate of h* = (1/n) Σ_i ‖∇f_i(x*)‖²
    ema: jax.Array  # float[]: the EMA accumulator behind ĥ_k (without bias correction)
    num_estimates: jax.Array  # int32[]: finite batch estimates folded into the EMA
    nonfinite_count: jax.Array  # int32[]: batches whose estimate was non-finite (skipped)
    grad_stats_needs: GradStatsNeeds  # static (no leaves): count, mean and sq_norm_sum only


def _fractions(tau: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(n(τ-1)/(τ(n-1)), (n-τ)/(τ(n-1)))`` for τ clipped to [1, n] (n >= 2)."""
    tau = jnp.clip(tau, 1, n)
    denom = tau * (n - 1)
    return n * (tau - 1) / denom, (n - tau) / denom


def sgd_step_size(
    batch_size: Any, noise: Any, *, num_examples: Any, smoothness: Any, max_smoothness: Any, strong_convexity: Any,
    accuracy: Any,
) -> jax.Array:  # fmt: skip
    r"""The step :math:`\gamma(\tau) = \min\{1/(2\mathcal L(\tau)),\ \epsilon\mu/(4\sigma(\tau))\}` of SGD with
    :math:`\tau`-nice batches (module docstring; :math:`\tau` clipped to :math:`[1, n]`, and
    :math:`\sigma(\tau)=0` gives :math:`1/(2\mathcal L(\tau))`).

    Example:
      >>> from adabatch.rules import sgd_step_size
      >>> kw = dict(num_examples=100, smoothness=1.0, max_smoothness=10.0, strong_convexity=0.1, accuracy=0.01)
      >>> round(float(sgd_step_size(100, 1.0, **kw)), 4), round(float(sgd_step_size(1, 0.0, **kw)), 4)
      (0.5, 0.05)
    """
    n = jnp.asarray(num_examples).astype(jnp.result_type(noise, float))
    dtype = n.dtype
    tau = jnp.asarray(batch_size).astype(dtype)
    a, c = _fractions(tau, n)
    smooth = a * jnp.asarray(smoothness, dtype) + c * jnp.asarray(max_smoothness, dtype)
    sigma = c * jnp.asarray(noise, dtype)
    eps_mu = jnp.asarray(accuracy, dtype) * jnp.asarray(strong_convexity, dtype)
    by_noise = jnp.where(sigma > 0, eps_mu / (4 * jnp.where(sigma > 0, sigma, 1)), jnp.inf)
    return jnp.minimum(1 / (2 * smooth), by_noise)


def optimal_batch_size(
    noise: Any, *, num_examples: Any, smoothness: Any, max_smoothness: Any, strong_convexity: Any, accuracy: Any
) -> jax.Array:
    r"""The batch size :math:`\tau^\star\in[1,n]` that minimises the total work of SGD to accuracy
    :math:`\epsilon` (module docstring), for the noise :math:`h^\star` = ``noise`` (unrounded).

    :math:`\tau^\star = 1` when :math:`2h^\star \le \epsilon\mu L_{\max}` (the noise never limits the step).

    Example:
      >>> from adabatch.rules import optimal_batch_size
      >>> kw = dict(num_examples=100, smoothness=1.0, max_smoothness=10.0, strong_convexity=0.1, accuracy=0.01)
      >>> [round(float(optimal_batch_size(h, **kw)), 2) for h in (0.0, 0.05, 1.0, 1e6)]
      [1.0, 47.89, 95.26, 100.0]
    """
    n = jnp.asarray(num_examples).astype(jnp.result_type(noise, float))
    dtype = n.dtype
    h2 = 2 * jnp.asarray(noise, dtype)
    eps_mu = jnp.asarray(accuracy, dtype) * jnp.asarray(strong_convexity, dtype)
    smooth, smooth_max = jnp.asarray(smoothness, dtype), jnp.asarray(max_smoothness, dtype)
    numerator = n * (h2 + eps_mu * (smooth - smooth_max))
    denominator = h2 + eps_mu * (n * smooth - smooth_max)
    tau = numerator / jnp.where(denominator > 0, denominator, 1)
    return jnp.where(denominator > 0, jnp.clip(tau, 1, n), 1)


def _batch_noise(stats: GradStats, estimator: str) -> jax.Array:
    """This batch's estimate of h: (1/b) Σ_i ‖g_i‖² (``second_moment``) or trΣ̂ (``variance``; NaN for b < 2)."""
    if estimator == "variance":
        return trace_covariance(stats)
    n = jnp.asarray(stats.count).astype(jnp.result_type(stats.sq_norm_sum))
    return jnp.where(n > 0, stats.sq_norm_sum / jnp.maximum(n, 1), jnp.nan)


def optimal_batch_rule(
    num_examples: int,
    smoothness: float,
    max_smoothness: float,
    strong_convexity: float,
    accuracy: float,
    *,
    estimator: str = "second_moment",
    decay: float = 0.9,
    apply_step_size: bool = False,
    monotone: bool = False,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""A batch-size rule that learns the optimal batch size of SGD, with the matching step size (Alfarra et al.).

    At every update :math:`k`, with the batch of :math:`b` examples and its per-example gradients :math:`g_i`:

    .. math::

        \hat h_k &= \text{bias-corrected EMA (decay } \beta\text{) of } h_{B_k}, \qquad
        h_{B_k} = \tfrac1b\textstyle\sum_i\lVert g_i\rVert^2 \ (\texttt{"second\_moment"})
        \ \text{ or } \ \widehat{\operatorname{tr}\Sigma}\ (\texttt{"variance"}) \\
        \gamma_k &= \min\{1/(2\mathcal L(b)),\ \epsilon\mu/(4\sigma_{\hat h_k}(b))\}, \qquad
        \tau_{k+1} = \tau^\star(\hat h_k)

    (:func:`sgd_step_size`, :func:`optimal_batch_size`; the module docstring has :math:`\mathcal L, \sigma,
    \tau^\star`). The decision is :math:`\min(B_{\max}, \operatorname{roundup}_G(\lceil\tau_{k+1}\rceil))` (with
    ``monotone``, never below the current decision), taken every ``test_interval`` updates; a non-finite batch
    estimate leaves the EMA and the decision unchanged and increments ``nonfinite_count``. Before any estimate
    :math:`\hat h = 0` (so :math:`\gamma = 1/(2\mathcal L(b))`).

    :math:`h_{B_k}` with ``"second_moment"`` is unbiased for :math:`\tfrac1n\sum_i\lVert\nabla f_i(x_k)\rVert^2`, the
    paper's estimate of :math:`h^\star` at the current iterate, which tends to :math:`h^\star` as :math:`x_k\to
    x^\star`; ``"variance"`` drops the :math:`\lVert\nabla F(x_k)\rVert^2` part (it equals :math:`h^\star` at
    :math:`x^\star` too, and is smaller away from it). The EMA stands in for the paper's memory of recent norms
    (a decay :math:`1 - b/n` remembers about one epoch).

    Args:
      num_examples: :math:`n \ge 2`, the number of examples of the finite sum.
      smoothness: :math:`L > 0`, the smoothness constant of :math:`F`.
      max_smoothness: :math:`L_{\max}`, the largest smoothness constant of the :math:`f_i`, in
        :math:`[L, nL]` (convex :math:`f_i`).
      strong_convexity: :math:`\mu`, in :math:`(0, L]`.
      accuracy: the target :math:`\epsilon > 0` of :math:`\mathbb E\lVert x_k - x^\star\rVert^2`.
      estimator: ``"second_moment"`` (default, the paper's) or ``"variance"``; see above.
      decay: :math:`\beta \in [0, 1)` of the EMA of the batch estimates (0: the current batch only).
      apply_step_size: return :math:`\gamma_k\bar g` instead of :math:`\bar g` (not negated), so that
        ``optax.chain(optimal_batch_rule(..., apply_step_size=True), optax.scale(-1.0))`` is the paper's SGD. By
        default the rule returns the mean gradient like every rule and the step size is read from the state
        (``state.step_size``).
      monotone: never shrink the batch (the paper's :math:`\tau_k` may shrink; default False).
      max_batch_size, init_batch_size, granularity, test_interval, per_example: as in :func:`adabatch.norm_test`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`OptimalBatchRuleState`. Its ``update`` takes the
      mean gradient plus ``grad_stats=`` (a :class:`~adabatch.GradStats`; only ``count``, ``mean`` and
      ``sq_norm_sum`` are read), or, with ``per_example=True``, per-example gradients on the leading axis of
      ``updates``. Read the decision with :func:`adabatch.next_batch_size`.

    Example:
      >>> import jax.numpy as jnp
      >>> import adabatch
      >>> tx = adabatch.optimal_batch_rule(1000, 1.0, 20.0, 0.1, 0.01, decay=0.0, init_batch_size=4, per_example=True)
      >>> per_example = {"w": jnp.array([[2.0, -1.0], [-1.0, 1.5], [1.0, 0.2], [0.1, 0.9]])}
      >>> mean, state = tx.update(per_example, tx.init({"w": jnp.zeros(2)}))
      >>> round(float(state.noise), 4)  # (1/b) Σ_i ‖g_i‖² of this batch (decay 0: no memory)
      2.5275
      >>> round(float(state.optimal_batch), 1), int(adabatch.next_batch_size(state)), round(float(state.step_size), 6)
      (834.5, 835, 0.000397)

    References:
      Alfarra, Hanzely, Albasyoni, Ghanem, Richtárik, "Adaptive Learning of the Optimal Batch Size of SGD", 2020,
      https://arxiv.org/abs/2005.01097
      Gower, Loizou, Qian, Sailanbayev, Shulgin, Richtárik, "SGD: General Analysis and Improved Rates", 2019,
      https://arxiv.org/abs/1901.09401
    """
    check_positive_int("num_examples", num_examples)
    if is_concrete(num_examples) and int(num_examples) < 2:
        raise ValueError(f"num_examples must be at least 2, got {num_examples}")
    check_positive("smoothness", smoothness)
    check_positive("max_smoothness", max_smoothness)
    check_positive("strong_convexity", strong_convexity)
    check_positive("accuracy", accuracy)
    values = (num_examples, smoothness, max_smoothness, strong_convexity)
    if all(is_concrete(v) for v in values):
        n, smooth, smooth_max, mu = (float(v) for v in values)
        if not smooth <= smooth_max <= n * smooth:
            raise ValueError(
                f"max_smoothness must lie in [smoothness, num_examples * smoothness] = [{smooth}, {n * smooth}] "
                f"(L <= L_max <= n L for convex f_i), got {max_smoothness!r}"
            )
        if mu > smooth:
            raise ValueError(f"strong_convexity must be at most smoothness={smoothness!r}, got {strong_convexity!r}")
    check_choice("estimator", estimator, ESTIMATORS)
    check_unit_interval("decay", decay)
    check_flag("apply_step_size", apply_step_size)
    check_flag("monotone", monotone)
    check_flag("per_example", per_example)
    check_rule_arguments(max_batch_size, init_batch_size, granularity, test_interval)
    if is_concrete(num_examples) and is_concrete(init_batch_size) and int(init_batch_size) > int(num_examples):
        raise ValueError(f"init_batch_size={init_batch_size} is above num_examples={num_examples}")
    needs = GradStatsNeeds()
    constants = dict(
        num_examples=num_examples,
        smoothness=smoothness,
        max_smoothness=max_smoothness,
        strong_convexity=strong_convexity,
        accuracy=accuracy,
    )

    def init_fn(params: Any) -> OptimalBatchRuleState:
        dtype = tree_accumulation_dtype(params)
        zero = jnp.zeros((), dtype)
        size = jnp.asarray(init_batch_size, jnp.int32)
        return OptimalBatchRuleState(
            count=jnp.zeros((), jnp.int32),
            next_batch_size=size,
            step_size=sgd_step_size(size, zero, **constants).astype(dtype),
            optimal_batch=jnp.ones((), dtype),
            noise=zero,
            ema=zero,
            num_estimates=jnp.zeros((), jnp.int32),
            nonfinite_count=jnp.zeros((), jnp.int32),
            grad_stats_needs=needs,
        )

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        updates, stats = read_statistics(
            updates, grad_stats, max_batch_size, needs=needs, per_example=per_example, name="optimal_batch_rule"
        )
        dtype = state.ema.dtype
        batch = _batch_noise(stats, estimator).astype(dtype)
        finite = jnp.isfinite(batch)
        beta = jnp.asarray(decay).astype(dtype)
        ema = jnp.where(finite, beta * state.ema + (1 - beta) * jnp.where(finite, batch, 0), state.ema)
        num_estimates = state.num_estimates + finite.astype(jnp.int32)
        t = num_estimates.astype(dtype)
        noise = jnp.where(num_estimates > 0, ema / one_minus_pow(beta, jnp.maximum(t, 1)), 0)
        step_size = sgd_step_size(stats.count, noise, **constants).astype(dtype)
        tau = optimal_batch_size(noise, **constants).astype(dtype)
        cap = jnp.asarray(max_batch_size, jnp.int32)
        proposed = jnp.ceil(jnp.minimum(tau, cap.astype(dtype))).astype(jnp.int32)
        if monotone:
            proposed = jnp.maximum(proposed, state.next_batch_size)
        proposed = round_batch_size(proposed, granularity, cap)
        scheduled = state.count % jnp.asarray(test_interval, jnp.int32) == 0
        run = scheduled & finite
        if apply_step_size:
            updates = jax.tree.map(lambda u: (u * step_size.astype(jnp.result_type(u))).astype(u.dtype), updates)
        return updates, OptimalBatchRuleState(
            count=optax.safe_increment(state.count),
            next_batch_size=jnp.where(run, proposed, state.next_batch_size),
            step_size=step_size,
            optimal_batch=jnp.where(run, tau, state.optimal_batch),
            noise=noise,
            ema=ema,
            num_estimates=num_estimates,
            nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
            grad_stats_needs=state.grad_stats_needs,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
