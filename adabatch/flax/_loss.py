"""Per-example losses from Flax models: the ``loss_fn(params, batch) -> (b,)`` form every adabatch producer of
statistics (:func:`adabatch.grad_stats`, :func:`adabatch.make_train_step`) takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adabatch.flax._nnx_ghost import module_names

__all__ = ["nnx_params", "per_example_loss"]


def nnx_params(model: nnx.Module, wrt: Any = nnx.Param) -> nnx.State:
    """The parameters of an NNX module as a pure :class:`nnx.State` of arrays (the ``params`` that the loss of
    :func:`per_example_loss` takes, and the tree a stock ``nnx.Optimizer`` updates).

    Example:
      >>> from flax import nnx
      >>> from adabatch.flax import nnx_params
      >>> params = nnx_params(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> params["kernel"].shape
      (3, 2)
    """
    return nnx.as_pure(nnx.state(model, wrt))


def _per_example(values: jax.Array) -> jax.Array:
    """Reduce a loss of shape ``(b, ...)`` to ``(b,)`` by averaging the trailing axes (tokens, pixels)."""
    values = jnp.asarray(values)
    if values.ndim == 0:
        raise ValueError("loss must return one value per example (shape (b,) or (b, ...)), got a scalar")
    return values.reshape(values.shape[0], -1).mean(axis=1) if values.ndim > 1 else values


def per_example_loss(
    model: nnx.Module | Callable[..., Any], loss: Callable[[Any, Any], jax.Array], *, wrt: Any = nnx.Param
) -> Callable[[Any, tuple], jax.Array]:
    r"""``loss_fn(params, (inputs, targets)) -> (b,)``: :math:`\ell_i = \texttt{loss}(f_\theta(x_i), y_i)`.

    Args:
      model: an ``nnx.Module``, or a linen ``apply`` function (``module.apply``), called as
        ``apply({"params": params}, inputs)``. For an NNX module the loss takes the pure parameter state of
        :func:`nnx_params`; the module's other state (batch statistics, RNG counters) is frozen as it was when
        ``per_example_loss`` was called.
      loss: ``loss(outputs, targets)`` returning one value per example, shape ``(b,)``, or ``(b, ...)`` which is
        averaged over the trailing axes (e.g. ``optax.softmax_cross_entropy_with_integer_labels``).
      wrt: for NNX, the filter of the trained variables (default ``nnx.Param``).

    Returns:
      The per-example loss function.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import adabatch
      >>> from adabatch.flax import nnx_params, per_example_loss
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> loss_fn = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
      >>> batch = (jnp.ones((5, 4)), jnp.arange(5) % 3)
      >>> loss_fn(nnx_params(model), batch).shape, int(adabatch.grad_stats(loss_fn, nnx_params(model), batch).count)
      ((5,), 5)
    """
    if isinstance(model, nnx.Module):
        graphdef, _, *rest = nnx.split(model, wrt, ...)  # rest: the one state of the `...` filter

        def nnx_loss(params: Any, batch: tuple) -> jax.Array:
            inputs, targets = batch
            merged = nnx.merge(graphdef, params, *rest)
            with module_names(merged):  # ghost reports name the layers by their path in the model
                outputs = merged(inputs)
            return _per_example(loss(outputs, targets))

        return nnx_loss
    if not callable(model):
        raise ValueError(f"model must be an nnx.Module or a linen apply function, got {type(model).__name__}")

    def linen_loss(params: Any, batch: tuple) -> jax.Array:
        inputs, targets = batch
        return _per_example(loss(model({"params": params}, inputs), targets))

    return linen_loss
