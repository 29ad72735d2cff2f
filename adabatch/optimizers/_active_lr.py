"""ActiveLR: a per-coordinate gain on any optimizer's step, from the sign of gradients summed over a period.

The semantics are those of the authors' PyTorch classes (``davoodwadi/ConsciousLR``: ``ActiveAdam.py`` and
``ActiveBelief.py``): when the gain changes, which gradient it sums, how weight decay sees it, and the defaults of
each class (they differ between the two files).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adabatch._validation import (
    check_choice,
    check_flag,
    check_floating_tree,
    check_positive,
    check_positive_int,
    check_state_dtype,
    check_unit_interval,
    is_concrete,
    state_leaf_dtype,
)
from adabatch.optimizers._adabelief import scale_by_belief

__all__ = ["ActiveLRState", "active_adabelief", "active_adam", "active_lr"]

_INCREASE = ("additive", "multiplicative")


class ActiveLRState(NamedTuple):
    """State of :func:`active_lr`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) shape (), int32: number of updates taken so far (the step index t of the last update)
    gain: optax.Updates  # params-shaped, state dtype: per-coordinate gain gamma (starts at 1)
    accum: optax.Updates  # params-shaped, state dtype: c, sum of the gradients of the current (unfinished) period
    prev_accum: optax.Updates  # params-shaped, state dtype: c_prev, sum over the last complete period (0 before)
    inner_state: optax.OptState  # the wrapped transformation's state


def _check_gain_factors(lr_high: Any, lr_low: Any, increase: str) -> None:
    check_choice("increase", increase, _INCREASE)
    check_positive("lr_low", lr_low)
    if is_concrete(lr_low) and float(np.asarray(lr_low)) > 1:
        raise ValueError(f"lr_low must lie in (0, 1], got {lr_low!r}")
    check_positive("lr_high", lr_high, allow_zero=True)
    if increase == "multiplicative" and is_concrete(lr_high) and float(np.asarray(lr_high)) < 1:
        raise ValueError(
            f"lr_high must be >= 1 with increase='multiplicative' (a factor that raises the gain), got {lr_high!r}"
        )


def active_lr(
    inner: optax.GradientTransformation,
    *,
    period: int,
    lr_high: Any = 2.0,
    lr_low: Any = 0.5,
    increase: str = "additive",
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Multiply ``inner``'s step by a per-coordinate gain that adapts to sign changes of period-summed gradients.

    With gradient :math:`g_t`, 1-based step :math:`t`, period :math:`K` = ``period`` (the official ``stepSize``, an
    "epoch" of steps), :math:`\alpha_{high}` = ``lr_high`` and :math:`\alpha_{low}` = ``lr_low``, and :math:`u_t` the
    output of ``inner`` for :math:`g_t`:

    .. math::

        c_t &= c_{t-1} + g_t \\
        d_t &= \gamma_{t-1} \odot u_t \\
        \gamma_t &= \begin{cases}
            \gamma_{t-1} \alpha_{low} & \text{where } c^{prev} \odot c_t \le 0 \\
            \gamma_{t-1} + \alpha_{high} \ (\text{or } \gamma_{t-1}\alpha_{high}) & \text{elsewhere}
        \end{cases} \quad \text{if } K \mid t \text{ and } t \ge 2K,\ \text{else } \gamma_t = \gamma_{t-1}

    and at the end of every period (:math:`K \mid t`) :math:`c^{prev} \leftarrow c_t`, :math:`c_t \leftarrow 0`;
    :math:`\gamma_0 = 1`, :math:`c_0 = 0`. So the gain multiplies the step of the update on which it was decided only
    from the next step on, and first changes at :math:`t = 2K` (the official order: accumulate, step with the current
    gain, then compare the two last periods). A zero product (a coordinate whose summed gradient is exactly 0) counts
    as a sign change. The increase is additive (:math:`\gamma + \alpha_{high}`, the official code) or, with
    ``increase="multiplicative"``, :math:`\gamma\,\alpha_{high}`.

    The gain multiplies whatever ``inner`` returns: a ``scale_by_*`` block (then chain
    ``optax.scale_by_learning_rate`` after it, as :func:`active_adam` does) or a whole optimizer such as
    ``optax.adam(1e-3)``. The accumulator sums the updates ``active_lr`` receives, i.e. the raw gradients when it
    comes first in the chain; put an L2 term inside ``inner`` to keep it out of the sums, as ActiveBelief does.

    Args:
      inner: any optax transformation; its extra arguments (``value=...`` etc.) are passed through.
      period: :math:`K`, an integer >= 1: the number of steps summed before each sign comparison.
      lr_high: :math:`\alpha_{high}` >= 0 (>= 1 with ``increase="multiplicative"``): the gain's increase where the
        summed gradient kept its sign.
      lr_low: :math:`\alpha_{low}` in (0, 1]: the gain's factor where the sign changed.
      increase: ``"additive"`` (official code) or ``"multiplicative"``.
      state_dtype: dtype of the gain and accumulators; default each parameter's dtype promoted to at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an :class:`ActiveLRState`. Updates come back in the
      dtype of ``inner``'s updates.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import active_lr
      >>> tx = active_lr(optax.sgd(0.1), period=1, lr_high=1.0, lr_low=0.5)
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in ([1.0, 1.0], [1.0, -1.0], [1.0, 1.0]):
      ...     u, state = tx.update(jnp.array(g), state)
      >>> print(state.gain, u)  # gains after t=2 ([1+1, 1*0.5]) then t=3 ([2+1, 0.5*0.5]); u used [2, 0.5]
      [3.   0.25] [-0.2  -0.05]

    References:
      Wadi, Fredette, Senecal, "Read the Signs: Towards Invariance to Gradient Descent's Hyperparameter
      Initialization", 2023, https://arxiv.org/abs/2301.10133
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise ValueError(f"inner must be an optax GradientTransformation, got {inner!r}")
    check_positive_int("period", period)
    _check_gain_factors(lr_high, lr_low, increase)
    check_state_dtype(state_dtype)
    inner = optax.with_extra_args_support(inner)
    if is_concrete(period):
        period = int(period)  # else traced (optax.inject_hyperparams): the arithmetic below works on arrays too

    def init_fn(params: optax.Params) -> ActiveLRState:
        check_floating_tree("params", params)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_leaf_dtype(p, state_dtype)), params)
        return ActiveLRState(
            count=jnp.zeros([], jnp.int32),
            gain=jax.tree.map(lambda p: jnp.ones(jnp.shape(p), state_leaf_dtype(p, state_dtype)), params),
            accum=zeros,
            prev_accum=zeros,
            inner_state=inner.init(params),
        )

    def update_fn(
        updates: optax.Updates, state: ActiveLRState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, ActiveLRState]:
        check_floating_tree("updates", updates)
        count = optax.safe_increment(state.count)
        accum = jax.tree.map(lambda c, g: c + g.astype(c.dtype), state.accum, updates)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        out = jax.tree.map(lambda u, gain: (gain * u).astype(jnp.result_type(u)), inner_updates, state.gain)

        end_of_period = count % period == 0
        compare = end_of_period & (count >= 2 * period)

        def new_gain(gain: jax.Array, prev: jax.Array, c: jax.Array) -> jax.Array:
            high, low = jnp.asarray(lr_high, gain.dtype), jnp.asarray(lr_low, gain.dtype)
            raised = gain + high if increase == "additive" else gain * high
            changed = jnp.where(prev * c <= 0, gain * low, raised)
            return jnp.where(compare, changed, gain)

        gain = jax.tree.map(new_gain, state.gain, state.prev_accum, accum)
        prev_accum = jax.tree.map(lambda p, c: jnp.where(end_of_period, c, p), state.prev_accum, accum)
        accum = jax.tree.map(lambda c: jnp.where(end_of_period, jnp.zeros_like(c), c), accum)
        return out, ActiveLRState(count, gain, accum, prev_accum, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def active_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-2,
    *,
    period: int,
    lr_high: Any = 2.0,
    lr_low: Any = 0.5,
    increase: str = "additive",
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ActiveAdam(W), the official ``ActiveAdam`` class: Adam with decoupled weight decay under an ActiveLR gain.

    With :math:`\eta` = ``learning_rate``, :math:`\lambda` = ``weight_decay`` and the gain :math:`\gamma_{t-1}` of
    :func:`active_lr` (summing the raw gradients :math:`g_t`):

    .. math::

        \theta \leftarrow \theta\,(1 - \eta\gamma_{t-1}\lambda) - \eta\,\gamma_{t-1}\,
        \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    with Adam's bias-corrected moments :math:`\hat m_t, \hat v_t` (``b1``, ``b2``, ``eps``; ``optax.scale_by_adam``).
    The weight decay uses the current gain, as in the official code (so it is
    ``active_lr(optax.chain(optax.scale_by_adam(...), optax.add_decayed_weights(weight_decay)))``).
    The official ``amsgrad`` flag computes a denominator that is never used, so it is not offered.

    Args:
      learning_rate: :math:`\eta` >= 0, or a schedule of the 0-based step.
      b1: :math:`\beta_1` in [0, 1).
      b2: :math:`\beta_2` in [0, 1).
      eps: :math:`\epsilon` >= 0, added to :math:`\sqrt{\hat v_t}`.
      weight_decay: :math:`\lambda` >= 0 (official default 1e-2).
      period: see :func:`active_lr` (the official ``stepSize``; required, as there).
      lr_high: see :func:`active_lr`; official default 2.0.
      lr_low: see :func:`active_lr`; official default 0.5.
      increase: see :func:`active_lr`.
      state_dtype: dtype of the gain, the accumulators and Adam's first moment.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` unless ``weight_decay`` is the
      Python number 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import active_adam
      >>> params = jnp.array([1.0, -2.0])
      >>> opt = active_adam(0.1, weight_decay=0.0, period=2)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([0.5, -0.5]), state, params)
      >>> print(jnp.round(optax.apply_updates(params, updates), 4))  # first Adam step: lr * sign(g)
      [ 0.9 -1.9]

    References:
      Wadi, Fredette, Senecal, "Read the Signs: Towards Invariance to Gradient Descent's Hyperparameter
      Initialization", 2023, https://arxiv.org/abs/2301.10133
    """
    _check_lr(learning_rate)
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    check_positive("eps", eps, allow_zero=True)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    check_state_dtype(state_dtype)
    adam = optax.scale_by_adam(b1, b2, eps, mu_dtype=state_dtype)
    # identity() has the same (empty) state as add_decayed_weights, so the state tree does not depend on a Python 0.
    decay = optax.identity() if _is_zero(weight_decay) else optax.add_decayed_weights(weight_decay)
    inner = optax.chain(adam, decay)
    return optax.chain(
        active_lr(inner, period=period, lr_high=lr_high, lr_low=lr_low, increase=increase, state_dtype=state_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def active_adabelief(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    period: int,
    weight_decouple: bool = False,
    fixed_decay: bool = False,
    lr_high: Any = 0.05,
    lr_low: Any = 0.95,
    increase: str = "additive",
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The official ``ActiveBelief`` class: non-rectified AdaBelief under an ActiveLR gain.

    The step is :math:`\theta \leftarrow \theta - \eta\,\gamma_{t-1} d_t` with :math:`d_t` the AdaBelief step of
    :func:`scale_by_belief` with ``rectify=False`` (:math:`\epsilon` added into the stored belief every step and to
    the denominator) and :math:`\gamma` the gain of :func:`active_lr`, which sums the raw gradients. Weight decay
    never sees the gain:

    - not ``weight_decouple`` (default, L2): :math:`g_t \leftarrow g_t + \lambda\theta` before the moments, but not
      in the gain's sums;
    - ``weight_decouple``: :math:`\theta \leftarrow \theta(1 - \eta\lambda)`; with ``fixed_decay``,
      :math:`\theta \leftarrow \theta(1 - \lambda)`.

    Defaults are those of ``ActiveBelief.py``, which differ from ``ActiveAdam.py``: ``lr_high=0.05``,
    ``lr_low=0.95``, ``eps=1e-8``, ``weight_decay=0`` and L2 decay. The official ``rectify`` and ``amsgrad`` options
    run an older AdaBelief core than ``adabelief-pytorch`` v0.2.1 and are not offered; wrap
    ``scale_by_belief(rectify=True)`` in :func:`active_lr` for a rectified variant (v0.2.1 semantics).

    Args:
      learning_rate: :math:`\eta` >= 0, or a schedule of the 0-based step.
      b1: :math:`\beta_1` in [0, 1).
      b2: :math:`\beta_2` in [0, 1).
      eps: :math:`\epsilon` >= 0.
      weight_decay: :math:`\lambda` >= 0.
      period: see :func:`active_lr` (the official ``stepSize``; required, as there).
      weight_decouple: decoupled (AdamW-style) decay instead of L2.
      fixed_decay: with ``weight_decouple``, decay by :math:`\lambda` rather than :math:`\eta\lambda`.
      lr_high: see :func:`active_lr`; official default 0.05.
      lr_low: see :func:`active_lr`; official default 0.95.
      increase: see :func:`active_lr`.
      state_dtype: dtype of the gain, the accumulators and the belief moments.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` unless ``weight_decay`` is the
      Python number 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import active_adabelief
      >>> params = jnp.array([1.0, -2.0])
      >>> opt = active_adabelief(0.1, period=2)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([0.5, 0.5]), state, params)
      >>> print(jnp.round(optax.apply_updates(params, updates), 4))  # first step: lr / b1 per coordinate
      [ 0.8889 -2.1111]

    References:
      Wadi, Fredette, Senecal, "Read the Signs: Towards Invariance to Gradient Descent's Hyperparameter
      Initialization", 2023, https://arxiv.org/abs/2301.10133

      Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020,
      https://arxiv.org/abs/2010.07468
    """
    _check_lr(learning_rate)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    check_flag("weight_decouple", weight_decouple)
    check_flag("fixed_decay", fixed_decay)
    belief = scale_by_belief(b1, b2, eps, rectify=False, state_dtype=state_dtype)
    no_decay = _is_zero(weight_decay)
    decay = optax.identity() if no_decay else optax.add_decayed_weights(weight_decay)

    def gained(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        return active_lr(
            inner, period=period, lr_high=lr_high, lr_low=lr_low, increase=increase, state_dtype=state_dtype
        )

    if not weight_decouple:
        return optax.chain(gained(optax.chain(decay, belief)), optax.scale_by_learning_rate(learning_rate))
    if fixed_decay:
        # theta - (lr * gamma * d + wd * theta): scale by +lr, add the decay, then flip the sign.
        return optax.chain(
            gained(belief), optax.scale_by_learning_rate(learning_rate, flip_sign=False), decay, optax.scale(-1.0)
        )
    return optax.chain(gained(belief), decay, optax.scale_by_learning_rate(learning_rate))


def _check_lr(learning_rate: Any) -> None:
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)


def _is_zero(value: Any) -> bool:
    """A Python 0 needs no params (and no decay transformation)."""
    return isinstance(value, int | float) and value == 0
