"""Training Flax models with adabatch transformations: a linen ``TrainState`` that forwards extra arguments to
``tx.update`` (flax's own does not), and one-call updates for linen and NNX (a stock ``nnx.Optimizer``, whose
``update(model, grads, **kwargs)`` already forwards keyword arguments to ``tx.update``).

Both helpers compute the :class:`~adabatch.GradStats` of the batch (``adabatch.grad_stats``, by default with
``method="ghost"``: exact, about the cost of a plain gradient for the Flax layers it captures), then update with
``grad_stats=stats``, ``batch_size=stats.count`` and ``value=mean loss``, the extra-argument names of adabatch's
rules, scaling rules and Optax's line searches. Use them inside ``jax.jit`` / ``nnx.jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

from adabatch import _deprecation
from adabatch import stats as st
from adabatch.flax._loss import nnx_params
from adabatch.rules import next_batch_size
from adabatch.training import required_statistics

__all__ = ["LinenTrainState", "linen_update", "nnx_update"]


class LinenTrainState(train_state.TrainState):
    """A ``flax.training.train_state.TrainState`` whose ``apply_gradients`` forwards extra arguments to
    ``tx.update``.

    ``apply_gradients(grads=..., **kwargs)``: keyword arguments naming a field of the state (``step``, ``params``,
    your own subclass fields, ...) are replaced as flax does; every other one (``grad_stats``, ``batch_size``,
    ``value``, ...) is passed to ``tx.update`` (a transformation without extra-argument support ignores them).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import adabatch
      >>> from adabatch.flax import LinenTrainState
      >>> tx = optax.chain(adabatch.norm_test(0.5, max_batch_size=64), optax.sgd(0.1))
      >>> state = LinenTrainState.create(apply_fn=None, params=jnp.zeros(2), tx=tx)
      >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> stats = adabatch.stats.from_per_example(g)
      >>> state = state.apply_gradients(grads=stats.mean, grad_stats=stats)
      >>> int(state.step), int(state.next_batch_size) >= 3
      (1, True)
    """

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> LinenTrainState:
        fields = {field.name for field in dataclasses.fields(self)}
        replaced = {key: value for key, value in kwargs.items() if key in fields}
        extra = {key: value for key, value in kwargs.items() if key not in fields}
        if isinstance(grads, dict) and "_overwrite_with_gradient" in grads:
            raise ValueError("adabatch.flax.LinenTrainState does not support the overwrite-with-gradient collection")
        tx = optax.with_extra_args_support(self.tx)
        updates, opt_state = tx.update(grads, self.opt_state, self.params, **extra)
        return self.replace(
            step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state, **replaced
        )

    @property
    def next_batch_size(self) -> jax.Array:
        """The batch-size decision of the rule in ``tx`` (see :func:`adabatch.next_batch_size`)."""
        return next_batch_size(self.opt_state)

    @property
    def batch_size(self) -> jax.Array:
        """Deprecated name of :attr:`next_batch_size` (removed in the next release)."""
        _deprecation.warn("LinenTrainState.batch_size", "LinenTrainState.next_batch_size")
        return next_batch_size(self.opt_state)


def _method(where: str, method: str, stats: str | None) -> str:
    """``method``, or the deprecated ``stats=`` when given (with its warning)."""
    if stats is None:
        return method
    _deprecation.warn(f"{where}(stats=...)", f"{where}(method=...)", stacklevel=4)
    return stats


def _stats_and_loss(loss_fn, params, batch, tx, opt_state, method, sq_sum, inner_sq_sum, mask):
    sq_sum, inner_sq_sum = required_statistics(tx, params, opt_state, sq_sum=sq_sum, inner_sq_sum=inner_sq_sum)
    stats, losses = st.grad_stats(
        loss_fn,
        params,
        batch,
        method=method,
        mask=mask,
        sq_sum=sq_sum,
        inner_sq_sum=inner_sq_sum,
        leaf_sq_norm_sum=st.declared_needs(opt_state).leaf_sq_norm_sum,  # per-leaf sums (CLARS)
        return_losses=True,
    )
    if mask is None:
        return stats, jnp.mean(losses)
    weight = jnp.asarray(mask).astype(losses.dtype)
    return stats, jnp.sum(jnp.where(weight > 0, losses, 0) * weight) / jnp.maximum(jnp.sum(weight), 1)


def linen_update(
    state: LinenTrainState,
    loss_fn: Callable[[Any, Any], jax.Array],
    batch: Any,
    *,
    method: str = "ghost",
    sq_sum: bool | None = None,
    inner_sq_sum: bool | None = None,
    mask: jax.Array | None = None,
    stats: str | None = None,
) -> tuple[LinenTrainState, dict[str, jax.Array]]:
    """One update of a linen :class:`LinenTrainState` on ``batch`` with per-example statistics.

    Args:
      state: the train state.
      loss_fn: per-example loss ``loss_fn(params, batch) -> (b,)`` (e.g. from :func:`per_example_loss`).
      batch: the batch.
      method: the :func:`adabatch.grad_stats` method (the name :func:`adabatch.make_train_step` uses). The default
        ``"ghost"`` takes the exact ghost statistics of the captured Flax layers (linen and NNX: dense,
        convolution, embedding, normalisation, einsum) at about the cost of a plain gradient, and per-example
        gradients (vmap) for any other parameter; pass ``"vmap"`` for a ``loss_fn`` that hides its layer calls
        (e.g. wrapped in ``jax.jit``).
      sq_sum, inner_sq_sum: optional statistics; None infers what ``state.tx`` needs.
      mask: optional ``(b,)`` weights in {0, 1}; rows with weight 0 (padding to a fixed shape) are ignored.
      stats: deprecated name of ``method`` (removed in the next release).

    Returns:
      The new state and ``{"loss", "batch_size"}`` (the batch size used).
    """
    method = _method("linen_update", method, stats)
    grad_stats, loss = _stats_and_loss(
        loss_fn, state.params, batch, state.tx, state.opt_state, method, sq_sum, inner_sq_sum, mask
    )
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(jnp.result_type(p)), grad_stats.mean, state.params)
    new = state.apply_gradients(grads=grads, grad_stats=grad_stats, batch_size=grad_stats.count, value=loss)
    return new, {"loss": loss, "batch_size": grad_stats.count}


def nnx_update(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[[Any, Any], jax.Array],
    batch: Any,
    *,
    method: str = "ghost",
    sq_sum: bool | None = None,
    inner_sq_sum: bool | None = None,
    mask: jax.Array | None = None,
    stats: str | None = None,
) -> dict[str, jax.Array]:
    """One update of an NNX ``model`` with a stock ``nnx.Optimizer`` (in place, as NNX does).

    The gradients handed to ``optimizer.update(model, grads, grad_stats=..., batch_size=..., value=...)`` are the
    batch mean :math:`\\bar g` wrapped in the model's ``Param`` variables (``nnx.Optimizer`` filters them by
    variable type); ``loss_fn`` takes the pure parameters of :func:`nnx_params`.

    Args:
      model: the NNX module (its ``nnx.Param`` variables are trained).
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
      loss_fn: per-example loss ``loss_fn(params, batch) -> (b,)`` (e.g. ``per_example_loss(model, ...)``).
      batch: the batch.
      method: the :func:`adabatch.grad_stats` method (the name :func:`adabatch.make_train_step` uses). The default
        ``"ghost"`` takes the exact ghost statistics of the captured Flax layers (linen and NNX: dense,
        convolution, embedding, normalisation, einsum) at about the cost of a plain gradient, and per-example
        gradients (vmap) for any other parameter; pass ``"vmap"`` for a ``loss_fn`` that hides its layer calls
        (e.g. wrapped in ``jax.jit``).
      sq_sum, inner_sq_sum: optional statistics; None infers what ``optimizer.tx`` needs.
      mask: optional ``(b,)`` weights in {0, 1}; rows with weight 0 (padding to a fixed shape) are ignored.
      stats: deprecated name of ``method`` (removed in the next release).

    Returns:
      ``{"loss", "batch_size"}``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import adabatch
      >>> from adabatch.flax import nnx_update, per_example_loss
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> tx = optax.chain(adabatch.norm_test(0.5, max_batch_size=64), adabatch.adagrad_norm(0.1))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      >>> loss_fn = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
      >>> update = nnx.jit(nnx_update, static_argnums=2)
      >>> metrics = update(model, optimizer, loss_fn, (jnp.ones((8, 4)), jnp.arange(8) % 3))
      >>> int(metrics["batch_size"]), int(optimizer.step[...])
      (8, 1)
    """
    params = nnx_params(model, optimizer.wrt)
    opt_state = nnx.as_pure(optimizer.opt_state)
    method = _method("nnx_update", method, stats)
    grad_stats, loss = _stats_and_loss(
        loss_fn, params, batch, optimizer.tx, opt_state, method, sq_sum, inner_sq_sum, mask
    )
    variables = nnx.state(model, optimizer.wrt)
    grads = jax.tree_util.tree_map(
        lambda v, g: v.replace(g.astype(v.get_value().dtype)),
        variables,
        grad_stats.mean,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    optimizer.update(model, grads, grad_stats=grad_stats, batch_size=grad_stats.count, value=loss)
    return {"loss": loss, "batch_size": grad_stats.count}
