r"""AdAdaGrad and AdAdaGrad-Norm: an adaptive batch-size test and the AdaGrad update in one chain.

``adadagrad_norm`` is ``optax.chain(<test>, adagrad_norm(...))`` with the norm test by default;
``adadagrad`` is ``optax.chain(<test>, adagrad(...))`` with the coordinate-wise norm test by default (the
paper's coordinate-wise variant for coordinate-wise AdaGrad). The test comes first, so the chain takes what the
test takes: the mean gradient plus ``grad_stats=`` (the default, the optax convention), or, built with
``per_example=True``, per-example gradients on the leading axis of ``updates``; the AdaGrad step sees the mean
gradient. The decision is read with :func:`adabatch.next_batch_size`.

References:
  Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods", 2024,
  https://arxiv.org/abs/2402.11215.
"""

from __future__ import annotations

import optax

from adabatch import rules
from adabatch._validation import check_choice
from adabatch.optimizers._adagrad import adagrad, adagrad_norm

__all__ = ["adadagrad", "adadagrad_norm"]

_TESTS = {
    "norm": lambda a: rules.norm_test(a["eta"], **_shared(a)),
    "coordinate_norm": lambda a: rules.coordinate_norm_test(
        a["eta"], aggregation=a["aggregation"], quantile=a["quantile"], guard=a["guard"], **_shared(a)
    ),
    "inner_product": lambda a: rules.inner_product_test(a["theta"], **_shared(a)),
    "orthogonality": lambda a: rules.orthogonality_test(a["nu"], **_shared(a)),
    "augmented_inner_product": lambda a: rules.augmented_inner_product_test(a["theta"], a["nu"], **_shared(a)),
}
_SHARED = ("max_batch_size", "init_batch_size", "granularity", "test_interval", "per_example")


def _shared(args: dict) -> dict:
    return {name: args[name] for name in _SHARED}


def _rule(args: dict) -> optax.GradientTransformationExtraArgs:
    """The batch-size test named by ``args["test"]``, built from the combination's own arguments."""
    check_choice("test", args["test"], _TESTS)
    return _TESTS[args["test"]](args)


def adadagrad_norm(
    learning_rate: optax.ScalarOrSchedule,
    *,
    test: str = "norm",
    eta: float = 0.1,
    theta: float = 0.1,
    nu: float = 0.1,
    aggregation: str = "mean",
    quantile: float = 0.5,
    guard: float = 1e-3,
    max_batch_size: int = rules.DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = rules.DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    per_example: bool = False,
    initial_accumulator_value: float = 1e-2,
    eps: float = 1e-10,
    per: str = "global",
) -> optax.GradientTransformationExtraArgs:
    r"""AdAdaGrad-Norm: a batch-size test (default the norm test) chained with AdaGrad-Norm.

    At step :math:`k` with batch :math:`\mathcal B_k` of size :math:`b_k`:
    :math:`v_k=v_{k-1}+\lVert\bar g_k\rVert^2`, :math:`\theta_{k+1}=\theta_k-\alpha\bar g_k/(\sqrt{v_k}+\epsilon)`,
    and :math:`b_{k+1}` from the test (for the norm test
    :math:`\max(b_k,\lceil\widehat{\operatorname{tr}\Sigma}/(\eta^2\lVert\bar g_k\rVert^2)\rceil)`).

    Args:
      learning_rate: :math:`\alpha` (float or schedule).
      test: ``"norm"`` (default), ``"coordinate_norm"``, ``"inner_product"``, ``"orthogonality"`` or
        ``"augmented_inner_product"``.
      eta, theta, nu, aggregation, quantile, guard: the test's constants (see the rules).
      max_batch_size, init_batch_size, granularity, test_interval, per_example: as in :func:`adabatch.norm_test`
        (``per_example=False``, the default: ``update`` requires ``grad_stats=``).
      initial_accumulator_value, eps, per: as in :func:`adabatch.adagrad_norm`.

    Returns:
      ``optax.chain(test, adagrad_norm)`` taking the mean gradient plus ``grad_stats=`` (or, with
      ``per_example=True``, per-example gradients).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import adabatch
      >>> tx = adabatch.adadagrad_norm(0.5, eta=0.5, max_batch_size=256, granularity=8)
      >>> g = {"w": jax.random.normal(jax.random.key(0), (16, 3)) + 0.1}  # 16 per-example gradients
      >>> stats = adabatch.stats.from_per_example(g)  # or adabatch.grad_stats(loss_fn, params, batch)
      >>> updates, state = tx.update(stats.mean, tx.init({"w": jnp.zeros(3)}), grad_stats=stats)
      >>> updates["w"].shape, int(adabatch.next_batch_size(state)) % 8
      ((3,), 0)
      >>> tx.update(stats.mean, tx.init({"w": jnp.zeros(3)}))  # the mean alone: refused, not misread
      Traceback (most recent call last):
      ...
      ValueError: norm_test reads per-example statistics but got updates without grad_stats=. ...
    """
    return optax.chain(_rule(locals()), adagrad_norm(learning_rate, initial_accumulator_value, eps, per=per))


def adadagrad(
    learning_rate: optax.ScalarOrSchedule,
    *,
    test: str = "coordinate_norm",
    eta: float = 0.1,
    theta: float = 0.1,
    nu: float = 0.1,
    aggregation: str = "mean",
    quantile: float = 0.5,
    guard: float = 1e-3,
    max_batch_size: int = rules.DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = rules.DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    per_example: bool = False,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> optax.GradientTransformationExtraArgs:
    r"""AdAdaGrad: a batch-size test (default the coordinate-wise norm test) chained with coordinate-wise AdaGrad.

    :math:`v_k=v_{k-1}+\bar g_k\odot\bar g_k`, :math:`\theta_{k+1}=\theta_k-\alpha\bar g_k/(\sqrt{v_k}+\epsilon)`,
    :math:`b_{k+1}` from the test.

    Args:
      learning_rate: :math:`\alpha` (float or schedule).
      test: ``"coordinate_norm"`` (default), ``"norm"``, ``"inner_product"``, ``"orthogonality"`` or
        ``"augmented_inner_product"``.
      eta, theta, nu, aggregation, quantile, guard: the test's constants (see the rules).
      max_batch_size, init_batch_size, granularity, test_interval, per_example: as in :func:`adabatch.norm_test`
        (``per_example=False``, the default: ``update`` requires ``grad_stats=``).
      initial_accumulator_value, eps: as in :func:`adabatch.adagrad`.

    Returns:
      ``optax.chain(test, adagrad)`` taking the mean gradient plus ``grad_stats=`` (or, with
      ``per_example=True``, per-example gradients).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import adabatch
      >>> tx = adabatch.adadagrad(0.1, eta=0.5, max_batch_size=256, per_example=True)
      >>> g = {"w": jax.random.normal(jax.random.key(0), (16, 3)) + 1.0}
      >>> updates, state = tx.update(g, tx.init({"w": jnp.zeros(3)}))
      >>> updates["w"].shape, int(adabatch.next_batch_size(state)) >= 16
      ((3,), True)
    """
    return optax.chain(_rule(locals()), adagrad(learning_rate, initial_accumulator_value, eps))
