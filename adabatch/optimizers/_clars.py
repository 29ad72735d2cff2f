r"""CLARS: layer-wise learning rates from the layer-wise gradient variance (Huo, Gu & Huang 2021).

Each parameter leaf :math:`l` (a "layer") gets its own step multiplier from the per-example gradients of the batch:
the ratio :math:`\rho_l = \lVert\bar g_l\rVert^2 / (\tfrac1b\sum_i\lVert g_{i,l}\rVert^2) \in [0, 1]` of the squared
norm of the layer's mean gradient to the mean squared norm of its per-example gradients, times the batch size
:math:`b` (linear learning-rate scaling). No official code exists; the rule is derived from the paper's layer-wise
(fine-grained) descent analysis in ``docs/optimizers/clars.md``, which also lists every choice made here.

It reads the per-leaf sums :math:`q_l=\sum_i\lVert g_{i,l}\rVert^2`, so it takes per-example gradients on the leading
axis of ``updates`` or the mean gradient plus an :class:`adabatch.stats.GradStats` with ``leaf_sq_norm_sum`` as the
``grad_stats=`` extra argument (the state declares the need).
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
from adabatch.stats import GradStatsNeeds, leaf_norm_ratio, read_statistics

__all__ = ["ScaleByClarsState", "clars", "scale_by_clars"]

_NEEDS = GradStatsNeeds(leaf_sq_norm_sum=True)


class ScaleByClarsState(NamedTuple):
    """State of :func:`scale_by_clars`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates so far
    ratio: optax.Updates  # params-structured tree of scalars, state dtype: ρ_l of the last batch (in [0, 1])
    scale: optax.Updates  # params-structured tree of scalars, state dtype: s_l = b ρ_l (or ρ_l) applied last
    grad_stats_needs: GradStatsNeeds  # static (no leaves): Σ_i ‖g_{i,l}‖² per leaf (leaf_sq_norm_sum=True)


def scale_by_clars(
    *,
    linear_scaling: bool = True,
    debias: bool = False,
    per_example: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scale each layer's update by its CLARS factor: :math:`s_l = b\,\rho_l` (or :math:`\rho_l`).

    With per-example gradients :math:`g_{i,l}` of leaf (layer) :math:`l`, :math:`i = 1..b`, and :math:`\rho_l` of
    :func:`adabatch.stats.leaf_norm_ratio` (paper symbols: the batch size :math:`B` is :math:`b`, the layer group
    :math:`G(l)` is a parameter leaf):

    .. math::

        s_l = b\,\rho_l = \frac{\lVert\sum_i g_{i,l}\rVert^2}{\sum_i\lVert g_{i,l}\rVert^2} \in [0, b]
        \quad(\texttt{linear\_scaling=True}), \qquad s_l = \rho_l \in [0, 1] \quad(\texttt{False}),
        \qquad d_l = s_l\, u_l,

    where :math:`u_l` is the incoming update of the leaf (the mean gradient :math:`\bar g_l`, or whatever the
    transformations chained before produced, e.g. with weight decay). The step of layer :math:`l` is then
    :math:`\eta s_l`: from the paper's layer-wise descent bound the best step is
    :math:`\eta_l \approx b\,\lVert\nabla_l F\rVert^2/(L_l\,\mathbb E\lVert\nabla_l f_i\rVert^2)` in the large-batch
    (noise-dominated) regime, i.e. a per-example base rate :math:`\eta\approx1/L_l`, scaled linearly in :math:`b`
    and damped by the layer's signal-to-second-moment ratio, which is small early in training (an automatic warmup).
    ``docs/optimizers/clars.md`` has the derivation and the choices. The returned update is :math:`d`
    (not negated, no learning rate).

    Inputs (``per_example`` must be declared, as for :func:`~adabatch.optimizers.scale_by_eve`):

    - ``update(mean_grads, state, grad_stats=stats)``: ``stats`` an :class:`adabatch.stats.GradStats` with
      ``leaf_sq_norm_sum``; :math:`b` is ``stats.count`` (the whole batch, also after
      :func:`adabatch.stats.merge` of micro-batches or devices).
    - ``update(per_example_grads, state)`` with ``per_example=True``: per-example gradients on the leading axis of
      every leaf (at least 2 examples).

    Args:
      linear_scaling: multiply by the batch size :math:`b` (the derivation's form; the learning rate is then a
        per-example rate). With ``False`` only :math:`\rho_l\in[0,1]` scales the update and the learning rate is
        the batch's own (scale it with the batch yourself, e.g. :func:`adabatch.scaling.scale_by_batch_size`).
      debias: use the unbiased numerator (see :func:`adabatch.stats.leaf_norm_ratio`); the paper does not say which
        estimator; the plug-in one (default) never makes a layer stop.
      per_example: ``updates`` carry per-example gradients on their leading axis (used when no ``grad_stats`` is
        passed; a ``grad_stats`` argument always takes precedence and then ``updates`` must be the mean).
      state_dtype: dtype of the diagnostic ``ratio``/``scale`` leaves; default each parameter's dtype promoted to at
        least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`ScaleByClarsState`; its ``update`` takes
      ``grad_stats=`` (other extra arguments are ignored) and returns updates in the dtype of the incoming (mean)
      updates. The state's ``grad_stats_needs`` declares ``leaf_sq_norm_sum``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.optimizers import scale_by_clars
      >>> from adabatch.stats import from_per_example
      >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 2.0]]), "b": jnp.array([[1.0], [-1.0]])}  # b = 2 examples
      >>> stats = from_per_example(g, leaf_sq_norm_sum=True)
      >>> tx = scale_by_clars()
      >>> d, state = tx.update(stats.mean, tx.init({"w": jnp.zeros(2), "b": jnp.zeros(1)}), grad_stats=stats)
      >>> round(float(state.scale["w"]), 4)  # ‖Σ_i g_i‖² / Σ_i ‖g_i‖² = ‖(4, 4)‖² / (5 + 13) = 32 / 18
      1.7778
      >>> print(jnp.round(d["w"], 4), d["b"])  # s · ḡ; the "b" leaf is pure noise (mean 0): ratio 0
      [3.5556 3.5556] [0.]

    References:
      Huo, Gu, Huang, "Large Batch Training Does Not Need Warmup", 2020, https://arxiv.org/abs/2002.01576
      (AAAI 2021: "Large Batch Optimization for Deep Learning Using New Complete Layer-Wise Adaptive Rate Scaling").
    """
    check_flag("linear_scaling", linear_scaling)
    check_flag("debias", debias)
    check_flag("per_example", per_example)
    check_state_dtype(state_dtype)

    def init_fn(params: optax.Params) -> ScaleByClarsState:
        check_floating_tree("params", params)
        ones = jax.tree.map(lambda p: jnp.ones((), state_leaf_dtype(p, state_dtype)), params)
        return ScaleByClarsState(count=jnp.zeros([], jnp.int32), ratio=ones, scale=ones, grad_stats_needs=_NEEDS)

    def update_fn(
        updates: optax.Updates,
        state: ScaleByClarsState,
        params: optax.Params | None = None,
        *,
        grad_stats: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByClarsState]:
        del params, extra_args
        updates, stats = read_statistics(
            updates, grad_stats, jnp.iinfo(jnp.int32).max, needs=_NEEDS, per_example=per_example, name="scale_by_clars"
        )
        ratio = leaf_norm_ratio(stats, debias=debias)
        scale = ratio
        if linear_scaling:
            scale = jax.tree.map(lambda r: r * jnp.asarray(stats.count).astype(r.dtype), ratio)
        out = jax.tree.map(lambda u, s: (u.astype(s.dtype) * s).astype(jnp.result_type(u)), updates, scale)
        return out, ScaleByClarsState(
            count=optax.safe_increment(state.count),
            ratio=jax.tree.map(lambda r, old: r.astype(old.dtype), ratio, state.ratio),
            scale=jax.tree.map(lambda s, old: s.astype(old.dtype), scale, state.scale),
            grad_stats_needs=state.grad_stats_needs,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clars(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Any = 0.9,
    nesterov: bool = False,
    weight_decay: Any = 0.0,
    weight_decay_mask: Any = None,
    *,
    linear_scaling: bool = True,
    debias: bool = False,
    per_example: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The CLARS optimizer: momentum SGD whose layer-wise rates come from :func:`scale_by_clars`.

    Built like ``optax.lars`` with the trust ratio replaced by the CLARS factor :math:`s_l`:
    ``optax.chain(scale_by_clars(...), optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate), optax.trace(momentum, nesterov))``, i.e.

    .. math:: v_l \leftarrow \mu v_l - \eta\,(s_l\bar g_l + \lambda\theta_l), \qquad
        \theta_l \leftarrow \theta_l + v_l \quad(\text{Nesterov: } \theta_l \leftarrow \theta_l + \mu v_l
        - \eta(s_l\bar g_l + \lambda\theta_l)).

    The weight decay comes *after* the CLARS factor (LARS puts it inside its trust ratio): :math:`s_l` measures the
    noise of the loss gradient, which the deterministic decay term does not have, and per-example ``updates`` must
    reach :func:`scale_by_clars` unchanged (a decay added to every example would enter the statistics).

    Args:
      learning_rate: :math:`\eta \ge 0` or an optax schedule. With ``linear_scaling`` (default) it is the
        *per-example* rate (the step of a batch of one); no default, since its scale depends on that choice.
      momentum: :math:`\mu \in [0, 1)` (0.9 as ``optax.lars``).
      nesterov: Nesterov momentum.
      weight_decay: :math:`\lambda \ge 0`, added after the CLARS factor, before the learning rate.
      weight_decay_mask: optional mask of the decayed leaves (``optax.add_decayed_weights``).
      linear_scaling, debias, per_example, state_dtype: see :func:`scale_by_clars`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``); pass ``grad_stats=`` to ``update`` unless
      built with ``per_example=True``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import clars
      >>> params = {"w": jnp.array([1.0, -1.0])}
      >>> opt = clars(learning_rate=0.1, momentum=0.0, per_example=True)
      >>> per_example = {"w": jnp.array([[0.5, 0.5], [0.5, -0.5]])}  # layer ratio 0.25 / 0.5 = 0.5, b = 2
      >>> updates, state = opt.update(per_example, opt.init(params), params)
      >>> print(optax.apply_updates(params, updates)["w"])  # θ - 0.1 · (2 · 0.5) · ḡ
      [ 0.95 -1.  ]

    References:
      Huo, Gu, Huang, "Large Batch Training Does Not Need Warmup", 2020, https://arxiv.org/abs/2002.01576
      You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks" (LARS), 2017,
      https://arxiv.org/abs/1708.03888
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)
    check_unit_interval("momentum", momentum)
    check_flag("nesterov", nesterov)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    return optax.chain(
        scale_by_clars(linear_scaling=linear_scaling, debias=debias, per_example=per_example, state_dtype=state_dtype),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=nesterov),
    )
