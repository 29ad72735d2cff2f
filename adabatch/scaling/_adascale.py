r"""AdaScale (Johnson et al. 2020): the learning-rate gain of a larger batch, from per-example statistics.

References:
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
from adabatch._validation import (
    check_choice,
    check_positive,
    check_positive_int,
    check_unit_interval,
    tree_accumulation_dtype,
)
from adabatch.scaling._batch_size_scaling import FORMS, _scale

__all__ = ["ScaleByAdaScaleState", "adascale"]


class ScaleByAdaScaleState(NamedTuple):
    """State of :func:`adascale` (scalars in float32, float64 for float64 parameters)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates seen
    gain: jax.Array  # float[]: the gain r_t of the last update (1 before the first)
    progress: jax.Array  # float[]: scale-invariant iterations τ = Σ r_t (float: exact to ~1e-7 relative)
    var_biased: jax.Array  # float[]: EMA accumulator of σ²₁ = trΣ̂ (per-example variance)
    sqr_biased: jax.Array  # float[]: EMA accumulator of μ̂² = ‖ḡ‖² − trΣ̂/b
    normaliser: jax.Array  # float[]: EMA bias correction (0 before the first finite statistics)
    nonfinite_count: jax.Array  # int32[]: updates whose statistics were not finite (or b < 2): gain kept


def adascale(
    base_batch_size: int,
    *,
    form: str = "sgd",
    schedule: Callable[[jax.Array], Any] | None = None,
    smoothing: float = 0.999,
    min_variance: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaScale: multiply the updates by the gain :math:`r_t` (``form="sgd"``) or :math:`\sqrt{r_t}`
    (``form="adam"``, Pollux's AdamScale) and count scale-invariant progress :math:`\tau`.

    With :math:`b` = ``grad_stats.count`` examples, scale :math:`S = b/B_0`, per-example estimates
    :math:`\hat\sigma_1^2 = \widehat{\operatorname{tr}\Sigma}` and
    :math:`\hat\mu^2 = \lVert\bar g\rVert^2-\widehat{\operatorname{tr}\Sigma}/b` (both unbiased;
    :func:`adabatch.stats.estimate_from_stats`), smoothed by bias-corrected EMAs with decay
    :math:`\theta_t = \text{smoothing}^{S}` (Pollux's per-base-batch decay; the current batch is included), and
    clamped when read as in Pollux, :math:`\sigma^2 = \max(\overline{\sigma_1^2}/B_0, \text{min\_variance})` (the
    variance of a base-batch gradient) and :math:`\mu^2 = \max(\overline{\mu^2}, 0)`:

    .. math::
        r_t = \frac{\sigma^2 + \mu^2}{\sigma^2/S + \mu^2},\qquad
        \Delta_t = r_t^{\,p}\,\eta(\lfloor\tau_t\rfloor)\,u_t,\qquad \tau_{t+1} = \tau_t + r_t,

    with :math:`p=1` (``"sgd"``) or :math:`\tfrac12` (``"adam"``), :math:`u_t` the incoming update and
    :math:`\eta` = ``schedule`` (1 when None). :math:`1\le r_t\le S` for :math:`S\ge1`. Smoothing the raw estimates
    and clamping on read keeps the averages unbiased (FairScale clamps each step's estimates before smoothing: a
    negative :math:`\hat\mu^2`, frequent when the noise dominates, becomes 0, which biases its :math:`\mu^2`
    upwards; its variance floor rarely binds). The per-example form needs no rescaling of the averages when
    :math:`S` changes.
    Statistics that are not finite (or :math:`b<2`) skip the averages; before any finite statistics
    :math:`r_t = 1`. Progress is always advanced by :math:`r_t` (as Pollux does for both forms).

    Train with a schedule keyed on progress: ``optax.chain(optax.sgd(1.0), adascale(B0, schedule=lr_schedule))``,
    and stop when :math:`\tau` reaches the base run's number of steps. Inside ``optax.inject_hyperparams`` pass
    ``static_args="schedule"``.

    Args:
      base_batch_size: :math:`B_0\ge1`, the batch size the learning rate (schedule) was tuned at.
      form: ``"sgd"`` (gain :math:`r_t`) or ``"adam"`` (gain :math:`\sqrt{r_t}`).
      schedule: optional learning-rate multiplier as a function of :math:`\lfloor\tau_t\rfloor` (int32).
      smoothing: per-base-batch EMA decay in [0, 1) (Pollux: 0.999).
      min_variance: floor of :math:`\sigma^2` (> 0; FairScale and Pollux use 1e-6).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`ScaleByAdaScaleState`; ``update`` requires the extra
      argument ``grad_stats`` (:class:`~adabatch.GradStats` of the current batch). A ``batch_size`` extra argument
      is ignored: :math:`S` comes from ``grad_stats.count``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adabatch.stats import from_per_example
      >>> from adabatch.scaling import adascale
      >>> per_example = jnp.array([[1.0, 2.0], [3.0, -1.0], [2.0, 0.5], [0.0, 1.5]])
      >>> stats = from_per_example(per_example)
      >>> tx = optax.chain(optax.sgd(0.1), adascale(base_batch_size=1))
      >>> params = jnp.zeros(2)
      >>> _, state = tx.update(stats.mean, tx.init(params), params, grad_stats=stats)
      >>> round(float(state[1].gain), 3), round(float(state[1].progress), 3)
      (1.911, 1.911)

    References:
      Johnson, Agrawal, Gu, Guestrin, "AdaScale SGD", ICML 2020, https://arxiv.org/abs/2007.05105.
      Qiao et al., "Pollux", OSDI 2021, https://arxiv.org/abs/2008.12260.
    """
    check_positive_int("base_batch_size", base_batch_size)
    check_choice("form", form, FORMS)
    check_unit_interval("smoothing", smoothing)
    check_positive("min_variance", min_variance)
    if schedule is not None and not callable(schedule):
        raise ValueError(f"schedule must be a callable of the progress (or None), got {schedule!r}")

    def init_fn(params):
        dtype = tree_accumulation_dtype(params)
        zero = jnp.zeros((), dtype)
        return ScaleByAdaScaleState(
            count=jnp.zeros((), jnp.int32),
            gain=jnp.ones((), dtype),
            progress=zero,
            var_biased=zero,
            sqr_biased=zero,
            normaliser=zero,
            nonfinite_count=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        if not isinstance(grad_stats, st.GradStats):
            raise ValueError(
                "adascale needs the extra argument grad_stats (an adabatch.GradStats of the current batch), got "
                f"{type(grad_stats).__name__}"
            )
        dtype = state.normaliser.dtype
        b0 = jnp.asarray(base_batch_size, dtype)
        scale = jnp.asarray(grad_stats.count, dtype) / b0
        est = st.estimate_from_stats(grad_stats)
        var, sqr = est.trace_cov.astype(dtype), est.grad_sq_norm.astype(dtype)
        valid = jnp.isfinite(var) & jnp.isfinite(sqr)
        theta = jnp.asarray(smoothing, dtype) ** scale
        (var_b, sqr_b), norm = st.bias_corrected_ema(
            (state.var_biased, state.sqr_biased), state.normaliser, (var, sqr), theta, valid
        )
        have = norm > 0
        safe = jnp.where(have, norm, 1)
        sigma2 = jnp.maximum(var_b / safe / b0, jnp.asarray(min_variance, dtype))
        mu2 = jnp.maximum(sqr_b / safe, 0)
        gain = jnp.where(have, (sigma2 + mu2) / (sigma2 / scale + mu2), 1)
        factor = gain if form == "sgd" else jnp.sqrt(gain)
        if schedule is not None:
            factor = factor * jnp.asarray(schedule(jnp.floor(state.progress).astype(jnp.int32)), dtype)
        new_state = ScaleByAdaScaleState(
            count=optax.safe_increment(state.count),
            gain=gain,
            progress=state.progress + gain,
            var_biased=var_b,
            sqr_biased=sqr_b,
            normaliser=norm,
            nonfinite_count=state.nonfinite_count + (~valid).astype(jnp.int32),
        )
        return _scale(updates, factor), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
