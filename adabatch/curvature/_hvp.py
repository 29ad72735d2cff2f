"""Curvature-vector products: the Hessian (:func:`hvp`) and the Generalised Gauss-Newton matrix (:func:`ggn_vp`) of
the mean per-example loss, by forward-over-reverse differentiation (never a dense matrix)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adabatch.stats._batch import leading_size

__all__ = ["ModelLoss", "check_vector", "ggn_vp", "hvp", "masked_mean"]


@dataclasses.dataclass(frozen=True)
class ModelLoss:
    r"""A per-example loss split into a model and a loss of the model's outputs, as the Gauss-Newton matrix needs.

    ``ModelLoss(model_fn, output_loss_fn)(params, (inputs, targets))`` is the per-example loss
    ``output_loss_fn(model_fn(params, inputs), targets)``, shape ``(b,)``: it is a ``loss_fn`` like any other (for
    :func:`hvp`, :func:`adabatch.grad_stats`, training), and it also tells :func:`hessian_spectrum` how to form
    the GGN (``matrix="ggn"``).

    Attributes:
      model_fn: ``model_fn(params, inputs) -> outputs`` (a pytree of arrays with the leading batch axis), e.g. a
        Flax linen ``model.apply`` with ``params`` the variables dict, or ``lambda p, x: model.apply({"params": p},
        x)``.
      output_loss_fn: ``output_loss_fn(outputs, targets) -> (b,)`` per-example losses of the outputs, e.g.
        ``optax.softmax_cross_entropy_with_integer_labels``.
    """

    model_fn: Callable[[Any, Any], Any]
    output_loss_fn: Callable[[Any, Any], jax.Array]

    def __call__(self, params: Any, batch: Any) -> jax.Array:
        inputs, targets = _split(batch)
        return self.output_loss_fn(self.model_fn(params, inputs), targets)


def _split(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"batch must be a pair (inputs, targets) for the Gauss-Newton matrix; got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


def check_vector(name: str, vector: Any, params: Any) -> Any:
    """``vector`` cast to the dtypes of ``params``; a ``ValueError`` naming ``name`` unless it has the tree structure
    and leaf shapes of ``params``."""
    p_def, v_def = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(vector)
    if p_def != v_def:  # type: ignore[operator]  # jaxlib ships no stub for PyTreeDef
        raise ValueError(f"{name} must have the tree structure of params: expected {p_def}, got {v_def}")
    p_leaves, v_leaves = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(vector)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
    for path, p, v in zip(paths, p_leaves, v_leaves, strict=True):
        if jnp.shape(p) != jnp.shape(v):
            raise ValueError(
                f"{name}{path or ''} must have the shape of params{path or ''}: expected {jnp.shape(p)}, "
                f"got {jnp.shape(v)}"
            )
    return jax.tree_util.tree_map(lambda v, p: jnp.asarray(v).astype(jnp.result_type(p)), vector, params)


def _weights(mask: Any, b: int) -> jax.Array | None:
    if mask is None:
        return None
    if jnp.shape(mask) != (b,):
        raise ValueError(f"mask must have shape (b,) = ({b},) like the batch's leading axis, got {jnp.shape(mask)}")
    return jnp.asarray(mask)


def masked_mean(losses: jax.Array, weights: jax.Array | None, b: int, name: str) -> jax.Array:
    r"""The weighted mean :math:`\sum_i w_i\ell_i / \sum_i w_i` of per-example ``losses`` (plain mean without
    weights; 0 when every weight is 0); a ``ValueError`` naming ``name`` unless ``losses`` has shape ``(b,)``."""
    if jnp.ndim(losses) != 1 or jnp.shape(losses)[0] != b:
        raise ValueError(
            f"{name} must return per-example losses of shape (b,) = ({b},), not their mean; got shape "
            f"{jnp.shape(losses)}"
        )
    if weights is None:
        return jnp.mean(losses)
    w = weights.astype(losses.dtype)
    total = jnp.sum(w)
    return jnp.sum(w * losses) / jnp.where(total > 0, total, 1)


def hvp(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, vector: Any, *, mask: Any = None) -> Any:
    r"""Hessian-vector product :math:`Hv` of the mean per-example loss, by forward-over-reverse differentiation.

    With per-example losses :math:`\ell_i(\theta)` (``loss_fn(params, batch)``, shape ``(b,)``) and weights
    :math:`w_i` (``mask``; all 1 without it), the loss is :math:`L(\theta)=\sum_i w_i\ell_i/\sum_i w_i` and

    .. math:: Hv = \nabla^2 L(\theta)\,v = \frac{d}{dt}\nabla L(\theta + t v)\Big|_{t=0},

    one ``jax.jvp`` of ``jax.grad``: about the cost of two to three gradients, and the memory of one.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses (not their mean).
      params: the parameters :math:`\theta` (any pytree of float arrays).
      batch: a pytree of arrays sharing the leading batch axis of size :math:`b`.
      vector: :math:`v`, a pytree with the structure and shapes of ``params``.
      mask: optional ``(b,)`` weights (bool or float, as for :func:`adabatch.grad_stats`): examples with weight 0
        (padding) contribute nothing; the mean runs over the others. Padding rows must hold finite values (zeros):
        they still run through the model, and an infinite input would make 0 · ∞ = NaN in the products.

    Returns:
      :math:`Hv`, shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.curvature import hvp
      >>> loss = lambda w, x: 0.5 * (x @ w) ** 2          # H = mean_i x_i x_iᵀ
      >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
      >>> hvp(loss, jnp.zeros(2), x, jnp.array([1.0, 0.0])).tolist()
      [1.0, 1.0]
    """
    vector = check_vector("vector", vector, params)
    b = leading_size(batch)
    weights = _weights(mask, b)

    def mean_loss(p):
        return masked_mean(loss_fn(p, batch), weights, b, "loss_fn")

    return jax.jvp(jax.grad(mean_loss), (params,), (vector,))[1]


def ggn_vp(
    model_fn: Callable[[Any, Any], Any],
    output_loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    vector: Any,
    *,
    mask: Any = None,
) -> Any:
    r"""Generalised Gauss-Newton-vector product :math:`Gv = J^\top H_\ell J v` of the mean per-example loss.

    The loss is split as :math:`\ell_i(\theta) = \phi(f(\theta, x_i), y_i)`: the model ``model_fn(params,
    inputs)`` gives outputs :math:`z=f(\theta,x)` and ``output_loss_fn(outputs, targets)`` the per-example losses
    :math:`\phi(z_i, y_i)`, with ``batch = (inputs, targets)``. With :math:`J=\partial z/\partial\theta` and
    :math:`H_\ell = \nabla_z^2 \sum_i w_i\phi(z_i,y_i)/\sum_i w_i` (block diagonal over examples),

    .. math:: G = J^\top H_\ell J,\qquad Gv = J^\top\big(H_\ell (Jv)\big),

    computed as :math:`Jv` by ``jax.linearize`` (one forward pass), :math:`H_\ell(Jv)` by forward-over-reverse of
    the output loss (cheap: outputs only) and :math:`J^\top(\cdot)` by transposing the same linearisation. The GGN
    drops the term :math:`\sum_i \partial_z\phi\,\nabla^2_\theta z` of the Hessian; it is positive semi-definite
    when :math:`\phi` is convex in the outputs (squared error, softmax cross-entropy on logits).

    Flax: a linen model plugs in as it is, ``ggn_vp(model.apply, loss, variables, (x, y), v)`` (then ``params`` and
    ``v`` are the variables dict), or ``ggn_vp(lambda p, x: model.apply({"params": p}, x), loss, params, ...)``. A
    batch held in a dict is passed as ``(batch["x"], batch["y"])``.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs``, a pytree of arrays with the leading batch axis.
      output_loss_fn: ``output_loss_fn(outputs, targets) -> (b,)`` per-example losses of the outputs.
      params: the parameters :math:`\theta`.
      batch: the pair ``(inputs, targets)``, pytrees of arrays sharing the leading batch axis of size :math:`b`.
      vector: :math:`v`, a pytree with the structure and shapes of ``params``.
      mask: optional ``(b,)`` weights, as for :func:`hvp`.

    Returns:
      :math:`Gv`, shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.curvature import ggn_vp
      >>> model = lambda w, x: x @ w                        # linear model: the GGN is the Hessian
      >>> sq = lambda z, y: 0.5 * (z - y) ** 2
      >>> x, y = jnp.array([[1.0, 0.0], [1.0, 2.0]]), jnp.zeros(2)
      >>> ggn_vp(model, sq, jnp.zeros(2), (x, y), jnp.array([1.0, 0.0])).tolist()
      [1.0, 1.0]
    """
    vector = check_vector("vector", vector, params)
    inputs, targets = _split(batch)
    b = leading_size(batch)
    weights = _weights(mask, b)

    outputs, jvp_fn = jax.linearize(lambda p: model_fn(p, inputs), params)
    jv = jvp_fn(vector)

    def output_loss(z):
        return masked_mean(output_loss_fn(z, targets), weights, b, "output_loss_fn")

    h_jv = jax.jvp(jax.grad(output_loss), (outputs,), (jv,))[1]
    (result,) = jax.linear_transpose(jvp_fn, params)(h_jv)
    return result
