"""MaxVA (maximum variation averaging): Adam/LaProp with a per-coordinate adaptive β that maximises the variance.

Semantics of the authors' code (``zhuchen03/MaxVA``): the LaProp-style ``LaMadam``
(``image_classification/optim_laprop.py``) and the Adam-style ``MAdam`` (``image_classification/optim_adam.py``),
selected by ``form``. Both replace Adam's fixed-decay second moment by a weighted mean whose per-coordinate weight
:math:`\\beta_t` is chosen, in closed form, to maximise the estimated variance of the gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch._validation import (
    check_choice,
    check_flag,
    check_floating_tree,
    check_positive,
    check_state_dtype,
    check_unit_interval,
    is_concrete,
    one_minus_pow,
    state_leaf_dtype,
    tree_accumulation_dtype,
)

__all__ = ["ScaleByMaxVAState", "maxva", "scale_by_maxva"]

_FORMS = ("lamadam", "madam")

# Official defaults per form: (beta_max, eps, weight_decouple).
_DEFAULTS = {"lamadam": (0.98, 1e-15, False), "madam": (0.999, 1e-8, True)}

_TINY = 1e-16  # the constant the official code adds to the denominator of the optimal beta


class ScaleByMaxVAState(NamedTuple):
    """State of :func:`scale_by_maxva`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates so far (step t of the last)
    mu: optax.Updates  # params-shaped, state dtype: ũ_t, β_t-weighted sum of gradients (u_t = ũ_t / w_t)
    nu: optax.Updates  # params-shaped, state dtype: ṽ_t, β_t-weighted sum of squared gradients (v_t = ṽ_t / w_t)
    weight: optax.Updates  # params-shaped, state dtype: w_t = β_t w_{t-1} + 1 - β_t, total weight (0 before step 1)
    momentum: optax.Updates  # params-shaped, state dtype: LaMadam: d_t (lr-weighted EMA of g/denom); MAdam: m̃_t
    lr_sum: jax.Array | None  # shape (), float (lamadam): L_t = μ L_{t-1} + (1-μ) η_t; None for madam
    denom_max: optax.Updates  # params-shaped (madam with amsgrad): running max of the denominator; None otherwise


def _check_betas(b1: Any, beta_min: Any, beta_max: Any) -> None:
    check_unit_interval("b1", b1)
    check_unit_interval("beta_min", beta_min)
    check_unit_interval("beta_max", beta_max)
    if is_concrete(beta_min) and is_concrete(beta_max) and float(beta_min) > float(beta_max):
        raise ValueError(f"beta_min={beta_min!r} must not exceed beta_max={beta_max!r}")


def scale_by_maxva(
    form: str = "lamadam",
    b1: Any = 0.9,
    beta_min: Any = 0.5,
    beta_max: Any = None,
    eps: Any = None,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    amsgrad: bool = False,
    nesterov: bool = False,
    paper_eps: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates with MaxVA's variance-maximising second moment, LaProp-style or Adam-style.

    **Adaptive averaging** (both forms; per coordinate, gradient :math:`g_t`, 1-based step :math:`t`,
    :math:`\tilde u_0 = \tilde v_0 = w_0 = 0`): with :math:`u = \tilde u_{t-1}/w_{t-1}`,
    :math:`v = \tilde v_{t-1}/w_{t-1}`, :math:`\sigma^2 = v - u^2`, :math:`\Delta^2 = (g_t - u)^2`,

    .. math::

        \tilde\beta_t &= \frac{\Delta^2 + \sigma^2}{w_{t-1}(\Delta^2 - \sigma^2) + \Delta^2 + \sigma^2 + 10^{-16}},
        \qquad \beta_t = \operatorname{clip}(\tilde\beta_t, \underline\beta, \overline\beta)
        \quad(\beta_1 = \overline\beta) \\
        \tilde u_t &= \beta_t \tilde u_{t-1} + (1-\beta_t) g_t, \quad
        \tilde v_t = \beta_t \tilde v_{t-1} + (1-\beta_t) g_t^2, \quad
        w_t = \beta_t w_{t-1} + 1 - \beta_t, \quad
        r_t = \sqrt{\tilde v_t / w_t} + \epsilon

    (with :math:`\underline\beta = \overline\beta` this is Adam's bias-corrected EMA, :math:`w_t = 1-\overline\beta^t`).

    **LaMadam** (``form="lamadam"``, LaProp-style: momentum of normalised gradients), :math:`\mu` = ``b1``,
    :math:`\eta_t` = ``learning_rate`` at this step (1 if None):

    .. math::

        d_t = \mu d_{t-1} + (1-\mu)\,\eta_t\, g_t / r_t, \qquad L_t = \mu L_{t-1} + (1-\mu)\,\eta_t, \qquad
        \text{update} = d_t / L_t

    (Nesterov: :math:`(\mu d_t + (1-\mu)\eta_t g_t/r_t)/L_t`.) The official code keeps the learning rate inside the
    momentum (``lr / update_lr_bc``); passing the same ``learning_rate`` here reproduces that weighting under
    schedules, and the result is still a weighted *average* of normalised gradients — the learning rate itself is
    applied by the alias. With a constant (or no) learning rate, :math:`L_t = \eta(1-\mu^t)` and the update is
    LaProp's bias-corrected momentum.

    **MAdam** (``form="madam"``, Adam-style), :math:`\beta_1` = ``b1``:

    .. math::

        \tilde m_t = \beta_1 \tilde m_{t-1} + (1-\beta_1) g_t, \qquad
        \text{update} = \frac{\tilde m_t}{(1-\beta_1^t)\, r_t}

    (Nesterov: :math:`\beta_1\tilde m_t + (1-\beta_1)g_t` in place of :math:`\tilde m_t`; ``amsgrad``: :math:`r_t`
    replaced by its running maximum, which includes :math:`\epsilon`, as in the official code.) With
    ``paper_eps=True`` the denominator is the paper's :math:`(\sqrt{\tilde v_t}+\epsilon)/\sqrt{w_t}`, i.e.
    :math:`\epsilon/\sqrt{w_t}` in place of :math:`\epsilon` (the official code adds :math:`\epsilon` after
    normalising by :math:`w_t`).

    The update is not negated and carries no learning rate.

    Args:
      form: ``"lamadam"`` (default; the official ``LaMadam``) or ``"madam"`` (the official ``MAdam``).
      b1: momentum :math:`\mu` (LaMadam ``momentum``) / first-moment decay :math:`\beta_1` (MAdam ``beta1``), in
        [0, 1); official default 0.9 for both.
      beta_min: :math:`\underline\beta` in [0, 1), lower clip of :math:`\beta_t` (official 0.5 for both).
      beta_max: :math:`\overline\beta` in [beta_min, 1), upper clip and the first step's decay; default 0.98
        (LaMadam ``beta``) or 0.999 (MAdam ``beta2_range[1]``).
      eps: :math:`\epsilon` >= 0; default 1e-15 (LaMadam) or 1e-8 (MAdam).
      learning_rate: LaMadam only: the learning rate (float or schedule of the 0-based update count) that weights
        the momentum as in the official code; None weighs every step equally (exact for constant rates).
      amsgrad: MAdam only: normalise by the running maximum of :math:`r_t`. (The official LaMadam accepts the
        flag but never reads it; here it raises for ``form="lamadam"``.)
      nesterov: use the Nesterov form of the momentum (official ``nesterov`` of MAdam and of fairseq's LaMAdam).
      paper_eps: MAdam only: the paper's placement of :math:`\epsilon` (see above).
      state_dtype: dtype of the state buffers; default each parameter's dtype promoted to at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments ignored) with a :class:`ScaleByMaxVAState`;
      updates come back in the dtype of the incoming updates.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.optimizers import scale_by_maxva
      >>> tx = scale_by_maxva("madam")
      >>> state = tx.init(jnp.zeros(2))
      >>> d, state = tx.update(jnp.array([1.0, -2.0]), state)  # step 1: Adam's first step g / |g|, w = 1 - 0.999
      >>> print([f"{x:.4f}" for x in d.tolist()], [f"{x:.4f}" for x in state.weight.tolist()])
      ['1.0000', '-1.0000'] ['0.0010', '0.0010']
      >>> d, state = tx.update(jnp.array([3.0, -2.0]), state)  # beta_t = 0.999 (clipped) and 0.5 (repeated g)
      >>> print([f"{x:.4f}" for x in d.tolist()], [f"{x:.4f}" for x in state.weight.tolist()])
      ['0.9178', '-1.0000'] ['0.0020', '0.5005']

    References:
      Zhu, Cheng, Gan, Huang, Liu, Goldstein, "MaxVA: Fast Adaptation of Step Sizes by Maximizing Observed Variance
      of Gradients" (also "Adaptive Learning Rates with Maximum Variation Averaging"), 2020,
      https://arxiv.org/abs/2006.11918
    """
    check_choice("form", form, _FORMS)
    default_beta_max, default_eps, _ = _DEFAULTS[form]
    beta_max = default_beta_max if beta_max is None else beta_max
    eps = default_eps if eps is None else eps
    _check_betas(b1, beta_min, beta_max)
    check_positive("eps", eps, allow_zero=True)
    for name, flag in (("amsgrad", amsgrad), ("nesterov", nesterov), ("paper_eps", paper_eps)):
        check_flag(name, flag)
    lamadam = form == "lamadam"
    if lamadam and amsgrad:
        raise ValueError("amsgrad=True needs form='madam' (the official LaMadam accepts amsgrad but never uses it)")
    if lamadam and paper_eps:
        raise ValueError("paper_eps=True needs form='madam' (it is the paper's MAdam denominator)")
    if learning_rate is not None and not lamadam:
        raise ValueError("learning_rate is only used by form='lamadam' (MAdam applies it outside); pass None")
    if learning_rate is not None and not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)
    check_state_dtype(state_dtype)

    def init_fn(params: optax.Params) -> ScaleByMaxVAState:
        check_floating_tree("params", params)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_leaf_dtype(p, state_dtype)), params)
        scalar_dtype = jnp.dtype(state_dtype) if state_dtype is not None else tree_accumulation_dtype(params)
        return ScaleByMaxVAState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros,
            nu=zeros,
            weight=zeros,
            momentum=zeros,
            lr_sum=jnp.zeros([], scalar_dtype) if lamadam else None,
            denom_max=zeros if amsgrad else None,
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByMaxVAState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, ScaleByMaxVAState]:
        del params, extra_args
        check_floating_tree("updates", updates)
        count = optax.safe_increment(state.count)
        # LaMadam's learning-rate weighting (scalars; unused by MAdam, whose state has lr_sum=None).
        prev_sum = state.lr_sum if state.lr_sum is not None else jnp.zeros([], jnp.float32)
        if learning_rate is None:
            lr_t = jnp.ones([], prev_sum.dtype)
        else:
            lr_now = learning_rate(state.count) if callable(learning_rate) else learning_rate
            lr_t = jnp.asarray(lr_now).astype(prev_sum.dtype)
        mom = jnp.asarray(b1).astype(prev_sum.dtype)
        lr_sum = mom * prev_sum + (1 - mom) * lr_t
        scalars: dict[jnp.dtype, dict[str, jax.Array]] = {}

        def coefficients(dtype: jnp.dtype) -> dict[str, jax.Array]:
            if dtype not in scalars:
                c = {k: jnp.asarray(v).astype(dtype) for k, v in (("b1", b1), ("lo", beta_min), ("hi", beta_max))}
                c["eps"] = jnp.asarray(eps).astype(dtype)
                c["first"] = count == 1
                c["fixed"] = c["lo"] == c["hi"]
                if lamadam:
                    c["lr"] = lr_t.astype(dtype)
                    c["lr_sum"] = lr_sum.astype(dtype)
                else:
                    c["bc1"] = one_minus_pow(c["b1"], count.astype(dtype))
                scalars[dtype] = c
            return scalars[dtype]

        def averaging(g: jax.Array, u: jax.Array, v: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
            c = coefficients(u.dtype)
            safe_w = jnp.where(w > 0, w, 1)
            u_hat, v_hat = u / safe_w, v / safe_w
            # A variance: negative only through rounding, and then (in float32, when two consecutive gradients
            # nearly coincide) it can flip beta from beta_max to beta_min. Clamped at 0; float64 runs are unchanged.
            sigma2 = jnp.maximum(v_hat - u_hat * u_hat, 0)
            delta2 = (g - u_hat) ** 2
            total = delta2 + sigma2
            beta = total / ((delta2 - sigma2) * w + total + _TINY)
            beta = jnp.clip(beta, c["lo"], c["hi"])
            # Step 1 (w = 0) and lo == hi: the official fixed-decay branch.
            beta = jnp.where(c["first"] | c["fixed"], c["hi"], beta)
            u = beta * u + (1 - beta) * g
            v = beta * v + (1 - beta) * g * g
            w = beta * w + (1 - beta)
            return u, v, w

        def leaf(g: Any, u, v, w, mom_buf, r_max) -> tuple[Any, ...]:
            c = coefficients(u.dtype)
            out_dtype = jnp.result_type(g)
            g = jnp.asarray(g).astype(u.dtype)
            u, v, w = averaging(g, u, v, w)
            eps_t = c["eps"] / jnp.sqrt(w) if paper_eps else c["eps"]
            r = jnp.sqrt(v / w) + eps_t
            if amsgrad:
                r_max = jnp.maximum(r_max, r)
                r = r_max
            if lamadam:
                step_in = (1 - c["b1"]) * c["lr"] * (g / r)
                mom_buf = c["b1"] * mom_buf + step_in
                numer = c["b1"] * mom_buf + step_in if nesterov else mom_buf
                have = c["lr_sum"] > 0
                d = jnp.where(have, numer / jnp.where(have, c["lr_sum"], 1), 0)
            else:
                mom_buf = c["b1"] * mom_buf + (1 - c["b1"]) * g
                numer = c["b1"] * mom_buf + (1 - c["b1"]) * g if nesterov else mom_buf
                d = numer / c["bc1"] / r
            return d.astype(out_dtype), u, v, w, mom_buf, r_max

        # Without amsgrad the running maximum is not kept: pass a placeholder tree and drop what comes back.
        r_max_in = state.denom_max if amsgrad else state.mu
        results = jax.tree.map(leaf, updates, state.mu, state.nu, state.weight, state.momentum, r_max_in)
        treedef = jax.tree.structure(state.mu)
        out, mu, nu, weight, momentum, r_max = jax.tree.transpose(treedef, jax.tree.structure((0,) * 6), results)
        return out, ScaleByMaxVAState(
            count=count,
            mu=mu,
            nu=nu,
            weight=weight,
            momentum=momentum,
            lr_sum=lr_sum if lamadam else None,
            denom_max=r_max if amsgrad else None,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def maxva(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    form: str = "lamadam",
    b1: Any = 0.9,
    beta_min: Any = 0.5,
    beta_max: Any = None,
    eps: Any = None,
    weight_decay: Any = 0.0,
    *,
    weight_decouple: bool | None = None,
    amsgrad: bool = False,
    nesterov: bool = False,
    paper_eps: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The official MaxVA optimizers (``LaMadam`` and ``MAdam``) as an optax chain.

    The step :math:`d_t` is :func:`scale_by_maxva` (for LaMadam with the same ``learning_rate``, which weights its
    momentum as the official code does); with :math:`\eta` = ``learning_rate`` and :math:`\lambda` =
    ``weight_decay`` the parameters move as

    - ``weight_decouple=True`` (MAdam's default ``adamw=True``; LaMadam's ``use_adamw=True``):
      :math:`\theta \leftarrow \theta - \eta(d_t + \lambda\theta)`;
    - ``weight_decouple=False`` (LaMadam's default): L2, :math:`g_t \leftarrow g_t + \lambda\theta` before
      everything else.

    Args:
      learning_rate: :math:`\eta` >= 0, or an optax schedule of the 0-based update count (official default 1e-3).
      form, b1, beta_min, beta_max, eps, amsgrad, nesterov, paper_eps, state_dtype: see :func:`scale_by_maxva`.
      weight_decay: :math:`\lambda` >= 0 (official default 0).
      weight_decouple: decoupled (AdamW-style) decay instead of L2; None picks the form's official default
        (``False`` for LaMadam, ``True`` for MAdam).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``). Its ``update`` needs ``params`` unless
      ``weight_decay`` is the Python number 0.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import maxva
      >>> params = jnp.array([1.0, -2.0])
      >>> opt = maxva(learning_rate=0.1)  # LaMadam
      >>> updates, state = opt.update(jnp.array([0.5, 0.5]), opt.init(params))
      >>> print(jnp.round(optax.apply_updates(params, updates), 4))  # first step: lr * sign(g)
      [ 0.9 -2.1]

    References:
      Zhu, Cheng, Gan, Huang, Liu, Goldstein, "MaxVA: Fast Adaptation of Step Sizes by Maximizing Observed Variance
      of Gradients", 2020, https://arxiv.org/abs/2006.11918
    """
    check_choice("form", form, _FORMS)
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    if weight_decouple is None:
        weight_decouple = _DEFAULTS[form][2]
    check_flag("weight_decouple", weight_decouple)
    core = scale_by_maxva(
        form,
        b1,
        beta_min,
        beta_max,
        eps,
        learning_rate=learning_rate if form == "lamadam" else None,
        amsgrad=amsgrad,
        nesterov=nesterov,
        paper_eps=paper_eps,
        state_dtype=state_dtype,
    )
    no_decay = isinstance(weight_decay, int | float) and weight_decay == 0
    decay = optax.identity() if no_decay else optax.add_decayed_weights(weight_decay)
    if weight_decouple:
        return optax.chain(core, decay, optax.scale_by_learning_rate(learning_rate))
    return optax.chain(decay, core, optax.scale_by_learning_rate(learning_rate))
