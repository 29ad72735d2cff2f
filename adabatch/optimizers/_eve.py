"""Eve: Adam with the second moment estimated from examplewise gradients (official ``optax_eve.py`` semantics).

Adam's second moment is an EMA of the squared *minibatch* gradient :math:`\\bar g^2`. Eve keeps an EMA of the mean
*examplewise* square :math:`\\tfrac1b\\sum_i g_i^2` instead and turns it into an estimate of :math:`E[\\bar g^2]` for
batches of size :math:`b`. It reads :math:`\\sum_i g_i\\odot g_i`, so it takes per-example gradients on the leading
axis of ``updates`` or the mean gradient plus an :class:`adabatch.stats.GradStats` with ``sq_sum`` as the
``grad_stats=`` extra argument (which :func:`adabatch.make_train_step` supplies: the state declares the need).
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
from adabatch.stats import GradStatsNeeds, read_statistics

__all__ = ["ScaleByEveState", "eve", "evew", "scale_by_eve"]

_NEEDS = GradStatsNeeds(sq_sum=True)


class ScaleByEveState(NamedTuple):
    """State of :func:`scale_by_eve`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates so far (step t of the last)
    mu: optax.Updates  # params-shaped, state dtype: first moment m_t (EMA of the batch-mean gradient)
    nu: optax.Updates  # params-shaped, state dtype: s_t, EMA of the batch mean of examplewise squares (1/b) Σ g_i²
    grad_stats_needs: GradStatsNeeds  # static (no leaves): Σ g_i ⊙ g_i (sq_sum=True)


def scale_by_eve(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    per_example: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates like Adam, with the second moment estimated from examplewise gradients (Eve).

    With per-example gradients :math:`g_{t,i}`, :math:`i = 1..b`, and 1-based step :math:`t` (paper symbols →
    arguments: :math:`\beta_1` = ``b1``, :math:`\beta_2` = ``b2``, :math:`\epsilon` = ``eps``,
    :math:`\epsilon_\text{root}` = ``eps_root``):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,\tfrac1b \textstyle\sum_i g_{t,i} \\
        s_t &= \beta_2 s_{t-1} + (1-\beta_2)\,\tfrac1b \textstyle\sum_i g_{t,i}^2 \\
        \hat m_t &= m_t / (1-\beta_1^t), \qquad \hat s_t = s_t / (1-\beta_2^t) \\
        d_t &= \frac{\hat m_t}{\sqrt{\hat s_t / b + \hat m_t^2\,(1 - 1/b) + \epsilon_\text{root}} + \epsilon}

    :math:`\hat s_t/b + \hat m_t^2(1-1/b)` estimates :math:`E[\bar g^2] = \mu^2 + \sigma^2/b`, the quantity Adam's
    second moment tracks, with the examplewise variance instead of the noisy square of one minibatch mean. The
    returned update is :math:`d_t` (not negated, no learning rate).

    Inputs (``per_example`` must be declared, because per-example gradients and a mean gradient with a leading
    parameter axis look alike):

    - ``update(mean_grads, state, grad_stats=stats)``: ``stats`` an :class:`adabatch.stats.GradStats` with
      ``sq_sum``; :math:`b` is ``stats.count`` — the **whole** batch, also after :func:`adabatch.stats.merge` of
      micro-batches or devices. :math:`m_t` follows ``updates`` (so transformations chained before Eve apply to
      it), :math:`s_t` reads ``stats.sq_sum / stats.count``.
    - ``update(per_example_grads, state)`` with ``per_example=True``: every leaf of ``updates`` has the per-example
      axis first; :math:`b` is its size (at least 2).

    A mean gradient without ``grad_stats`` (and ``per_example=False``) raises a ``ValueError`` saying what is needed.

    Args:
      b1: :math:`\beta_1`, decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, decay of the examplewise second moment, in [0, 1).
      eps: :math:`\epsilon` >= 0, added to the denominator outside the square root.
      eps_root: :math:`\epsilon_\text{root}` >= 0, added inside the square root.
      per_example: ``updates`` carry per-example gradients on their leading axis (used when no ``grad_stats`` is
        passed; a ``grad_stats`` argument always takes precedence and then ``updates`` must be the mean).
      state_dtype: dtype of ``mu``/``nu``; default each parameter's dtype promoted to at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`ScaleByEveState`. Its ``update`` takes
      ``grad_stats=`` (see above; other extra arguments are ignored) and returns params-shaped updates in the dtype
      of the incoming (mean) updates. The state's ``grad_stats_needs`` declares ``sq_sum``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.optimizers import scale_by_eve
      >>> from adabatch.stats import from_per_example
      >>> per_example = jnp.array([[1.0, 2.0], [3.0, -2.0]])  # b = 2 examples, 2 parameters
      >>> tx = scale_by_eve()
      >>> stats = from_per_example(per_example, sq_sum=True)
      >>> d, state = tx.update(stats.mean, tx.init(jnp.zeros(2)), grad_stats=stats)
      >>> print(jnp.round(d, 4))  # 2 / sqrt(5/2 + 4/2) and 0 / sqrt(4/2)
      [0.9428 0.    ]
      >>> d2, _ = scale_by_eve(per_example=True).update(per_example, tx.init(jnp.zeros(2)))
      >>> bool(jnp.allclose(d, d2))
      True

    References:
      Kunze, Townsend, Barber, "Adaptive Optimization with Examplewise Gradients", 2021,
      https://arxiv.org/abs/2112.00174
    """
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    check_positive("eps", eps, allow_zero=True)
    check_positive("eps_root", eps_root, allow_zero=True)
    check_flag("per_example", per_example)
    check_state_dtype(state_dtype)

    def init_fn(params: optax.Params) -> ScaleByEveState:
        check_floating_tree("params", params)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_leaf_dtype(p, state_dtype)), params)
        return ScaleByEveState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros, grad_stats_needs=_NEEDS)

    def update_fn(
        updates: optax.Updates,
        state: ScaleByEveState,
        params: optax.Params | None = None,
        *,
        grad_stats: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByEveState]:
        del params, extra_args
        out_dtypes = jax.tree.map(jnp.result_type, updates)
        mean, stats = read_statistics(
            updates, grad_stats, jnp.iinfo(jnp.int32).max, needs=_NEEDS, per_example=per_example, name="scale_by_eve"
        )
        if grad_stats is None:  # per-example updates: the >= float32 mean, not rounded to the gradients' dtype
            mean = stats.mean
        count = optax.safe_increment(state.count)
        scalars: dict[jnp.dtype, tuple[jax.Array, ...]] = {}

        def coefficients(dtype: jnp.dtype) -> tuple[jax.Array, ...]:
            if dtype not in scalars:
                t = count.astype(dtype)
                beta1, beta2 = (jnp.asarray(v).astype(dtype) for v in (b1, b2))
                n = jnp.asarray(stats.count).astype(dtype)
                scalars[dtype] = (beta1, beta2, one_minus_pow(beta1, t), one_minus_pow(beta2, t), n)
            return scalars[dtype]

        def moments(g: jax.Array, sq: jax.Array, m: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
            beta1, beta2, _, _, n = coefficients(m.dtype)
            m = beta1 * m + (1 - beta1) * g.astype(m.dtype)
            s = beta2 * s + (1 - beta2) * (sq.astype(s.dtype) / n)
            return m, s

        mu_nu = jax.tree.map(moments, mean, stats.sq_sum, state.mu, state.nu)
        treedef = jax.tree.structure(state.mu)
        mu, nu = jax.tree.transpose(treedef, jax.tree.structure((0, 0)), mu_nu)

        def step(m: jax.Array, s: jax.Array, like: Any) -> jax.Array:
            _, _, bc1, bc2, n = coefficients(m.dtype)
            dt = m.dtype
            m_hat, s_hat = m / bc1, s / bc2
            inv_b = 1 / n
            denom = jnp.sqrt(s_hat * inv_b + m_hat * m_hat * (1 - inv_b) + jnp.asarray(eps_root).astype(dt))
            return (m_hat / (denom + jnp.asarray(eps).astype(dt))).astype(like)

        out = jax.tree.map(step, mu, nu, out_dtypes)
        return out, ScaleByEveState(count=count, mu=mu, nu=nu, grad_stats_needs=state.grad_stats_needs)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_learning_rate(learning_rate: Any) -> None:
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)


def eve(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    per_example: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The Eve optimizer (official ``optax_eve.eve``): :func:`scale_by_eve`, then the learning rate.

    :math:`\theta \leftarrow \theta - \eta\, d_t` with :math:`d_t` from :func:`scale_by_eve` and :math:`\eta` =
    ``learning_rate`` (a float or an optax schedule of the 0-based update count).

    Args:
      learning_rate: :math:`\eta` >= 0, or a schedule (the official factory has no default; 1e-3 here, Adam's).
      b1, b2, eps, eps_root, per_example, state_dtype: see :func:`scale_by_eve`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``); pass ``grad_stats=`` to ``update`` unless
      built with ``per_example=True``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import eve
      >>> params = jnp.array([1.0, -1.0])
      >>> opt = eve(learning_rate=0.1, per_example=True)
      >>> per_example = jnp.array([[0.5, 0.5], [0.5, -0.5]])  # 2 examples
      >>> updates, state = opt.update(per_example, opt.init(params))
      >>> print(jnp.round(optax.apply_updates(params, updates), 4))  # mean grad 0 on the 2nd coordinate
      [ 0.9 -1. ]

    References:
      Kunze, Townsend, Barber, "Adaptive Optimization with Examplewise Gradients", 2021,
      https://arxiv.org/abs/2112.00174
    """
    _check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_eve(b1, b2, eps, eps_root, per_example=per_example, state_dtype=state_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def evew(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    weight_decay: Any = 1e-4,
    mask: Any = None,
    *,
    per_example: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Eve with decoupled weight decay (official ``optax_eve.evew``): the decay is added before the learning rate.

    :math:`\theta \leftarrow \theta - \eta\,(d_t + \lambda\theta)` with :math:`d_t` from :func:`scale_by_eve` and
    :math:`\lambda` = ``weight_decay`` (default 1e-4, the official one), i.e.
    ``optax.chain(scale_by_eve(...), optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate))``. The authors' Flax optimizer ``Eve(weight_decay=λ)`` computes
    the same step.

    Args:
      learning_rate: :math:`\eta` >= 0, or a schedule.
      b1, b2, eps, eps_root, per_example, state_dtype: see :func:`scale_by_eve`.
      weight_decay: :math:`\lambda` >= 0.
      mask: optional pytree of bools (or a function of the params returning one) selecting the decayed leaves, as
        in ``optax.add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``) whose ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import evew
      >>> params = jnp.array([1.0, -1.0])
      >>> opt = evew(learning_rate=0.1, weight_decay=0.5, per_example=True)
      >>> per_example = jnp.array([[0.5, 0.5], [0.5, -0.5]])
      >>> updates, state = opt.update(per_example, opt.init(params), params)
      >>> print([f"{x:.4f}" for x in optax.apply_updates(params, updates).tolist()])  # θ - 0.1 (d + 0.5 θ)
      ['0.8500', '-0.9500']

    References:
      Kunze, Townsend, Barber, "Adaptive Optimization with Examplewise Gradients", 2021,
      https://arxiv.org/abs/2112.00174
    """
    _check_learning_rate(learning_rate)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    return optax.chain(
        scale_by_eve(b1, b2, eps, eps_root, per_example=per_example, state_dtype=state_dtype),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
