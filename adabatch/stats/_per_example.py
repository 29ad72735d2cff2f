r"""Producers of :class:`~adabatch.stats.GradStats` from a per-example loss function.

``loss_fn(params, batch) -> losses`` returns one loss per example (shape ``(b,)``); ``batch`` is any pytree whose
leaves share the leading batch axis. The per-example gradient is :math:`g_i = \nabla_\theta \ell_i(\theta)`.

``method="vmap"`` materialises the per-example gradients with ``jax.vmap(jax.grad(...))``: exact for any model,
at a cost of :math:`b\times` parameters of memory, bounded by ``chunk_size``: the batch is processed
``chunk_size`` examples at a time inside one ``lax.scan`` and the additive sums are accumulated.

:math:`\sum_i\langle g_i,\bar g\rangle^2` needs the mean of the whole batch. Unchunked, it is read off the
materialised gradients; chunked, it costs one extra forward-mode pass: :math:`\langle g_i, \bar g\rangle` is the
directional derivative of :math:`\ell_i` along :math:`\bar g`, so one ``jax.jvp`` of the per-example loss
vector gives all :math:`b` of them (:func:`inner_products`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from adabatch._validation import accumulation_dtype, check_choice, check_floating_tree, check_positive_int
from adabatch.stats._batch import example_loss, leading_size
from adabatch.stats._chunks import split_batch
from adabatch.stats._ghost import GhostReport, _check_ghost_form, ghost_stats, plan_ghost
from adabatch.stats._grad_stats import GradStats, _inner_sums, from_per_example
from adabatch.stats._microbatch import DEFAULT_MICROBATCHES, microbatch_grad_stats

__all__ = ["grad_stats", "inner_products", "per_example_grads"]

METHODS = ("vmap", "ghost", "auto", "microbatch")


def _check_loss_fn(loss_fn: Callable, params: Any, batch: Any, b: int) -> None:
    out = jax.eval_shape(loss_fn, params, batch)
    shape = getattr(out, "shape", None)
    if shape != (b,):
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({b},) for a batch of {b} examples; it returned "
            f"{'a scalar' if shape == () else f'shape {shape}'}. Return the vector of per-example losses, "
            "not their mean."
        )


def per_example_grads(loss_fn: Callable, params: Any, batch: Any, *, return_losses: bool = False) -> Any:
    """Per-example gradients (leading axis = batch) by ``jax.vmap(jax.grad(...))``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses.
      params: the parameters (any pytree).
      batch: a pytree of arrays sharing the leading batch axis.
      return_losses: also return the ``(b,)`` per-example losses.

    Returns:
      A params-shaped pytree with a leading axis of size ``b`` (and the losses if asked).

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import per_example_grads
      >>> loss = lambda w, x: 0.5 * (x @ w) ** 2
      >>> per_example_grads(loss, jnp.array([1.0, 2.0]), jnp.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
      [[1.0, 0.0], [0.0, 2.0]]
    """
    b = leading_size(batch)
    _check_loss_fn(loss_fn, params, batch, b)
    losses, grads = jax.vmap(jax.value_and_grad(example_loss(loss_fn)), in_axes=(None, 0))(params, batch)
    return (grads, losses) if return_losses else grads


def inner_products(loss_fn: Callable, params: Any, batch: Any, direction: Any) -> jax.Array:
    r"""All :math:`\langle g_i, v\rangle` in one forward-mode pass: the JVP of the per-example loss vector along
    ``direction`` :math:`v` (params-shaped). Exact; costs about one forward pass, whatever the number of
    parameters.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import inner_products
      >>> loss = lambda w, x: 0.5 * (x @ w) ** 2
      >>> inner_products(loss, jnp.array([1.0, 2.0]), jnp.eye(2), jnp.array([1.0, 1.0])).tolist()
      [1.0, 2.0]
    """
    direction = jax.tree_util.tree_map(lambda p, v: jnp.asarray(v, jnp.result_type(p)), params, direction)
    _, tangent = jax.jvp(lambda p: loss_fn(p, batch), (params,), (direction,))
    return tangent


def _chunked(
    chunk_fn: Callable,
    loss_fn: Callable,
    params: Any,
    batch: Any,
    mask,
    b: int,
    chunk_size: int,
    *,
    sq_sum: bool,
    inner_sq_sum: bool,
    leaf_sq_norm_sum: bool,
) -> tuple[GradStats, jax.Array]:
    """Accumulate ``chunk_fn(chunk, weights) -> (partial GradStats, losses)`` over chunks in one ``lax.scan``; the
    inner products against the final mean take one forward-mode pass per chunk (:func:`inner_products`)."""
    n_chunks = -(-b // chunk_size)
    padded = n_chunks * chunk_size
    chunked, weights = split_batch(batch, n_chunks, chunk_size, mask)
    acc = accumulation_dtype(jnp.result_type(*jax.tree_util.tree_leaves(params)))

    def body(carry, chunk):
        s1, q, s2, leaf_q, count = carry
        part, losses = chunk_fn(*chunk)
        s1 = jax.tree_util.tree_map(lambda a, m: a + m * part.count.astype(acc), s1, part.mean)
        s2 = jax.tree_util.tree_map(jnp.add, s2, part.sq_sum) if sq_sum else s2
        leaf_q = jax.tree_util.tree_map(jnp.add, leaf_q, part.leaf_sq_norm_sum) if leaf_sq_norm_sum else leaf_q
        return (s1, q + part.sq_norm_sum, s2, leaf_q, count + part.count), losses

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), acc), params)
    leaf_zeros = jax.tree_util.tree_map(lambda p: jnp.zeros((), acc), params) if leaf_sq_norm_sum else None
    init = (zeros, jnp.zeros((), acc), zeros if sq_sum else None, leaf_zeros, jnp.zeros((), jnp.int32))
    (s1, q, s2, leaf_q, count), losses = jax.lax.scan(body, init, (chunked, weights))
    mean = jax.tree_util.tree_map(lambda x: x / jnp.maximum(count, 1).astype(acc), s1)
    inner = dev = None
    if inner_sq_sum:
        a = jax.lax.map(lambda xs: inner_products(loss_fn, params, xs, mean), chunked).reshape(padded)
        inner, dev = _inner_sums(a.astype(acc), weights.reshape(padded), mean)
    stats = GradStats(
        count=count,
        mean=mean,
        sq_norm_sum=q,
        sq_sum=s2,
        inner_sq_sum=inner,
        leaf_sq_norm_sum=leaf_q,
        inner_dev_sq_sum=dev,
    )
    return stats, losses.reshape(padded)[:b]


def grad_stats(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    method: str = "vmap",
    chunk_size: int | None = None,
    mask: jax.Array | None = None,
    sq_sum: bool = False,
    inner_sq_sum: bool = False,
    leaf_sq_norm_sum: bool = False,
    return_losses: bool = False,
    num_microbatches: int | None = None,
    return_report: bool = False,
    ghost_form: str | Mapping[str, str] | None = None,
) -> GradStats | tuple:
    r""":class:`~adabatch.stats.GradStats` of a batch from a per-example loss function.

    Methods (see ``docs/statistics.md`` for the maths and how to choose):

    * ``"vmap"``: materialise the per-example gradients, :math:`b\times` parameters of memory (bounded by
      ``chunk_size``). Exact for any model.
    * ``"ghost"``: exact, from the layers' inputs and output gradients (:mod:`adabatch.ghost`): about the cost of
      one plain gradient for dense, convolution, embedding and normalisation layers (Flax linen, or plain JAX
      written with :func:`adabatch.ghost.dense` and friends); the parameters no captured layer covers fall back
      to vmap, for those parameters only. ``inner_sq_sum`` uses the captured activations (no extra pass).
    * ``"auto"``: ``"ghost"`` when it covers at least one parameter leaf of the model, else ``"vmap"``: the fastest
      exact method available.
    * ``"microbatch"``: an *estimate* from the mean gradients of ``num_microbatches`` groups
      (:func:`~adabatch.stats.microbatch_grad_stats`): unbiased for :math:`\operatorname{tr}\Sigma` and
      :math:`\lVert\nabla F\rVert^2`, with :math:`k-1` instead of :math:`b-1` degrees of freedom; costs :math:`k`
      small gradient steps.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses :math:`\ell_i` (not their mean).
      params: the parameters.
      batch: a pytree of arrays sharing the leading batch axis of size :math:`b`.
      method: ``"vmap"``, ``"ghost"``, ``"auto"`` or ``"microbatch"``.
      chunk_size: process at most this many examples at a time (``vmap``/``ghost``: bounds memory to
        ``chunk_size`` × parameters, resp. activations); a last partial chunk is padded and masked out.
      mask: optional ``(b,)`` weights in {0, 1}: examples with weight 0 (padding) are ignored and not counted.
      sq_sum: also accumulate :math:`S_2=\sum_i g_i\odot g_i` (coordinate-wise tests).
      inner_sq_sum: also compute :math:`\sum_i\langle g_i,\bar g\rangle^2` (inner-product tests), and, where the
        method has the per-example :math:`a_i=\langle g_i,\bar g\rangle`, the squared deviations
        :math:`\sum_i(a_i-\lVert\bar g\rVert^2)^2` (``inner_dev_sq_sum``: the variance without cancellation).
      leaf_sq_norm_sum: also keep :math:`q_l=\sum_i\lVert g_{i,l}\rVert^2` for every parameter leaf :math:`l`
        (layer-wise methods such as CLARS); exact with ``"vmap"`` and ``"ghost"``, at no extra cost. Not available
        with ``"microbatch"`` (a ``ValueError``): group means give no per-example norms.
      return_losses: also return the ``(b,)`` per-example losses.
      num_microbatches: number of groups :math:`k\ge 2` for ``"microbatch"`` (default
        ``min(8, b)``); ignored by the other methods.
      return_report: also return a :class:`~adabatch.stats.ghost.GhostReport`: a dict mapping every params leaf
        path to the way its statistics were obtained (``"ghost"``, ``"vmap"``, ``"unused"`` or ``"microbatch"``),
        with ``.layers`` (each captured layer's form and estimated costs), ``.forms`` (each leaf's form) and
        ``.reasons`` (why a leaf is not ghost).
      ghost_form: ``"ghost"``/``"auto"`` only: force the form of the captured layers, ``"gram"``, ``"direct"`` or
        ``"segment"`` for every dense/conv/embedding layer, or a mapping layer name (as in the report) → form; a
        form that does not apply to a layer (``"segment"`` on a dense layer, ``"gram"`` with ``sq_sum`` at
        :math:`T>1` positions) is a ``ValueError`` naming the layer. None (default): the cost model chooses.

    Returns:
      The statistics (accumulated in float32 at least), then the per-example losses if asked, then the report if
      asked.

    Example:
      >>> import jax.numpy as jnp
      >>> import adabatch
      >>> loss = lambda w, x: 0.5 * (x @ w) ** 2
      >>> s = adabatch.grad_stats(loss, jnp.array([1.0, 2.0]), jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
      >>> int(s.count), round(float(s.sq_norm_sum), 4)
      (3, 23.0)
    """
    check_choice("method", method, METHODS)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    check_positive_int("num_microbatches", num_microbatches, allow_none=True)
    check_floating_tree("params", params)
    _check_ghost_form(ghost_form)
    if ghost_form is not None and method not in ("ghost", "auto"):
        raise ValueError(f"ghost_form applies to method='ghost' or 'auto', got method={method!r}")
    b = leading_size(batch)
    if mask is not None and jnp.shape(mask) != (b,):
        raise ValueError(f"mask must have shape ({b},) to match the batch, got {jnp.shape(mask)}")
    _check_loss_fn(loss_fn, params, batch, b)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]

    if method == "microbatch":
        if leaf_sq_norm_sum:
            raise ValueError(
                "leaf_sq_norm_sum=True needs per-example gradient norms, which method='microbatch' (group means) does "
                "not give; use method='ghost', 'vmap' or 'auto'"
            )
        k = min(DEFAULT_MICROBATCHES, b) if num_microbatches is None else num_microbatches
        stats, losses = microbatch_grad_stats(
            loss_fn, params, batch, k, mask=mask, sq_sum=sq_sum, inner_sq_sum=inner_sq_sum
        )
        report = GhostReport(dict.fromkeys(paths, "microbatch"))
    else:
        single = example_loss(loss_fn)
        plan = None
        if method in ("ghost", "auto"):
            plan = plan_ghost(
                single,
                params,
                jax.tree_util.tree_map(lambda x: x[0], batch),
                sq_sum=sq_sum,
                inner_sq_sum=inner_sq_sum and (chunk_size is None or chunk_size >= b),
                ghost_form=ghost_form,
            )
            if method == "auto" and not plan.covers_any:
                plan = None
        if plan is not None:
            report = plan.report()

            def chunk_fn(xs, w, inner=False):
                return ghost_stats(
                    plan,
                    single,
                    params,
                    xs,
                    w,
                    sq_sum=sq_sum,
                    inner_sq_sum=inner,
                    leaf_sq_norm_sum=leaf_sq_norm_sum,
                )

        else:
            report = GhostReport(dict.fromkeys(paths, "vmap"))

            def chunk_fn(xs, w, inner=False):
                grads, losses = per_example_grads(loss_fn, params, xs, return_losses=True)
                stats = from_per_example(
                    grads, mask=w, sq_sum=sq_sum, inner_sq_sum=inner, leaf_sq_norm_sum=leaf_sq_norm_sum
                )
                return stats, losses

        if chunk_size is None or chunk_size >= b:
            weights = mask
            if plan is not None and mask is None:  # ghost weighs every example; vmap skips the multiplication
                weights = jnp.ones((b,), jnp.float32)
            stats, losses = chunk_fn(batch, weights, inner_sq_sum)
        else:
            stats, losses = _chunked(
                chunk_fn,
                loss_fn,
                params,
                batch,
                mask,
                b,
                chunk_size,
                sq_sum=sq_sum,
                inner_sq_sum=inner_sq_sum,
                leaf_sq_norm_sum=leaf_sq_norm_sum,
            )
    out: tuple[Any, ...] = (stats,)
    if return_losses:
        out += (losses,)
    if return_report:
        out += (report,)
    return out[0] if len(out) == 1 else out
