"""Tom (Trend over Momentum): Adam whose first moment is a Holt linear-trend smoother of the gradients.

Semantics of the authors' PyTorch optimizer (``AnirudhMaiya/Tom``, ``optimizer/tom.py``): a level and a trend
of the gradient are smoothed separately, the step follows level + trend, normalised by Adam's second moment.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch._validation import (
    check_flag,
    check_floating_tree,
    check_positive,
    check_state_dtype,
    check_unit_interval,
    one_minus_pow,
    state_leaf_dtype,
)

__all__ = ["ScaleByTomState", "scale_by_tom", "tom"]


class ScaleByTomState(NamedTuple):
    """State of :func:`scale_by_tom`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates so far (step t of the last)
    level: optax.Updates  # params-shaped, state dtype: level m_t (smoothed gradient)
    trend: optax.Updates  # params-shaped, state dtype: trend b_t (smoothed gradient difference g_t - g_{t-1})
    nu: optax.Updates  # params-shaped, state dtype: second moment v_t (EMA of g_t²)
    prev_grad: optax.Updates  # params-shaped, state dtype: the previous gradient g_{t-1} (zeros before step 1)


def scale_by_tom(
    b1: Any = 0.9,
    b2: Any = 0.99,
    b3: Any = 0.999,
    eps: Any = 1e-8,
    *,
    level_trend_bias_correction: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by Tom's trend-corrected, Adam-normalised first moment (official ``Tom.step``).

    With gradient :math:`g_t`, :math:`g_0 = 0`, 1-based step :math:`t` and zero-initialised state (paper symbols →
    arguments: :math:`\beta_1` = ``b1`` (level), :math:`\beta_2` = ``b2`` (trend), :math:`\beta_3` = ``b3``
    (second moment), :math:`\epsilon` = ``eps``):

    .. math::

        m_t &= \beta_1 (m_{t-1} + b_{t-1}) + (1-\beta_1)\, g_t \\
        b_t &= \beta_2 b_{t-1} + (1-\beta_2)(g_t - g_{t-1}) \\
        v_t &= \beta_3 v_{t-1} + (1-\beta_3)\, g_t^2 \\
        d_t &= \frac{(m_t + b_t)/c_t}{\sqrt{v_t}/\sqrt{1-\beta_3^t} + \epsilon}, \qquad
        c_t = \begin{cases} 1-(\beta_1\beta_2)^t & \text{level\_trend\_bias\_correction} \\ 1 & \text{otherwise}
        \end{cases}

    The level uses the *previous* trend (Holt's linear method with the forecast :math:`m_{t-1}+b_{t-1}`); the trend
    smooths differences of consecutive gradients (not of levels, as Holt's method would). The returned update is
    :math:`d_t`, not negated, without learning rate; the official step is :math:`\theta \leftarrow \theta - \eta d_t`.

    Args:
      b1: :math:`\beta_1`, decay of the level, in [0, 1).
      b2: :math:`\beta_2`, decay of the trend, in [0, 1).
      b3: :math:`\beta_3`, decay of the second moment, in [0, 1).
      eps: :math:`\epsilon` >= 0, added to the bias-corrected root second moment.
      level_trend_bias_correction: divide level + trend by :math:`1-(\beta_1\beta_2)^t` (the official
        ``use_bias_correction_for_level_trend``, off by default).
      state_dtype: dtype of the state buffers; default each parameter's dtype promoted to at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments ignored) with a :class:`ScaleByTomState`;
      updates come back in the dtype of the incoming updates.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.optimizers import scale_by_tom
      >>> tx = scale_by_tom()
      >>> d, state = tx.update(jnp.array([1.0, -2.0]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(d, 4))  # step 1: (0.1 g + 0.01 g) / |g| = 0.11 sign(g)
      [ 0.11 -0.11]

    References:
      Maiya, Sricharan, Pandey, Srinivas K. S., "Tom: Leveraging trend of the observed gradients for faster
      convergence", 2021, https://arxiv.org/abs/2109.03820
    """
    for name, beta in (("b1", b1), ("b2", b2), ("b3", b3)):
        check_unit_interval(name, beta)
    check_positive("eps", eps, allow_zero=True)
    check_flag("level_trend_bias_correction", level_trend_bias_correction)
    check_state_dtype(state_dtype)

    def init_fn(params: optax.Params) -> ScaleByTomState:
        check_floating_tree("params", params)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_leaf_dtype(p, state_dtype)), params)
        return ScaleByTomState(count=jnp.zeros([], jnp.int32), level=zeros, trend=zeros, nu=zeros, prev_grad=zeros)

    def update_fn(
        updates: optax.Updates, state: ScaleByTomState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, ScaleByTomState]:
        del params, extra_args
        check_floating_tree("updates", updates)
        count = optax.safe_increment(state.count)
        scalars: dict[jnp.dtype, tuple[jax.Array, ...]] = {}

        def coefficients(dtype: jnp.dtype) -> tuple[jax.Array, ...]:
            if dtype not in scalars:
                t = count.astype(dtype)
                beta1, beta2, beta3, epsilon = (jnp.asarray(v).astype(dtype) for v in (b1, b2, b3, eps))
                c = one_minus_pow(beta1 * beta2, t) if level_trend_bias_correction else jnp.ones((), dtype)
                root_bc3 = jnp.sqrt(one_minus_pow(beta3, t))
                scalars[dtype] = (beta1, beta2, beta3, epsilon, c, root_bc3)
            return scalars[dtype]

        def leaf(g: Any, m: jax.Array, b: jax.Array, v: jax.Array, g_prev: jax.Array) -> tuple[jax.Array, ...]:
            beta1, beta2, beta3, epsilon, c, root_bc3 = coefficients(m.dtype)
            out_dtype = jnp.result_type(g)
            g = jnp.asarray(g).astype(m.dtype)
            m = beta1 * (m + b) + (1 - beta1) * g
            b = beta2 * b + (1 - beta2) * (g - g_prev)
            v = beta3 * v + (1 - beta3) * g * g
            d = ((m + b) / c) / (jnp.sqrt(v) / root_bc3 + epsilon)
            return d.astype(out_dtype), m, b, v, g

        results = jax.tree.map(leaf, updates, state.level, state.trend, state.nu, state.prev_grad)
        treedef = jax.tree.structure(state.level)
        out, level, trend, nu, prev = jax.tree.transpose(treedef, jax.tree.structure((0,) * 5), results)
        return out, ScaleByTomState(count=count, level=level, trend=trend, nu=nu, prev_grad=prev)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tom(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.99,
    b3: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    level_trend_bias_correction: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The official Tom optimizer as an optax chain: L2 weight decay, :func:`scale_by_tom`, the learning rate.

    The weight decay is classic L2, added to the gradient before everything else as the official code does
    (:math:`g_t \leftarrow g_t + \lambda\theta`, so the stored previous gradient includes it); then
    :math:`\theta \leftarrow \theta - \eta d_t` with :math:`d_t` from :func:`scale_by_tom`.

    Args:
      learning_rate: :math:`\eta` >= 0, or an optax schedule of the 0-based update count.
      b1, b2, b3, eps, level_trend_bias_correction, state_dtype: see :func:`scale_by_tom`.
      weight_decay: :math:`\lambda` >= 0 (L2).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``). Its ``update`` needs ``params`` unless
      ``weight_decay`` is the Python number 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import tom
      >>> params = jnp.array([1.0, -2.0])
      >>> opt = tom(learning_rate=0.1)
      >>> updates, state = opt.update(jnp.array([0.5, 0.5]), opt.init(params))
      >>> print([f"{x:.4f}" for x in optax.apply_updates(params, updates).tolist()])  # θ - 0.1 * 0.11 sign(g)
      ['0.9890', '-2.0110']

    References:
      Maiya, Sricharan, Pandey, Srinivas K. S., "Tom: Leveraging trend of the observed gradients for faster
      convergence", 2021, https://arxiv.org/abs/2109.03820
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    no_decay = isinstance(weight_decay, int | float) and weight_decay == 0
    decay = optax.identity() if no_decay else optax.add_decayed_weights(weight_decay)
    return optax.chain(
        decay,
        scale_by_tom(b1, b2, b3, eps, level_trend_bias_correction=level_trend_bias_correction, state_dtype=state_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )
