"""AdaBelief with the semantics of the authors' reference implementation (``adabelief-pytorch`` v0.2.1).

The official optimizer differs from ``optax.adabelief`` in ways that change the trajectory: its default update is
*rectified* (RAdam-style, with an SGD-with-momentum warm-up), it has an AMSGrad variant, weight decay can be
decoupled, fixed or classic L2, and one ``eps`` serves both as the term added into the stored belief every step and as
the denominator term (optax's ``eps_root`` and ``eps``). This module reproduces it.
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
    state_leaf_dtype,
)

__all__ = ["ScaleByBeliefState", "adabelief", "scale_by_belief"]


class ScaleByBeliefState(NamedTuple):
    """State of :func:`scale_by_belief`."""

    # count: shape (), int32: number of updates taken so far (the step index t of the last update)
    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count)
    mu: optax.Updates  # params-shaped, state dtype: first moment m_t (EMA of gradients)
    nu: optax.Updates  # params-shaped, state dtype: belief s_t (EMA of (g - m)^2, eps added in every step)
    nu_max: optax.Updates  # params-shaped, state dtype: running max of s_t if amsgrad=True; None (no leaves) otherwise


def _one_minus_pow(log_beta: jax.Array, t: jax.Array) -> jax.Array:
    """``1 - beta**t`` without the cancellation of the naive form (``log_beta = log(beta)``; beta = 0 gives 1)."""
    return -jnp.expm1(t * log_beta)


def _sma_length(t: jax.Array, b2: jax.Array, log_b2: jax.Array, bc2: jax.Array) -> jax.Array:
    """RAdam's ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``, computed without catastrophic cancellation.

    For ``x = 1 - b2`` small the naive form subtracts two numbers of size ``2/x`` to get a result of size ``t``, which
    in float32 loses enough digits to misplace the ``rho_t >= 5`` switch (e.g. ``rho_5 = 4.996`` for ``b2 = 0.999``).
    With ``L = -log(b2)`` and ``v = t L`` the identity ``rho_t = 2 (L - x) / (x L) + 2 t (1/v - 1/expm1(v)) - 1`` has
    only well-conditioned terms once ``L - x`` and ``1/v - 1/expm1(v)`` use their series for small arguments.
    """
    x = 1 - b2
    # Accurate branch, used for x < 0.1 (computed on a clipped x so the unused branch stays finite).
    xs = jnp.minimum(x, 0.1)
    big_l = -jnp.log1p(-xs)
    series: float | jax.Array = 1 / 18  # L - x = sum_{k>=2} x^k / k, truncated where x < 0.1 leaves < 1e-17 relative
    for k in range(17, 1, -1):
        series = 1 / k + xs * series
    l_minus_x = xs * xs * series
    v = t * big_l
    v_small = jnp.minimum(v, 0.5)
    # 1/v - 1/expm1(v) = 1/2 - sum_k B_2k v^(2k-1) / (2k)!, truncated where v < 0.5 leaves < 2e-15 relative
    series = 0.0
    for coef in (-691 / 1307674368000, 1 / 47900160, -1 / 1209600, 1 / 30240, -1 / 720, 1 / 12):
        series = coef + v_small * v_small * series
    g_series = 1 / 2 - v_small * series
    v_large = jnp.maximum(v, 0.5)
    g_direct = 1 / v_large - 1 / jnp.expm1(v_large)
    g = jnp.where(v < 0.5, g_series, g_direct)
    rho_accurate = 2 * l_minus_x / (xs * big_l) + 2 * t * g - 1
    # Direct branch for x >= 0.1, where rho_inf <= 19 and the subtraction is harmless (also covers b2 = 0).
    rho_direct = (2 / x - 1) - 2 * t * jnp.exp(t * log_b2) / bc2
    return jnp.where(x < 0.1, rho_accurate, rho_direct)


def scale_by_belief(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-16,
    *,
    amsgrad: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by the belief in observed gradients, exactly as the official AdaBelief (v0.2.1).

    With gradient :math:`g_t` and 1-based step :math:`t` (paper symbols → arguments: :math:`\beta_1` = ``b1``,
    :math:`\beta_2` = ``b2``, :math:`\epsilon` = ``eps``):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        s_t &= \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon \\
        d_t &= \frac{m_t / (1-\beta_1^t)}{\sqrt{s_t}/\sqrt{1-\beta_2^t} + \epsilon}
        \quad\text{(rectify=False; with amsgrad } s_t \to \hat s_t = \max(\hat s_{t-1}, s_t))

    With ``rectify=True`` (default), :math:`\rho_\infty = 2/(1-\beta_2) - 1`,
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`; if :math:`\rho_t \ge 5`,
    :math:`d_t = r_t m_t / ((1-\beta_1^t)(\sqrt{s_t} + \epsilon))` with
    :math:`r_t = \sqrt{(1-\beta_2^t)(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}`
    (this branch uses :math:`s_t`, not the AMSGrad maximum, as the official code does); otherwise
    :math:`d_t = m_t/(1-\beta_1^t)` when ``degenerated_to_sgd`` and :math:`d_t = 0` if not (the moments still move).

    The returned update is :math:`d_t`, not negated and not scaled by a learning rate; the official step is
    :math:`\theta \leftarrow \theta - \text{lr}\, d_t`.

    Differences from ``optax.scale_by_belief``: optax has no rectification, AMSGrad or SGD warm-up, and splits
    :math:`\epsilon` into ``eps_root`` (added into the stored belief, default 1e-16) and ``eps`` (added to the
    denominator, default 1e-16); with ``rectify=False`` and ``eps_root == eps`` the two coincide.

    Quirk kept from the official code: with ``rectify=True`` AMSGrad only maintains ``nu_max``; the rectified branch
    normalises by :math:`s_t` and the warm-up branch has no denominator, so the updates are those without AMSGrad.

    Args:
      b1: :math:`\beta_1`, decay of the first moment, in [0, 1).
      b2: :math:`\beta_2`, decay of the belief, in [0, 1).
      eps: :math:`\epsilon` >= 0, added to the belief state every step and to the denominator.
      amsgrad: keep the running maximum of :math:`s_t` and normalise by it (only when ``rectify=False``).
      rectify: use the RAdam-style rectified update.
      degenerated_to_sgd: with ``rectify``, take bias-corrected momentum steps while :math:`\rho_t < 5` instead of
        skipping them.
      state_dtype: dtype of ``mu``/``nu``/``nu_max``; default each parameter's dtype promoted to at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments ignored) whose state is an
      :class:`ScaleByBeliefState`. ``nu_max`` is ``None`` unless ``amsgrad`` (saving a params-sized buffer;
      ``amsgrad`` is static, so the state tree is fixed for a given transformation). Updates come back in the
      dtype of the incoming updates.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.optimizers import scale_by_belief
      >>> tx = scale_by_belief()
      >>> state = tx.init(jnp.zeros(3))
      >>> d, state = tx.update(jnp.array([1.0, -2.0, 3.0]), state)  # rho_1 = 1 < 5: bias-corrected momentum
      >>> print(jnp.round(d, 4), int(state.count))
      [ 1. -2.  3.] 1

    References:
      Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020,
      https://arxiv.org/abs/2010.07468
    """
    check_unit_interval("b1", b1)
    check_unit_interval("b2", b2)
    check_positive("eps", eps, allow_zero=True)
    for name, flag in (("amsgrad", amsgrad), ("rectify", rectify), ("degenerated_to_sgd", degenerated_to_sgd)):
        check_flag(name, flag)
    check_state_dtype(state_dtype)

    def init_fn(params: optax.Params) -> ScaleByBeliefState:
        check_floating_tree("params", params)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_leaf_dtype(p, state_dtype)), params)
        return ScaleByBeliefState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros,
            nu=zeros,
            nu_max=zeros if amsgrad else None,
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByBeliefState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, ScaleByBeliefState]:
        del params, extra_args
        check_floating_tree("updates", updates)
        count = optax.safe_increment(state.count)
        scalars: dict[jnp.dtype, dict[str, jax.Array]] = {}

        def coefficients(dtype: jnp.dtype) -> dict[str, jax.Array]:
            # Scalar factors, computed once per state dtype (t is traced; b1/b2/eps may be traced too).
            if dtype not in scalars:
                t = count.astype(dtype)
                beta1, beta2, epsilon = (jnp.asarray(v).astype(dtype) for v in (b1, b2, eps))
                log_b1, log_b2 = jnp.log(beta1), jnp.log(beta2)
                c = {"b1": beta1, "b2": beta2, "eps": epsilon}
                c["bc1"] = _one_minus_pow(log_b1, t)
                c["bc2"] = _one_minus_pow(log_b2, t)
                if rectify:
                    rho_t = _sma_length(t, beta2, log_b2, c["bc2"])
                    rho_inf = 2 / (1 - beta2) - 1
                    ok = rho_t >= 5
                    r2 = c["bc2"] * (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
                    c["rectified"] = ok
                    c["r"] = jnp.sqrt(jnp.where(ok, r2, 0))
                scalars[dtype] = c
            return scalars[dtype]

        def moments(g: jax.Array, m: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
            c = coefficients(m.dtype)
            g = g.astype(m.dtype)
            m = c["b1"] * m + (1 - c["b1"]) * g
            resid = g - m
            s = c["b2"] * s + (1 - c["b2"]) * resid * resid + c["eps"]
            return m, s

        mu_nu = jax.tree.map(moments, updates, state.mu, state.nu)
        treedef = jax.tree.structure(updates)
        mu, nu = jax.tree.transpose(treedef, jax.tree.structure((0, 0)), mu_nu)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else None
        denom_state = nu_max if amsgrad else nu

        def step(g: jax.Array, m: jax.Array, s: jax.Array, s_den: jax.Array) -> jax.Array:
            c = coefficients(m.dtype)
            if not rectify:
                d = (m / c["bc1"]) / (jnp.sqrt(s_den) / jnp.sqrt(c["bc2"]) + c["eps"])
            else:
                d_rect = (c["r"] / c["bc1"]) * m / (jnp.sqrt(s) + c["eps"])
                d_warm = m / c["bc1"] if degenerated_to_sgd else jnp.zeros_like(m)
                d = jnp.where(c["rectified"], d_rect, d_warm)
            return d.astype(jnp.result_type(g))

        out = jax.tree.map(step, updates, mu, nu, denom_state)
        return out, ScaleByBeliefState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adabelief(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-16,
    weight_decay: Any = 0.0,
    *,
    amsgrad: bool = False,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The official AdaBelief optimizer (``adabelief-pytorch`` v0.2.1) as an optax chain.

    The step :math:`d_t` is :func:`scale_by_belief` (see there for the moment and rectification equations); with
    :math:`\eta` = ``learning_rate`` (a float or an optax schedule of the 0-based update count) and
    :math:`\lambda` = ``weight_decay`` the parameters move as

    - ``weight_decouple`` and not ``fixed_decay`` (default): :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta d_t`;
    - ``weight_decouple`` and ``fixed_decay``: :math:`\theta \leftarrow \theta(1-\lambda) - \eta d_t`;
    - not ``weight_decouple`` (L2): :math:`g_t \leftarrow g_t + \lambda\theta` before the moments.

    The decay is applied on every step, including rectified steps that are skipped
    (``degenerated_to_sgd=False``).

    Differences from ``optax.adabelief``: optax has no rectification (the official default), AMSGrad, SGD warm-up
    or weight decay of any kind, and it splits the official single ``eps`` into ``eps_root`` (added into the stored
    belief every step) and ``eps`` (added to the denominator), each 1e-16 by default. ``optax.adabelief(lr, b1, b2,
    eps=e, eps_root=e)`` equals ``adabelief(lr, b1, b2, eps=e, rectify=False)`` up to rounding.

    Args:
      learning_rate: :math:`\eta` >= 0, or a schedule.
      b1: :math:`\beta_1` in [0, 1).
      b2: :math:`\beta_2` in [0, 1).
      eps: :math:`\epsilon` >= 0 (≈ the square of Adam's eps: 1e-16 for transformers/GANs, 1e-8 for CNNs).
      weight_decay: :math:`\lambda` >= 0.
      amsgrad: see :func:`scale_by_belief`.
      weight_decouple: decoupled (AdamW-style) decay instead of L2.
      fixed_decay: with ``weight_decouple``, decay by :math:`\lambda` rather than :math:`\eta\lambda`.
      rectify: see :func:`scale_by_belief`.
      degenerated_to_sgd: see :func:`scale_by_belief`.
      state_dtype: see :func:`scale_by_belief`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``). Its ``update`` needs ``params`` unless
      ``weight_decay`` is the Python number 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import adabelief
      >>> params = jnp.array([1.0, -2.0])
      >>> opt = adabelief(learning_rate=0.1, rectify=False)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([0.5, 0.5]), state, params)
      >>> print(jnp.round(optax.apply_updates(params, updates), 4))  # first step: lr / b1 per coordinate
      [ 0.8889 -2.1111]

    References:
      Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020,
      https://arxiv.org/abs/2010.07468
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    for name, flag in (("weight_decouple", weight_decouple), ("fixed_decay", fixed_decay)):
        check_flag(name, flag)
    belief = scale_by_belief(
        b1,
        b2,
        eps,
        amsgrad=amsgrad,
        rectify=rectify,
        degenerated_to_sgd=degenerated_to_sgd,
        state_dtype=state_dtype,
    )
    # A Python 0 needs no params; identity() has the same (empty) state, so the state tree does not depend on it.
    no_decay = isinstance(weight_decay, int | float) and weight_decay == 0
    decay = optax.identity() if no_decay else optax.add_decayed_weights(weight_decay)
    if not weight_decouple:
        return optax.chain(decay, belief, optax.scale_by_learning_rate(learning_rate))
    if fixed_decay:
        # theta - (lr * d + wd * theta): scale by +lr, add the decay, then flip the sign.
        return optax.chain(
            belief, optax.scale_by_learning_rate(learning_rate, flip_sign=False), decay, optax.scale(-1.0)
        )
    return optax.chain(belief, decay, optax.scale_by_learning_rate(learning_rate))
