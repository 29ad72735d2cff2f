r"""A batch-size rule that follows the gradient noise scale :math:`B_\text{simple}` (McCandlish et al. 2018).

The estimate comes from the tracker of :mod:`adabatch.stats` (:func:`adabatch.stats.noise_scale`, bias-corrected
EMAs of :math:`\widehat{\operatorname{tr}\Sigma}` and :math:`\widehat{\lVert G\rVert^2}`); this module turns it into
a decision with hysteresis against thrashing and the same options as the tests of :mod:`adabatch.rules`.

References:
  McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018,
  https://arxiv.org/abs/1812.06162.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch._validation import check_flag, check_positive
from adabatch.rules._common import (
    DEFAULT_INIT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    check_rule_arguments,
    round_batch_size,
)
from adabatch.stats import GradStatsNeeds, read_statistics
from adabatch.stats._noise_scale import (
    DEFAULT_MAX_NOISE_SCALE,
    DEFAULT_MIN_NOISE_SCALE,
    NoiseScaleState,
    noise_scale_estimator,
    with_estimator_doc,
)

__all__ = ["NoiseScaleRuleState", "noise_scale_rule"]


class NoiseScaleRuleState(NamedTuple):
    """State of :func:`noise_scale_rule`."""

    next_batch_size: jax.Array  # int32[]: the decision, size of the next batch
    change_count: jax.Array  # int32[]: how many times the decision changed
    noise: NoiseScaleState  # the tracker's state (B_simple and its ingredients)


@with_estimator_doc
def noise_scale_rule(
    multiplier: float = 1.0,
    *,
    min_relative_change: float = 0.1,
    monotone: bool = True,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    decay: float = 0.99,
    preconditioner: str = "none",
    b2: float = 0.999,
    eps: float = 1e-8,
    precondition_after: int = 5,
    min_noise_scale: float = DEFAULT_MIN_NOISE_SCALE,
    max_noise_scale: float = DEFAULT_MAX_NOISE_SCALE,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""A batch-size rule that follows the gradient noise scale: next batch :math:`\approx c\,B_\text{simple}`.

    With :math:`\hat B` the smoothed, clamped :math:`B_\text{simple}` of :func:`~adabatch.stats.noise_scale` and
    :math:`b_k` the current decision, every ``test_interval`` updates the candidate is

    .. math:: b' = \min\bigl(B_{\max}, \operatorname{roundup}_G(\lceil c\hat B\rceil)\bigr)
        \quad(\text{with }\texttt{monotone}: b' \leftarrow \max(b', b_k, b)),

    and the decision becomes :math:`b'` only if :math:`|b'-b_k| > \rho\,b_k` (hysteresis against thrashing,
    :math:`\rho` = ``min_relative_change``) or :math:`b' = B_{\max} \le c\hat B` (the cap is always reachable),
    else stays :math:`b_k`. While the estimate is flagged (``clamped``:
    the smoothed :math:`\lVert G\rVert^2` is not positive yet) or absent, the decision is held. McCandlish et al.
    show the critical batch size is about :math:`B_\text{noise}\approx B_\text{simple}`: a batch there spends
    roughly twice the minimal steps and twice the minimal examples.

    Args:
      multiplier: :math:`c>0`, the target batch as a multiple of :math:`B_\text{simple}`.
      min_relative_change: :math:`\rho\ge0`; smaller relative changes are ignored.
      monotone: never shrink the batch (the default, like the tests of :mod:`adabatch.rules`); also floors the
        decision at the current batch's own size.
      max_batch_size, init_batch_size, granularity, test_interval: as in :func:`adabatch.norm_test`.
      {estimator}
      per_example: as in :func:`adabatch.norm_test`: ``False`` (default) requires ``grad_stats=``, ``True`` reads
        per-example gradients on the leading axis of ``updates``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`NoiseScaleRuleState`; the mean gradient plus
      ``grad_stats=``, or per-example ``updates`` with ``per_example=True``, as :func:`~adabatch.stats.noise_scale`.
      Read the decision with :func:`adabatch.next_batch_size`.

    Example:
      >>> import jax.numpy as jnp
      >>> import adabatch
      >>> from adabatch.rules import noise_scale_rule
      >>> tx = noise_scale_rule(decay=0.0, init_batch_size=2, max_batch_size=64, per_example=True)
      >>> noisy = {"w": jnp.array([[3.0, 1.0], [-1.0, 0.5], [2.5, 1.5], [-1.0, 1.0]])}
      >>> _, state = tx.update(noisy, tx.init({"w": jnp.zeros(2)}))
      >>> int(adabatch.next_batch_size(state)), round(float(state.noise.b_simple), 2)
      (10, 9.04)

    References:
      McCandlish et al., "An Empirical Model of Large-Batch Training", 2018, https://arxiv.org/abs/1812.06162.
    """
    check_positive("multiplier", multiplier)
    check_positive("min_relative_change", min_relative_change, allow_zero=True)
    if not isinstance(monotone, bool):
        raise ValueError(f"monotone must be a Python bool, got {monotone!r}")
    check_rule_arguments(max_batch_size, init_batch_size, granularity, test_interval)
    check_flag("per_example", per_example)
    init, update = noise_scale_estimator(
        decay, preconditioner, b2, eps, precondition_after, min_noise_scale, max_noise_scale
    )
    needs = GradStatsNeeds(sq_sum=preconditioner == "adam")

    def init_fn(params):
        return NoiseScaleRuleState(
            next_batch_size=jnp.asarray(init_batch_size, jnp.int32),
            change_count=jnp.zeros((), jnp.int32),
            noise=init(params),
        )

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        updates, stats = read_statistics(
            updates, grad_stats, max_batch_size, needs=needs, per_example=per_example, name="noise_scale_rule"
        )
        noise = update(stats, state.noise)
        cap = jnp.asarray(max_batch_size, jnp.int32)
        target = jnp.asarray(multiplier, noise.b_simple.dtype) * noise.b_simple
        proposed = jnp.ceil(jnp.minimum(target, cap.astype(target.dtype))).astype(jnp.int32)
        current = state.next_batch_size
        if monotone:
            proposed = jnp.maximum(proposed, jnp.maximum(current, jnp.asarray(stats.count, jnp.int32)))
        proposed = round_batch_size(proposed, granularity, cap)
        relative = jnp.abs(proposed - current).astype(jnp.float32) / jnp.maximum(current, 1).astype(jnp.float32)
        scheduled = state.noise.count % jnp.asarray(test_interval, jnp.int32) == 0
        usable = (noise.num_estimates > 0) & ~noise.clamped
        to_cap = (proposed == cap) & (target >= cap.astype(target.dtype))  # the cap is always reachable
        big_enough = (relative > jnp.asarray(min_relative_change, jnp.float32)) | to_cap
        change = scheduled & usable & big_enough & (proposed != current)
        return updates, NoiseScaleRuleState(
            next_batch_size=jnp.where(change, proposed, current),
            change_count=state.change_count + change.astype(jnp.int32),
            noise=noise,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
