r"""EXTRAP-SGD: SGD with Nesterov momentum stepping along the gradient at an extrapolated point.

Lin, Kong, Stich, Jaggi, "Extrapolation for large-batch training in deep learning" (ICML 2020): an extragradient
step. From the gradient :math:`g_t` at :math:`\theta_t` the method extrapolates to :math:`\tilde\theta_t = \theta_t -
\tilde\gamma_t g_t`, takes the gradient :math:`\tilde g_t` there, and updates :math:`\theta_t` with SGD + Nesterov
momentum along :math:`\tilde g_t`. That needs a *second gradient evaluation* at a point that depends on the
state, which an ``optax.GradientTransformation`` cannot do by itself (it never sees the loss). The protocol:

1. the state :class:`ScaleByExtrapSGDState` holds, in its field ``extrapolation_step``, the extrapolation step
   size :math:`\tilde\gamma_t` of the coming update (the schedule at the current count); its presence anywhere in
   an optimizer state is the declaration that the transformation needs a second gradient
   (:func:`needs_extrapolated_grads`);
2. the caller computes :math:`g_t`, then :math:`\tilde\theta_t` = :func:`extrapolate` ``(params, opt_state, g_t)``,
   then :math:`\tilde g_t` at :math:`\tilde\theta_t` on the same batch;
3. the caller passes it: ``tx.update(g_t, opt_state, params, extrapolated_grads=g̃_t)``. Without it the update
   raises a ``ValueError`` (it never silently degrades to SGD).

:func:`adabatch.make_train_step` (and so :func:`adabatch.fit` and ``adabatch train --optimizer extrap_sgd``) does
steps 2 and 3 whenever the state declares the need.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch._validation import (
    accumulation_dtype,
    check_flag,
    check_floating_tree,
    check_positive,
    check_state_dtype,
    check_unit_interval,
    state_leaf_dtype,
    tree_accumulation_dtype,
)

__all__ = [
    "ScaleByExtrapSGDState",
    "extrap_sgd",
    "extrapolate",
    "needs_extrapolated_grads",
    "scale_by_extrap_sgd",
]

EXTRAPOLATION_FIELD = "extrapolation_step"  # the state field whose presence declares the need for a second gradient


class ScaleByExtrapSGDState(NamedTuple):
    """State of :func:`scale_by_extrap_sgd`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates so far
    trace: optax.Updates  # params-shaped, state dtype: momentum buffer u_t (zeros before the first update)
    extrapolation_step: jax.Array  # float[] (state dtype of the first leaf): γ̃ of the coming update (schedule(count))


def _missing_message() -> str:
    return (
        "scale_by_extrap_sgd (EXTRAP-SGD) steps along the gradient at the extrapolated point θ̃ = θ − γ̃·g and got no "
        "extrapolated_grads=. Compute θ̃ = adabatch.extrapolate(params, opt_state, grads), the gradient g̃ of the same "
        "batch at θ̃, and call tx.update(grads, opt_state, params, extrapolated_grads=g̃) — or let "
        "adabatch.make_train_step (fit, `adabatch train`) do it: it evaluates the second gradient whenever the "
        "optimizer state declares the need (adabatch.needs_extrapolated_grads)."
    )


def _step_size(rate: optax.ScalarOrSchedule, count: jax.Array, dtype: Any) -> jax.Array:
    value = rate(count) if callable(rate) else rate
    return jnp.asarray(value).astype(dtype)


def scale_by_extrap_sgd(
    extrapolation_rate: optax.ScalarOrSchedule,
    momentum: Any = 0.9,
    *,
    nesterov: bool = True,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Nesterov momentum of the gradient at the extrapolated point (EXTRAP-SGD's update direction).

    With the gradient :math:`g_t` at :math:`\theta_t` (``updates``), the extrapolation step :math:`\tilde\gamma_t`
    (``extrapolation_rate``, at the 0-based count :math:`t`), the gradient :math:`\tilde g_t` at the extrapolated
    point (the extra argument ``extrapolated_grads``), momentum :math:`m` (``momentum``) and :math:`u_{-1} = 0`:

    .. math::

        \tilde\theta_t &= \theta_t - \tilde\gamma_t\, g_t \qquad \text{(done by the caller: :func:`extrapolate`)} \\
        \tilde g_t &= \nabla f_{\mathcal B_t}(\tilde\theta_t) \qquad \text{(same batch; done by the caller)} \\
        u_t &= m\, u_{t-1} + \tilde g_t \\
        d_t &= \begin{cases} \tilde g_t + m\, u_t & \text{nesterov} \\ u_t & \text{otherwise} \end{cases}

    The returned update is :math:`d_t`, not negated, without learning rate; EXTRAP-SGD steps
    :math:`\theta_{t+1} = \theta_t - \gamma_t d_t` (:func:`extrap_sgd`). :math:`g_t` itself is read only for
    its shapes: the direction is built from :math:`\tilde g_t` alone. The state keeps :math:`\tilde\gamma_t` of the
    coming update in ``extrapolation_step`` (the declaration read by :func:`needs_extrapolated_grads`), so that
    :func:`extrapolate` needs nothing but the state.

    Args:
      extrapolation_rate: :math:`\tilde\gamma` >= 0, a float or an optax schedule of the 0-based update count
        (:func:`extrap_sgd` passes its learning rate).
      momentum: :math:`m`, in [0, 1).
      nesterov: Nesterov's form :math:`\tilde g_t + m u_t` (the paper's) or heavy ball :math:`u_t`.
      state_dtype: dtype of the momentum buffer and of ``extrapolation_step``; default each parameter's dtype
        promoted to at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`ScaleByExtrapSGDState`. Its ``update`` needs the
      extra argument ``extrapolated_grads`` (a tree like ``updates``) and raises a ``ValueError`` without it;
      updates come back in the dtype of the incoming ``updates``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.optimizers import extrapolate, scale_by_extrap_sgd
      >>> tx = scale_by_extrap_sgd(0.5, momentum=0.0)
      >>> params, state = jnp.array([1.0, -2.0]), tx.init(jnp.zeros(2))
      >>> grads = params  # ∇ of ½‖θ‖²
      >>> tilde = extrapolate(params, state, grads)  # θ − 0.5 g
      >>> d, state = tx.update(grads, state, params, extrapolated_grads=tilde)  # ∇ at θ̃ is θ̃
      >>> print(d)
      [ 0.5 -1. ]

    References:
      Lin, Kong, Stich, Jaggi, "Extrapolation for Large-batch Training in Deep Learning", ICML 2020,
      https://arxiv.org/abs/2006.05720
    """
    if not callable(extrapolation_rate):
        check_positive("extrapolation_rate", extrapolation_rate, allow_zero=True)
    check_unit_interval("momentum", momentum)
    check_flag("nesterov", nesterov)
    check_state_dtype(state_dtype)

    def init_fn(params: optax.Params) -> ScaleByExtrapSGDState:
        check_floating_tree("params", params)
        trace = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_leaf_dtype(p, state_dtype)), params)
        scalar = jnp.dtype(state_dtype) if state_dtype is not None else tree_accumulation_dtype(params)
        count = jnp.zeros([], jnp.int32)
        return ScaleByExtrapSGDState(
            count=count, trace=trace, extrapolation_step=_step_size(extrapolation_rate, count, scalar)
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByExtrapSGDState,
        params: optax.Params | None = None,
        *,
        extrapolated_grads: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByExtrapSGDState]:
        del params, extra_args
        if extrapolated_grads is None:
            raise ValueError(_missing_message())
        check_floating_tree("updates", updates)
        check_floating_tree("extrapolated_grads", extrapolated_grads)
        ours, theirs = jax.tree.structure(updates), jax.tree.structure(extrapolated_grads)
        if ours != theirs:  # type: ignore[operator]  # jaxlib ships no stub for PyTreeDef
            raise ValueError(f"extrapolated_grads must have the tree of the updates; got {theirs}, expected {ours}")
        for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(extrapolated_grads), strict=True):
            if jnp.shape(u) != jnp.shape(e):
                raise ValueError(f"extrapolated_grads leaf of shape {jnp.shape(e)} does not match {jnp.shape(u)}")
        count = optax.safe_increment(state.count)

        def leaf(g: Any, g_tilde: Any, u: jax.Array) -> tuple[jax.Array, jax.Array]:
            m = jnp.asarray(momentum).astype(u.dtype)
            g_tilde = jnp.asarray(g_tilde).astype(u.dtype)
            u = m * u + g_tilde
            d = g_tilde + m * u if nesterov else u
            return d.astype(jnp.result_type(g)), u

        results = jax.tree.map(leaf, updates, extrapolated_grads, state.trace)
        treedef = jax.tree.structure(state.trace)
        out, trace = jax.tree.transpose(treedef, jax.tree.structure((0, 0)), results)
        step = _step_size(extrapolation_rate, count, state.extrapolation_step.dtype)
        return out, ScaleByExtrapSGDState(count=count, trace=trace, extrapolation_step=step)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def extrap_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Any = 0.9,
    *,
    nesterov: bool = True,
    extrapolation_rate: optax.ScalarOrSchedule | None = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""EXTRAP-SGD: extrapolate with the batch gradient, step with Nesterov momentum of the gradient found there.

    One step, with the learning rate :math:`\gamma_t` (``learning_rate``) and the extrapolation step
    :math:`\tilde\gamma_t` (``extrapolation_rate``, by default :math:`\gamma_t` as in the paper), both at the 0-based
    step :math:`t`:

    .. math::

        g_t = \nabla f_{\mathcal B_t}(\theta_t), \quad \tilde\theta_t = \theta_t - \tilde\gamma_t g_t, \quad
        \tilde g_t = \nabla f_{\mathcal B_t}(\tilde\theta_t), \quad u_t = m u_{t-1} + \tilde g_t, \quad
        \theta_{t+1} = \theta_t - \gamma_t(\tilde g_t + m u_t)

    ``optax.chain(scale_by_extrap_sgd(...), optax.scale_by_learning_rate(learning_rate))``. The update needs the
    second gradient as ``extrapolated_grads=`` (see :func:`scale_by_extrap_sgd` and :func:`extrapolate`);
    :func:`adabatch.make_train_step` supplies it, at the cost of a second gradient evaluation per step.

    Args:
      learning_rate: :math:`\gamma` >= 0, a float or an optax schedule of the 0-based update count.
      momentum: :math:`m`, in [0, 1).
      nesterov: Nesterov momentum (default, as in the paper) or heavy ball.
      extrapolation_rate: :math:`\tilde\gamma` >= 0, float or schedule; None (default) uses ``learning_rate``.
      state_dtype: see :func:`scale_by_extrap_sgd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``) whose ``update`` needs
      ``extrapolated_grads=``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from adabatch.optimizers import extrap_sgd, extrapolate
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)
      >>> opt, w = extrap_sgd(0.1), jnp.array([1.0, -2.0])
      >>> state = opt.init(w)
      >>> for _ in range(50):
      ...     g = jax.grad(loss)(w)
      ...     g_tilde = jax.grad(loss)(extrapolate(w, state, g))
      ...     updates, state = opt.update(g, state, w, extrapolated_grads=g_tilde)
      ...     w = optax.apply_updates(w, updates)
      >>> bool(loss(w) < 1e-3)
      True

    References:
      Lin, Kong, Stich, Jaggi, "Extrapolation for Large-batch Training in Deep Learning", ICML 2020,
      https://arxiv.org/abs/2006.05720
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)
    rate = learning_rate if extrapolation_rate is None else extrapolation_rate
    return optax.chain(
        scale_by_extrap_sgd(rate, momentum, nesterov=nesterov, state_dtype=state_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )


def _declarations(opt_state: Any) -> list[Any]:
    return [value for _, value in optax.tree_utils.tree_get_all_with_path(opt_state, EXTRAPOLATION_FIELD)]


def needs_extrapolated_grads(opt_state: Any) -> bool:
    """Whether a transformation in ``opt_state`` (any nesting) needs the gradient at the extrapolated point.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adabatch.optimizers import extrap_sgd, needs_extrapolated_grads
      >>> needs_extrapolated_grads(extrap_sgd(0.1).init(jnp.zeros(3))), needs_extrapolated_grads(
      ...     optax.sgd(0.1).init(jnp.zeros(3)))
      (True, False)
    """
    return bool(_declarations(opt_state))


def extrapolate(params: optax.Params, opt_state: Any, grads: optax.Updates) -> optax.Params:
    r"""The extrapolated point :math:`\tilde\theta = \theta - \tilde\gamma_t\, g` of the coming update.

    :math:`\tilde\gamma_t` is the ``extrapolation_step`` of the :class:`ScaleByExtrapSGDState` found in
    ``opt_state`` (any nesting: ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``). Computed in
    each parameter's dtype promoted to at least float32, returned in the parameters' dtypes.

    Args:
      params: the parameters :math:`\theta_t`.
      opt_state: the optimizer state, holding exactly one :class:`ScaleByExtrapSGDState`.
      grads: the gradient :math:`g_t` at ``params`` (a tree like ``params``).

    Returns:
      :math:`\tilde\theta_t`, a tree like ``params``.

    Raises:
      ValueError: when ``opt_state`` holds no :class:`ScaleByExtrapSGDState`, or more than one.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.optimizers import extrap_sgd, extrapolate
      >>> opt = extrap_sgd(0.1, extrapolation_rate=0.5)
      >>> print(extrapolate(jnp.array([1.0, 2.0]), opt.init(jnp.zeros(2)), jnp.array([1.0, 1.0])))
      [0.5 1.5]
    """
    found = _declarations(opt_state)
    if len(found) != 1:
        raise ValueError(
            f"extrapolate needs exactly one EXTRAP-SGD state (a {EXTRAPOLATION_FIELD!r} field, from "
            f"scale_by_extrap_sgd/extrap_sgd) in opt_state; found {len(found)}"
        )
    step = found[0]
    check_floating_tree("grads", grads)

    def leaf(p: Any, g: Any) -> jax.Array:
        dtype = accumulation_dtype(jnp.result_type(p))
        value = jnp.asarray(p).astype(dtype) - jnp.asarray(step).astype(dtype) * jnp.asarray(g).astype(dtype)
        return value.astype(jnp.result_type(p))

    return jax.tree.map(leaf, params, grads)
