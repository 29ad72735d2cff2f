r"""AdaGrad and AdaGrad-Norm in the form the AdAdaGrad paper couples with its batch-size tests.

With :math:`\bar g_k` the (mini-batch mean) gradient at step :math:`k`, :math:`\alpha` the learning rate,
:math:`v_0` = ``initial_accumulator_value`` and :math:`\epsilon` = ``eps``:

* **AdaGrad** (coordinate-wise): :math:`v_k = v_{k-1} + \bar g_k\odot\bar g_k`,
  :math:`\theta_{k+1} = \theta_k - \alpha\,\bar g_k/(\sqrt{v_k}+\epsilon)`.
* **AdaGrad-Norm** (one scalar step size, Ward, Wu & Bottou): :math:`v_k = v_{k-1} + \lVert\bar g_k\rVert^2`,
  :math:`\theta_{k+1} = \theta_k - \alpha\,\bar g_k/(\sqrt{v_k}+\epsilon)`.

The current gradient is included in :math:`v_k` before dividing, and :math:`\epsilon` is added **outside** the
square root, as in ``torch.optim.Adagrad`` (which the AdAdaGrad reference code uses for AdaGrad).

=========================  ========================  =====  ============================================
implementation             accumulator               init   denominator
=========================  ========================  =====  ============================================
``adabatch.adagrad``       per coordinate            0      :math:`\sqrt{v}+10^{-10}`
``adabatch.adagrad_norm``  one scalar (or per leaf)  0.01   :math:`\sqrt{v}+10^{-10}`
``optax.adagrad``          per coordinate            0.1    :math:`\sqrt{v+10^{-7}}` (ε inside the root)
reference ``Adagradnorm``  one per output row        0.01   :math:`\sqrt{v}+10^{-10}`
=========================  ========================  =====  ============================================

The reference code's ``Adagradnorm`` (``timlautk/AdAdaGrad``, copied from Ward & Wu's code) is *not* the
paper's global scalar: it keeps one accumulator per output row of each weight (per output channel of a
convolution) and a heuristic for 1-D parameters. adabatch offers the paper's global scalar (``per="global"``)
and one scalar per parameter tensor (``per="leaf"``).

Accumulators are kept in float32 at least (a bf16 sum of squares stops growing after a few hundred steps);
updates come back in the gradient's dtype.

References:
  Duchi, Hazan, Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization", JMLR 2011.
  Ward, Wu, Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex landscapes", ICML 2019,
  https://arxiv.org/abs/1806.01811.
  Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods", 2024,
  https://arxiv.org/abs/2402.11215.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch._validation import accumulation_dtype, check_choice, check_floating_tree, check_positive

__all__ = [
    "ScaleByAdagradNormState",
    "ScaleByAdagradState",
    "adagrad",
    "adagrad_norm",
    "scale_by_adagrad",
    "scale_by_adagrad_norm",
]


class ScaleByAdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`."""

    sum_of_squares: Any  # params-shaped, float32 at least: v_k = v_0 + Σ_k ḡ_k ⊙ ḡ_k


class ScaleByAdagradNormState(NamedTuple):
    """State of :func:`scale_by_adagrad_norm`."""

    sum_of_squares: Any  # float32[] (per="global"), or a params-shaped tree of float32[] (per="leaf")


def _accumulator(params: Any, value: Any, shape_of=jnp.shape) -> Any:
    return jax.tree_util.tree_map(
        lambda p: jnp.full(shape_of(p), value, accumulation_dtype(jnp.result_type(p))), params
    )


def _scaled(updates: Any, denominators: Any) -> Any:
    return jax.tree_util.tree_map(lambda g, d: (g.astype(d.dtype) / d).astype(g.dtype), updates, denominators)


def scale_by_adagrad(
    initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> optax.GradientTransformationExtraArgs:
    r"""Coordinate-wise AdaGrad scaling: :math:`v_k = v_{k-1}+\bar g_k^2`, update
    :math:`\bar g_k/(\sqrt{v_k}+\epsilon)`.

    Args:
      initial_accumulator_value: :math:`v_0 \ge 0` (default 0, as ``torch.optim.Adagrad``).
      eps: :math:`\epsilon \ge 0`, added outside the square root (default 1e-10, as ``torch.optim.Adagrad``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments ignored) with state :class:`ScaleByAdagradState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import scale_by_adagrad
      >>> tx = scale_by_adagrad()
      >>> u, s = tx.update(jnp.array([3.0, -4.0]), tx.init(jnp.zeros(2)))
      >>> print(u)
      [ 1. -1.]
    """
    check_positive("initial_accumulator_value", initial_accumulator_value, allow_zero=True)
    check_positive("eps", eps, allow_zero=True)

    def init_fn(params):
        return ScaleByAdagradState(sum_of_squares=_accumulator(params, initial_accumulator_value))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        check_floating_tree("updates", updates)
        v = jax.tree_util.tree_map(lambda s, g: s + jnp.square(g.astype(s.dtype)), state.sum_of_squares, updates)
        denominators = jax.tree_util.tree_map(lambda s: jnp.sqrt(s) + eps, v)
        return _scaled(updates, denominators), ScaleByAdagradState(sum_of_squares=v)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_adagrad_norm(
    initial_accumulator_value: float = 1e-2, eps: float = 1e-10, *, per: str = "global"
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGrad-Norm scaling: one accumulator :math:`v_k = v_{k-1}+\lVert\bar g_k\rVert^2`, update
    :math:`\bar g_k/(\sqrt{v_k}+\epsilon)`.

    Args:
      initial_accumulator_value: :math:`v_0 = b_0^2 \ge 0` (default 0.01, the reference code's initial value).
      eps: :math:`\epsilon\ge 0`, added outside the square root (default 1e-10).
      per: ``"global"`` (the paper's single scalar over the whole parameter vector) or ``"leaf"`` (one scalar per
        parameter tensor).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra arguments ignored), state
      :class:`ScaleByAdagradNormState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import scale_by_adagrad_norm
      >>> tx = scale_by_adagrad_norm(initial_accumulator_value=0.0)
      >>> params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
      >>> u, s = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, tx.init(params))
      >>> print(float(s.sum_of_squares), u["a"], u["b"])
      25.0 [0.6] [0.8]
    """
    check_positive("initial_accumulator_value", initial_accumulator_value, allow_zero=True)
    check_positive("eps", eps, allow_zero=True)
    check_choice("per", per, ("global", "leaf"))

    def init_fn(params):
        if per == "leaf":
            return ScaleByAdagradNormState(sum_of_squares=_accumulator(params, initial_accumulator_value, lambda p: ()))
        dtype = accumulation_dtype(jnp.result_type(*jax.tree_util.tree_leaves(params)))
        return ScaleByAdagradNormState(sum_of_squares=jnp.full((), initial_accumulator_value, dtype))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        check_floating_tree("updates", updates)
        if per == "leaf":
            v = jax.tree_util.tree_map(
                lambda s, g: s + jnp.sum(jnp.square(g.astype(s.dtype))), state.sum_of_squares, updates
            )
            denominators = jax.tree_util.tree_map(lambda s: jnp.sqrt(s) + eps, v)
        else:
            v = state.sum_of_squares
            v = v + sum(jnp.sum(jnp.square(g.astype(v.dtype))) for g in jax.tree_util.tree_leaves(updates))
            denominators = jax.tree_util.tree_map(lambda _: jnp.sqrt(v) + eps, updates)
        return _scaled(updates, denominators), ScaleByAdagradNormState(sum_of_squares=v)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adagrad(
    learning_rate: optax.ScalarOrSchedule, initial_accumulator_value: float = 0.0, eps: float = 1e-10
) -> optax.GradientTransformation:
    r"""AdaGrad in the paper's form: :math:`\theta_{k+1}=\theta_k-\alpha\,\bar g_k/(\sqrt{v_k}+\epsilon)`,
    :math:`v_k=v_{k-1}+\bar g_k^2` (``torch.optim.Adagrad`` semantics; see the module docstring for how it
    differs from ``optax.adagrad``).

    Args:
      learning_rate: :math:`\alpha`, a float or an Optax schedule.
      initial_accumulator_value: :math:`v_0\ge0` (default 0).
      eps: :math:`\epsilon\ge0` outside the root (default 1e-10).

    Returns:
      ``optax.chain(scale_by_adagrad(...), optax.scale_by_learning_rate(learning_rate))``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adabatch
      >>> tx = adabatch.adagrad(0.1)
      >>> u, _ = tx.update(jnp.array([3.0, -4.0]), tx.init(jnp.zeros(2)))
      >>> print(u)
      [-0.1  0.1]

    References:
      Duchi, Hazan, Singer, JMLR 2011; Lau, Liu, Kolar, "AdAdaGrad", 2024, https://arxiv.org/abs/2402.11215.
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate)
    return optax.chain(scale_by_adagrad(initial_accumulator_value, eps), optax.scale_by_learning_rate(learning_rate))


def adagrad_norm(
    learning_rate: optax.ScalarOrSchedule,
    initial_accumulator_value: float = 1e-2,
    eps: float = 1e-10,
    *,
    per: str = "global",
) -> optax.GradientTransformation:
    r"""AdaGrad-Norm: :math:`\theta_{k+1}=\theta_k-\alpha\,\bar g_k/(\sqrt{v_k}+\epsilon)` with the scalar
    :math:`v_k=v_{k-1}+\lVert\bar g_k\rVert^2` (Ward, Wu & Bottou; the paper's global-scalar form).

    Args:
      learning_rate: :math:`\alpha`, a float or an Optax schedule.
      initial_accumulator_value: :math:`v_0=b_0^2\ge0` (default 0.01).
      eps: :math:`\epsilon\ge0` outside the root (default 1e-10).
      per: ``"global"`` (paper) or ``"leaf"`` (one accumulator per parameter tensor).

    Returns:
      ``optax.chain(scale_by_adagrad_norm(...), optax.scale_by_learning_rate(learning_rate))``.

    Example:
      >>> import jax.numpy as jnp
      >>> import adabatch
      >>> tx = adabatch.adagrad_norm(1.0, initial_accumulator_value=0.0)
      >>> u, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))
      >>> print(u)
      [-0.6 -0.8]

    References:
      Ward, Wu, Bottou, ICML 2019, https://arxiv.org/abs/1806.01811; Lau, Liu, Kolar, "AdAdaGrad", 2024,
      https://arxiv.org/abs/2402.11215.
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate)
    return optax.chain(
        scale_by_adagrad_norm(initial_accumulator_value, eps, per=per), optax.scale_by_learning_rate(learning_rate)
    )
