r"""The gradient noise scale (McCandlish et al. 2018): estimators, a tracking transformation and a batch-size rule.

With :math:`G = \nabla F` the true gradient and :math:`\Sigma` the covariance of the per-example gradients, the
*simple noise scale* is

.. math:: B_\text{simple} = \operatorname{tr}\Sigma / \lVert G\rVert^2 ,

the batch size at which the noise of a minibatch gradient, :math:`\operatorname{tr}\Sigma/B`, equals the squared
signal. It approximates the critical batch size: training speeds up almost linearly with the batch below it and
stops gaining above it. This module estimates it in three ways:

* per-example statistics (:func:`estimate_from_stats`): :math:`\widehat{\operatorname{tr}\Sigma}` and the unbiased
  :math:`\widehat{\lVert G\rVert^2} = \lVert\bar g\rVert^2 - \widehat{\operatorname{tr}\Sigma}/b` of
  :mod:`adabatch.stats` (the two-batch estimator below with :math:`B_\text{small}=1`);
* McCandlish's two-batch-size estimator (:func:`two_batch_estimate`) from the squared norms of gradients averaged
  over :math:`B_\text{small}` and :math:`B_\text{big}` examples (per-device and global gradients):
  :math:`\widehat{\lVert G\rVert^2} = (B_\text{big}\lVert G_\text{big}\rVert^2 - B_\text{small}\lVert
  G_\text{small}\rVert^2)/(B_\text{big}-B_\text{small})` and :math:`\widehat{\operatorname{tr}\Sigma} =
  (\lVert G_\text{small}\rVert^2-\lVert G_\text{big}\rVert^2)/(1/B_\text{small}-1/B_\text{big})`, both unbiased;
* an Adam-preconditioned variant (:func:`precondition`, as Pollux does): every gradient is divided elementwise by
  :math:`\sqrt{\hat v}+\epsilon` before the norms are taken, measuring the noise the Adam update actually sees.

The ratio of two unbiased estimates is not unbiased and a single batch's :math:`\widehat{\lVert G\rVert^2}` is
often negative, so :func:`noise_scale` smooths numerator and denominator *separately* with bias-corrected
exponential moving averages and only then divides. Estimates that come out negative, infinite or NaN are clamped
into ``[min_noise_scale, max_noise_scale]`` and flagged in the state; a NaN never leaves this module.

:func:`adabatch.rules.noise_scale_rule` turns the estimate into a batch-size decision (next batch
:math:`\approx B_\text{simple}`) with hysteresis against thrashing.

References:
  McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018,
  https://arxiv.org/abs/1812.06162 (App. A: the two-batch-size estimator).
  Qiao et al., "Pollux: Co-adaptive Cluster Scheduling for Goodput-Optimized Deep Learning", OSDI 2021,
  https://arxiv.org/abs/2008.12260 (EMA smoothing, Adam preconditioning).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch._validation import (
    accumulation_dtype,
    check_choice,
    check_flag,
    check_positive,
    check_unit_interval,
    is_concrete,
    tree_accumulation_dtype,
)
from adabatch.stats import _grad_stats as st
from adabatch.stats._inputs import GradStatsNeeds, read_statistics

__all__ = [
    "NoiseScaleEstimate",
    "NoiseScaleState",
    "adam_preconditioner",
    "bias_corrected_ema",
    "clamp_noise_scale",
    "estimate_from_stats",
    "noise_scale",
    "precondition",
    "two_batch_estimate",
]

PRECONDITIONERS = ("none", "adam")
DEFAULT_MIN_NOISE_SCALE = 1e-6
DEFAULT_MAX_NOISE_SCALE = 1e12


class NoiseScaleEstimate(NamedTuple):
    """Unbiased estimates of the two ingredients of :math:`B_\\text{simple}` (scalars; may be negative or NaN)."""

    trace_cov: jax.Array  # float[]: estimate of trΣ, the trace of the per-example gradient covariance
    grad_sq_norm: jax.Array  # float[]: estimate of ‖G‖², the squared norm of the true gradient


def estimate_from_stats(stats: st.GradStats) -> NoiseScaleEstimate:
    r""":math:`(\widehat{\operatorname{tr}\Sigma}, \widehat{\lVert G\rVert^2})` from per-example statistics.

    :math:`\widehat{\operatorname{tr}\Sigma} = (q-b\lVert\bar g\rVert^2)/(b-1)` and
    :math:`\widehat{\lVert G\rVert^2} = \lVert\bar g\rVert^2 - \widehat{\operatorname{tr}\Sigma}/b`
    (:func:`adabatch.stats.trace_covariance`, :func:`adabatch.stats.unbiased_grad_sq_norm`): both unbiased, NaN
    for :math:`b<2`. Their ratio is :func:`adabatch.stats.b_simple`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import from_per_example
      >>> from adabatch.stats import estimate_from_stats
      >>> est = estimate_from_stats(from_per_example({"w": jnp.array([[3.0, 0.0], [1.0, 2.0]])}))
      >>> float(est.trace_cov), float(est.grad_sq_norm)
      (4.0, 3.0)
    """
    return NoiseScaleEstimate(st.trace_covariance(stats), st.unbiased_grad_sq_norm(stats))


def two_batch_estimate(
    small_sq_norm: Any, big_sq_norm: Any, small_batch_size: Any, big_batch_size: Any
) -> NoiseScaleEstimate:
    r"""McCandlish et al.'s unbiased estimates from gradients averaged over two batch sizes.

    Since :math:`\mathbb E\lVert G_B\rVert^2 = \lVert G\rVert^2 + \operatorname{tr}\Sigma/B` for the mean
    gradient :math:`G_B` of :math:`B` i.i.d. examples, two sizes :math:`B_s < B_b` give

    .. math::
        \widehat{\lVert G\rVert^2} = \frac{B_b\lVert G_{B_b}\rVert^2 - B_s\lVert G_{B_s}\rVert^2}{B_b - B_s},
        \qquad
        \widehat{\operatorname{tr}\Sigma} = \frac{\lVert G_{B_s}\rVert^2 - \lVert G_{B_b}\rVert^2}{1/B_s - 1/B_b}.

    ``small_sq_norm`` may be the average of several small-batch squared norms (e.g. over devices, each computing a
    local gradient of :math:`B_s` examples, with :math:`B_b` the global batch). Both outputs are unbiased and can
    be negative; smooth them (:class:`NoiseScaleState`) before dividing.

    Args:
      small_sq_norm: :math:`\lVert G_{B_s}\rVert^2` (or its average over groups).
      big_sq_norm: :math:`\lVert G_{B_b}\rVert^2`.
      small_batch_size: :math:`B_s\ge 1`.
      big_batch_size: :math:`B_b > B_s`.

    Returns:
      A :class:`NoiseScaleEstimate`.

    Example:
      >>> from adabatch.stats import two_batch_estimate
      >>> est = two_batch_estimate(small_sq_norm=5.0, big_sq_norm=2.0, small_batch_size=1, big_batch_size=4)
      >>> float(est.trace_cov), float(est.grad_sq_norm)
      (4.0, 1.0)
    """
    for name, value in (("small_batch_size", small_batch_size), ("big_batch_size", big_batch_size)):
        check_positive(name, value)
    if is_concrete(small_batch_size) and is_concrete(big_batch_size) and small_batch_size >= big_batch_size:
        raise ValueError(
            f"big_batch_size must exceed small_batch_size, got small_batch_size={small_batch_size}, "
            f"big_batch_size={big_batch_size}"
        )
    dtype = accumulation_dtype(jnp.result_type(small_sq_norm, big_sq_norm))
    small, big = jnp.asarray(small_sq_norm, dtype), jnp.asarray(big_sq_norm, dtype)
    bs, bb = jnp.asarray(small_batch_size, dtype), jnp.asarray(big_batch_size, dtype)
    grad_sq = (bb * big - bs * small) / (bb - bs)
    trace = (small - big) / (1 / bs - 1 / bb)
    return NoiseScaleEstimate(trace, grad_sq)


def clamp_noise_scale(
    trace_cov: Any,
    grad_sq_norm: Any,
    *,
    min_noise_scale: Any = DEFAULT_MIN_NOISE_SCALE,
    max_noise_scale: Any = DEFAULT_MAX_NOISE_SCALE,
) -> tuple[jax.Array, jax.Array]:
    r""":math:`\operatorname{tr}\Sigma/\lVert G\rVert^2` clipped into ``[min_noise_scale, max_noise_scale]``, and a
    flag saying whether it had to be.

    A non-positive or NaN :math:`\lVert G\rVert^2` (the noise hides the signal) gives ``max_noise_scale``; a
    negative or NaN trace with a positive :math:`\lVert G\rVert^2` gives ``min_noise_scale``. The result is never
    NaN.

    Example:
      >>> from adabatch.stats import clamp_noise_scale
      >>> [(f"{float(v):.3g}", bool(f)) for v, f in (clamp_noise_scale(6.0, 2.0), clamp_noise_scale(6.0, -1.0))]
      [('3', False), ('1e+12', True)]
    """
    trace, g2 = jnp.asarray(trace_cov), jnp.asarray(grad_sq_norm)
    dtype = accumulation_dtype(jnp.result_type(trace, g2))
    trace, g2 = trace.astype(dtype), g2.astype(dtype)
    lo, hi = jnp.asarray(min_noise_scale, dtype), jnp.asarray(max_noise_scale, dtype)
    signal = g2 > 0  # False for NaN
    raw = trace / jnp.where(signal, g2, 1)
    value = jnp.where(signal, jnp.where(jnp.isnan(raw), lo, jnp.clip(raw, lo, hi)), hi)
    clamped = ~signal | ~(raw >= lo) | (raw > hi)
    return value, clamped


def bias_corrected_ema(
    biased: Any, normaliser: jax.Array, value: Any, decay: Any, valid: Any = True
) -> tuple[Any, jax.Array]:
    r"""One step of a bias-corrected exponential moving average; the average is ``biased / normaliser``.

    :math:`m_t = \beta_t m_{t-1} + (1-\beta_t)x_t`, :math:`u_t = \beta_t u_{t-1} + (1-\beta_t)` with
    :math:`m_0=u_0=0`; :math:`m_t/u_t` is a weighted mean of the inputs (exact for a constant input) even when the
    decay :math:`\beta_t` changes from step to step. Where ``valid`` is false the step is skipped (state kept), so a
    NaN input never enters the average. ``biased`` and ``value`` may be pytrees of matching structure.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import bias_corrected_ema
      >>> m, u = bias_corrected_ema(jnp.float32(0), jnp.float32(0), jnp.float32(5), decay=0.9)
      >>> float(m / u)
      5.0
    """
    decay = jnp.asarray(decay, normaliser.dtype)
    new_norm = decay * normaliser + (1 - decay)
    new_biased = jax.tree_util.tree_map(
        lambda m, x: jnp.where(valid, decay.astype(m.dtype) * m + (1 - decay.astype(m.dtype)) * x, m), biased, value
    )
    return new_biased, jnp.where(valid, new_norm, normaliser)


def precondition(stats: st.GradStats, inverse_scale: Any) -> st.GradStats:
    r"""Statistics of the per-example gradients multiplied elementwise by ``inverse_scale`` :math:`p`.

    :math:`g_i\mapsto p\odot g_i` gives :math:`\bar g\mapsto p\odot\bar g`, :math:`S_2\mapsto p^2\odot S_2` and
    :math:`q\mapsto\sum_j p_j^2 S_{2,j}`, so this needs ``stats.sq_sum`` (compute the statistics with
    ``sq_sum=True``). With :math:`p = 1/(\sqrt{\hat v}+\epsilon)` (:func:`adam_preconditioner`) the estimators then
    measure the noise of Adam's preconditioned step. ``inner_sq_sum`` is dropped.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import from_per_example
      >>> from adabatch.stats import precondition
      >>> s = from_per_example({"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, sq_sum=True)
      >>> p = precondition(s, {"w": jnp.array([2.0, 0.5])})
      >>> p.mean["w"].tolist(), float(p.sq_norm_sum)
      ([4.0, 1.5], 45.0)
    """
    if stats.sq_sum is None:
        raise ValueError(
            "the preconditioned noise scale needs GradStats.sq_sum (per-coordinate Σ g_i²); compute the statistics "
            "with grad_stats(..., sq_sum=True)"
        )
    p2 = jax.tree_util.tree_map(lambda p, s2: jnp.square(jnp.asarray(p, s2.dtype)), inverse_scale, stats.sq_sum)
    sq_sum = jax.tree_util.tree_map(jnp.multiply, p2, stats.sq_sum)
    mean = jax.tree_util.tree_map(lambda p, m: jnp.asarray(p, m.dtype) * m, inverse_scale, stats.mean)
    q = sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(sq_sum))
    return st.GradStats(
        count=stats.count, mean=mean, sq_norm_sum=jnp.asarray(q, stats.sq_norm_sum.dtype), sq_sum=sq_sum
    )


def adam_preconditioner(nu: Any, count: Any, *, b2: Any = 0.999, eps: Any = 1e-8) -> Any:
    r"""Adam's inverse scale :math:`1/(\sqrt{\hat v}+\epsilon)` with :math:`\hat v = \nu/(1-\beta_2^t)` (ones for
    :math:`t=0`), from a second-moment EMA ``nu`` after ``count`` = :math:`t` updates.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import adam_preconditioner
      >>> adam_preconditioner(jnp.array([0.04]), 1, b2=0.0, eps=0.0).tolist()
      [5.0]
    """
    t = jnp.asarray(count)

    def leaf(v):
        bc = 1 - jnp.asarray(b2, v.dtype) ** t.astype(v.dtype)
        v_hat = v / jnp.where(t > 0, bc, 1)
        return jnp.where(t > 0, 1 / (jnp.sqrt(v_hat) + jnp.asarray(eps, v.dtype)), jnp.ones_like(v))

    return jax.tree_util.tree_map(leaf, nu)


class NoiseScaleState(NamedTuple):
    """State of :func:`noise_scale` (scalars are float32, or float64 for float64 parameters)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates seen
    num_estimates: jax.Array  # int32[]: updates whose statistics were finite (folded into the averages)
    trace_biased: jax.Array  # float[]: EMA accumulator of the trΣ estimates (divide by normaliser)
    grad_sq_biased: jax.Array  # float[]: EMA accumulator of the ‖G‖² estimates (divide by normaliser)
    normaliser: jax.Array  # float[]: bias correction u_t = 1 − Π decay (0 before the first estimate)
    trace_cov: jax.Array  # float[]: smoothed trΣ (bias-corrected), 0 before the first estimate
    grad_sq_norm: jax.Array  # float[]: smoothed ‖G‖² (bias-corrected; may be ≤ 0), 0 before the first estimate
    b_simple: jax.Array  # float[]: smoothed B_simple = trace_cov / grad_sq_norm, clamped; 0 before any estimate
    b_simple_step: jax.Array  # float[]: this update's own clamped B_simple (unsmoothed; kept if not finite)
    clamped: jax.Array  # bool[]: b_simple had to be clamped at the last update
    clamped_count: jax.Array  # int32[]: updates whose smoothed estimate was clamped
    nonfinite_count: jax.Array  # int32[]: updates skipped because a statistic was not finite (or b < 2)
    nu: Any  # params-shaped float (preconditioner="adam"): EMA of ḡ², Adam's v; None otherwise
    grad_stats_needs: GradStatsNeeds  # static (no leaves): Σgᵢ⊙gᵢ with preconditioner="adam"


def noise_scale_estimator(
    decay: Any,
    preconditioner: str,
    b2: Any,
    eps: Any,
    precondition_after: Any,
    min_noise_scale: Any,
    max_noise_scale: Any,
):
    """init/update functions of the noise-scale tracker on a GradStats (shared by the transformation and the rule)."""
    check_unit_interval("decay", decay)
    check_choice("preconditioner", preconditioner, PRECONDITIONERS)
    check_unit_interval("b2", b2)
    check_positive("eps", eps, allow_zero=True)
    if is_concrete(precondition_after) and (
        isinstance(precondition_after, bool)
        or not jnp.issubdtype(jnp.result_type(precondition_after), jnp.integer)
        or jnp.ndim(precondition_after) != 0
        or int(precondition_after) < 0
    ):
        raise ValueError(f"precondition_after must be an integer >= 0, got {precondition_after!r}")
    check_positive("min_noise_scale", min_noise_scale)
    check_positive("max_noise_scale", max_noise_scale)
    if is_concrete(min_noise_scale) and is_concrete(max_noise_scale) and min_noise_scale >= max_noise_scale:
        raise ValueError(f"min_noise_scale={min_noise_scale} must be below max_noise_scale={max_noise_scale}")
    adam = preconditioner == "adam"

    def init(params: Any) -> NoiseScaleState:
        dtype = tree_accumulation_dtype(params)
        zero, izero = jnp.zeros((), dtype), jnp.zeros((), jnp.int32)
        nu = (
            jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), tree_accumulation_dtype(p)), params)
            if adam
            else None
        )
        return NoiseScaleState(
            count=izero,
            num_estimates=izero,
            trace_biased=zero,
            grad_sq_biased=zero,
            normaliser=zero,
            trace_cov=zero,
            grad_sq_norm=zero,
            b_simple=zero,
            b_simple_step=zero,
            clamped=jnp.zeros((), bool),
            clamped_count=izero,
            nonfinite_count=izero,
            nu=nu,
            grad_stats_needs=GradStatsNeeds(sq_sum=adam),
        )

    def update(stats: st.GradStats, state: NoiseScaleState) -> NoiseScaleState:
        dtype = state.normaliser.dtype
        raw_mean = stats.mean
        if adam:
            inverse = adam_preconditioner(state.nu, state.num_estimates, b2=b2, eps=eps)
            use = state.num_estimates >= jnp.asarray(precondition_after, jnp.int32)
            inverse = jax.tree_util.tree_map(lambda p: jnp.where(use, p, jnp.ones_like(p)), inverse)
            stats = precondition(stats, inverse)
        est = estimate_from_stats(stats)
        trace, g2 = est.trace_cov.astype(dtype), est.grad_sq_norm.astype(dtype)
        valid = jnp.isfinite(trace) & jnp.isfinite(g2)
        nu = state.nu
        if adam:  # Adam's v from the raw mean gradients (a skipped update leaves it alone)
            nu, _ = bias_corrected_ema(
                nu,
                state.normaliser,
                jax.tree_util.tree_map(lambda v, m: jnp.square(m.astype(v.dtype)), nu, raw_mean),
                b2,
                valid,
            )
        (trace_b, g2_b), norm = bias_corrected_ema(
            (state.trace_biased, state.grad_sq_biased), state.normaliser, (trace, g2), decay, valid
        )
        have = norm > 0
        safe_norm = jnp.where(have, norm, 1)
        trace_s = jnp.where(have, trace_b / safe_norm, 0)
        g2_s = jnp.where(have, g2_b / safe_norm, 0)
        bounds = dict(min_noise_scale=min_noise_scale, max_noise_scale=max_noise_scale)
        smoothed, clamped = clamp_noise_scale(trace_s, g2_s, **bounds)
        step_value, _ = clamp_noise_scale(trace, g2, **bounds)
        clamped = clamped & have
        return NoiseScaleState(
            count=optax.safe_increment(state.count),
            num_estimates=state.num_estimates + valid.astype(jnp.int32),
            trace_biased=trace_b,
            grad_sq_biased=g2_b,
            normaliser=norm,
            trace_cov=trace_s,
            grad_sq_norm=g2_s,
            b_simple=jnp.where(have, smoothed, 0).astype(dtype),
            b_simple_step=jnp.where(valid, step_value, state.b_simple_step).astype(dtype),
            clamped=clamped,
            clamped_count=state.clamped_count + clamped.astype(jnp.int32),
            nonfinite_count=state.nonfinite_count + (~valid).astype(jnp.int32),
            nu=nu,
            grad_stats_needs=state.grad_stats_needs,
        )

    return init, update


_ESTIMATOR_DOC = """      decay: EMA decay :math:`\\beta` per update of the smoothed
        :math:`\\operatorname{tr}\\Sigma` and :math:`\\lVert G\\rVert^2` (default 0.99: about a 100-update
        window), in [0, 1); 0 means no smoothing.
      preconditioner: ``"none"`` (raw gradients) or ``"adam"``: gradients divided by :math:`\\sqrt{\\hat v}+\\epsilon`,
        with :math:`v` an EMA (decay ``b2``) of :math:`\\bar g^2` kept in the state (needs ``grad_stats.sq_sum``).
      b2: decay of the Adam second moment (``preconditioner="adam"``).
      eps: Adam's :math:`\\epsilon` (``preconditioner="adam"``).
      precondition_after: use raw gradients until this many estimates have filled :math:`v` (Pollux: 5).
      min_noise_scale, max_noise_scale: clamping bounds of the estimate (see :func:`~adabatch.stats.clamp_noise_scale`).
"""


def with_estimator_doc(fn):
    fn.__doc__ = fn.__doc__.replace("      {estimator}\n", _ESTIMATOR_DOC)
    return fn


@with_estimator_doc
def noise_scale(
    decay: float = 0.99,
    *,
    preconditioner: str = "none",
    b2: float = 0.999,
    eps: float = 1e-8,
    precondition_after: int = 5,
    min_noise_scale: float = DEFAULT_MIN_NOISE_SCALE,
    max_noise_scale: float = DEFAULT_MAX_NOISE_SCALE,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Track the gradient noise scale :math:`B_\text{simple}` in the optimizer state; the updates pass through.

    Each update folds the batch's unbiased :math:`(\widehat{\operatorname{tr}\Sigma},\widehat{\lVert G\rVert^2})`
    (:func:`estimate_from_stats`, on Adam-preconditioned gradients with ``preconditioner="adam"``) into two
    bias-corrected EMAs (:func:`bias_corrected_ema`) and records

    .. math:: B_\text{simple} = \frac{\overline{\operatorname{tr}\Sigma}}{\overline{\lVert G\rVert^2}}

    clamped into ``[min_noise_scale, max_noise_scale]`` (``clamped`` flags it; a non-positive smoothed
    :math:`\lVert G\rVert^2` gives the upper bound), plus the batch's own clamped estimate ``b_simple_step``. An
    update whose statistics are not finite (NaN gradients, or :math:`b<2`) is skipped and counted in
    ``nonfinite_count``.

    Args:
      {estimator}
      per_example: ``False`` (default, the optax convention): ``updates`` is the mean gradient and ``update``
        requires the extra argument ``grad_stats``. ``True``: the leading axis of ``updates`` holds per-example
        gradients (used when no ``grad_stats`` is passed). See :func:`~adabatch.stats.read_statistics`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`NoiseScaleState`. Its ``update`` takes the mean
      gradient plus the extra argument ``grad_stats`` (returning ``updates`` unchanged), or, with
      ``per_example=True``, per-example gradients on the leading axis of ``updates`` (returning their mean), like
      the rules of :mod:`adabatch.rules`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adabatch.stats import noise_scale
      >>> tx = noise_scale(decay=0.0, per_example=True)
      >>> per_example = {"w": jnp.array([[3.0, 0.0], [1.0, 2.0]])}
      >>> mean, state = tx.update(per_example, tx.init({"w": jnp.zeros(2)}))
      >>> mean["w"].tolist(), float(state.b_simple)
      ([2.0, 1.0], 1.3333333730697632)

    References:
      McCandlish et al., "An Empirical Model of Large-Batch Training", 2018, https://arxiv.org/abs/1812.06162.
      Qiao et al., "Pollux", OSDI 2021, https://arxiv.org/abs/2008.12260.
    """
    init, update = noise_scale_estimator(
        decay, preconditioner, b2, eps, precondition_after, min_noise_scale, max_noise_scale
    )
    check_flag("per_example", per_example)
    needs = GradStatsNeeds(sq_sum=preconditioner == "adam")

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        updates, stats = read_statistics(
            updates, grad_stats, jnp.iinfo(jnp.int32).max, needs=needs, per_example=per_example, name="noise_scale"
        )
        return updates, update(stats, state)

    return optax.GradientTransformationExtraArgs(init, update_fn)
