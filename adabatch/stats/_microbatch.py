r"""Gradient statistics from :math:`k` group means: gradient-accumulation micro-batches or data-parallel devices.

When only the mean gradients :math:`\bar g_m` of :math:`k` disjoint groups of :math:`n_m` examples are at hand
(the micro-batches of gradient accumulation, or the local gradients of data-parallel devices before the
all-reduce), the per-example covariance is still estimable, without bias, from the spread of the group means
(one-way analysis of variance: for i.i.d. examples :math:`\mathbb E\sum_m n_m\lVert\bar g_m-\bar g\rVert^2 =
(k-1)\operatorname{tr}\Sigma`, whatever the group sizes):

.. math::

   \widehat{\operatorname{tr}\Sigma}_k = \frac{1}{k-1}\sum_m n_m\lVert\bar g_m-\bar g\rVert^2
   = \frac{\sum_m n_m\lVert\bar g_m\rVert^2 - n\lVert\bar g\rVert^2}{k-1},\qquad
   \widehat{\lVert\nabla F\rVert^2} = \lVert\bar g\rVert^2 - \widehat{\operatorname{tr}\Sigma}_k/n,

with :math:`n=\sum_m n_m` and :math:`k` the number of non-empty groups; with equal groups of :math:`b_g`
examples, :math:`\widehat{\operatorname{tr}\Sigma}_k = b_g\cdot` (sample variance of the group means), the
natural estimator for data-parallel devices (cf. Lau, Li, Xu, Liu & Kolar 2024) and the one of McCandlish et al.
2018 (:math:`B_\text{small}=b_g`).

The result is a :class:`~adabatch.stats.GradStats` whose ``sq_norm_sum`` is the unbiased stand-in
:math:`\hat q = n\lVert\bar g\rVert^2 + (n-1)\widehat{\operatorname{tr}\Sigma}_k` (:math:`\mathbb E\hat q =
\mathbb E\sum_i\lVert g_i\rVert^2`), so every estimator of :mod:`adabatch.stats` returns the group-based
value: ``trace_covariance`` gives :math:`\widehat{\operatorname{tr}\Sigma}_k` and ``unbiased_grad_sq_norm`` the
estimate above. ``sq_sum`` is built the same way coordinate by coordinate and ``inner_sq_sum`` (with
``inner_dev_sq_sum``) from the squared deviations of :math:`a_m=\langle\bar g_m,\bar g\rangle` from their
weighted mean :math:`\lVert\bar g\rVert^2`. With groups of one example everything equals the per-example value.

**Variance.** For Gaussian gradients :math:`\operatorname{Var}\widehat{\operatorname{tr}\Sigma}_k =
2\operatorname{tr}(\Sigma^2)/(k-1)` against :math:`2\operatorname{tr}(\Sigma^2)/(n-1)` from per-example
gradients: the estimate has :math:`k-1` degrees of freedom instead of :math:`n-1`. Its relative standard deviation
is at most :math:`\sqrt{2/(k-1)}` (when one direction dominates Σ) and about
:math:`\sqrt{2/((k-1)\,d_\text{eff})}` with :math:`d_\text{eff}=(\operatorname{tr}\Sigma)^2/\operatorname{tr}
\Sigma^2` effective dimensions, usually large for networks.

**When the rules may use them.** The norm test, AdaScale/Pollux gains and :math:`B_\text{simple}` only need
:math:`\operatorname{tr}\Sigma` and :math:`\lVert\nabla F\rVert^2`: use :math:`k\ge 8` groups, or smooth the
statistics over steps, which the rules' batch growth tolerates since a decision only ever grows the batch. The
inner-product/orthogonality tests get :math:`k-1` degrees of freedom for one scalar: usable with :math:`k\ge 16`.
The coordinate-wise test takes a maximum over all coordinates of variances with :math:`k-1` degrees of freedom
each, which is biased upwards for small :math:`k`: prefer per-example statistics (``ghost``) for it.
:math:`k=1` cannot estimate any variance and is an error.

References:
  McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018,
  https://arxiv.org/abs/1812.06162.
  Lau, Li, Xu, Liu, Kolar, "Adaptive Batch Size Schedules for Distributed Training of Language Models with Data
  and Model Parallelism", 2024, https://arxiv.org/abs/2412.21124.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adabatch._validation import accumulation_dtype, check_positive_int
from adabatch.stats._chunks import split_batch
from adabatch.stats._grad_stats import GradStats, _tree_sq_norm, _unbiased

__all__ = ["DEFAULT_MICROBATCHES", "device_grad_stats", "from_group_means", "microbatch_grad_stats"]

DEFAULT_MICROBATCHES = 8


def _one_group_error(name: str, value: Any) -> ValueError:
    return ValueError(
        f"{name} must be at least 2, got {value}: a variance cannot be estimated from one group (it would silently "
        "be zero). Use two or more micro-batches/devices, or per-example statistics (method='ghost' or 'vmap')."
    )


def _from_sums(n, mean, between, groups, s2_between=None, inner_between=None) -> GradStats:
    """GradStats from the total count ``n``, the overall mean, and the between-group sums of squares."""
    dtype = jnp.result_type(between)
    n_f = jnp.asarray(n, dtype)
    g2 = _tree_sq_norm(mean).astype(dtype)
    k = jnp.asarray(groups, dtype)
    sq_sum = None
    if s2_between is not None:
        sq_sum = jax.tree_util.tree_map(
            lambda m, s: n_f * jnp.square(m) + (n_f - 1) * _unbiased(s, k), mean, s2_between
        )
    inner = dev = None
    if inner_between is not None:
        dev = (n_f - 1) * _unbiased(inner_between, k)
        inner = n_f * jnp.square(g2) + dev
    return GradStats(
        count=jnp.asarray(n, jnp.int32),
        mean=mean,
        sq_norm_sum=n_f * g2 + (n_f - 1) * _unbiased(between, k),
        sq_sum=sq_sum,
        inner_sq_sum=inner,
        inner_dev_sq_sum=dev,
    )


def from_group_means(means: Any, counts: jax.Array, *, sq_sum: bool = False, inner_sq_sum: bool = False) -> GradStats:
    r"""A :class:`~adabatch.stats.GradStats` estimate from :math:`k` group mean gradients (module docstring).

    Args:
      means: params-shaped pytree whose leaves carry a leading axis of size :math:`k`: row :math:`m` is the mean
        gradient :math:`\bar g_m` of group :math:`m`.
      counts: ``(k,)`` numbers of examples :math:`n_m` in each group (empty groups are ignored).
      sq_sum: also estimate :math:`S_2` (coordinate-wise tests; see the caveat in the module docstring).
      inner_sq_sum: also estimate :math:`\sum_i\langle g_i,\bar g\rangle^2` (inner-product tests).

    Returns:
      The statistics; their variances are NaN when fewer than two groups are non-empty.

    Raises:
      ValueError: if :math:`k = 1` (a variance cannot be estimated from one group).

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import from_group_means
      >>> from adabatch.stats import trace_covariance
      >>> s = from_group_means({"w": jnp.array([[1.0, 0.0], [3.0, 2.0]])}, jnp.array([4, 4]))
      >>> int(s.count), s.mean["w"].tolist(), float(trace_covariance(s))  # 4 * (2² + 2²)/2 / (2 − 1)
      (8, [2.0, 1.0], 16.0)
    """
    leaves = jax.tree_util.tree_leaves(means)
    if not leaves:
        raise ValueError("means must have at least one leaf")
    k = leaves[0].shape[0] if leaves[0].ndim else None
    if k is None or any(x.ndim == 0 or x.shape[0] != k for x in leaves) or jnp.shape(counts) != (k,):
        raise ValueError(
            f"means must carry one leading group axis on every leaf and counts shape (k,); got leaf shapes "
            f"{[tuple(x.shape) for x in leaves]} and counts shape {jnp.shape(counts)}"
        )
    if k == 1:
        raise _one_group_error("the number of groups k", k)
    dtype = accumulation_dtype(jnp.result_type(*leaves))
    means = jax.tree_util.tree_map(lambda x: x.astype(dtype), means)
    c = jnp.asarray(counts).astype(dtype)
    n = jnp.sum(c)

    def weighted(x):
        return jnp.tensordot(c, x, axes=1)

    mean = jax.tree_util.tree_map(lambda x: weighted(x) / jnp.maximum(n, 1), means)
    rows_sq = sum(jnp.sum(jnp.square(x).reshape(k, -1), 1) for x in jax.tree_util.tree_leaves(means))
    between = jnp.dot(c, rows_sq) - n * _tree_sq_norm(mean)
    s2_between = None
    if sq_sum:
        s2_between = jax.tree_util.tree_map(lambda x, m: weighted(jnp.square(x)) - n * jnp.square(m), means, mean)
    inner_between = None
    if inner_sq_sum:
        a = sum(
            jnp.sum((x * m).reshape(k, -1), 1)
            for x, m in zip(jax.tree_util.tree_leaves(means), jax.tree_util.tree_leaves(mean), strict=True)
        )
        inner_between = jnp.dot(c, jnp.square(a - _tree_sq_norm(mean)))  # squared deviations: no cancellation
    return _from_sums(n, mean, between, jnp.sum(c > 0), s2_between, inner_between)


def device_grad_stats(
    local_mean: Any,
    local_count: jax.Array,
    axis_name: Any,
    *,
    sq_sum: bool = False,
    inner_sq_sum: bool = False,
) -> GradStats:
    r"""The same estimate across data-parallel devices, inside ``shard_map``/``pmap`` over ``axis_name``.

    Each device passes its local mean gradient and example count *before* the all-reduce; the function does the
    all-reduce of the mean (which training needs anyway) plus one scalar ``psum``
    (:math:`\sum_d n_d\lVert\bar g_d\rVert^2`), one more params-sized ``psum`` only with ``sq_sum``, and one more
    scalar with ``inner_sq_sum``. Every device gets the same statistics. With gradient accumulation inside a
    device, pass the statistics of its micro-batches through :func:`from_group_means` instead, or treat every
    (device, micro-batch) pair as a group.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adabatch.stats import device_grad_stats
      >>> from adabatch.stats import trace_covariance
      >>> local = {"w": jnp.array([[1.0, 0.0], [3.0, 2.0]])}  # two "devices", 4 examples each
      >>> stats = jax.vmap(lambda g: device_grad_stats(g, 4, "data"), axis_name="data")(local)
      >>> float(trace_covariance(jax.tree.map(lambda x: x[0], stats)))  # device 0's copy
      16.0
    """
    if jax.lax.axis_size(axis_name) == 1:
        raise _one_group_error("the number of devices along axis_name", 1)
    leaves = jax.tree_util.tree_leaves(local_mean)
    dtype = accumulation_dtype(jnp.result_type(*leaves))
    c = jnp.asarray(local_count).astype(dtype)
    n = jax.lax.psum(c, axis_name)
    mean = jax.tree_util.tree_map(
        lambda x: jax.lax.psum(c * x.astype(dtype), axis_name) / jnp.maximum(n, 1), local_mean
    )
    local = jax.tree_util.tree_map(lambda x: x.astype(dtype), local_mean)
    between = jax.lax.psum(c * _tree_sq_norm(local), axis_name) - n * _tree_sq_norm(mean)
    groups = jax.lax.psum((c > 0).astype(jnp.int32), axis_name)
    s2_between = None
    if sq_sum:
        s2_between = jax.tree_util.tree_map(
            lambda x, m: jax.lax.psum(c * jnp.square(x), axis_name) - n * jnp.square(m), local, mean
        )
    inner_between = None
    if inner_sq_sum:
        pairs = zip(jax.tree_util.tree_leaves(local), jax.tree_util.tree_leaves(mean), strict=True)
        a = sum(jnp.sum(x * m) for x, m in pairs)
        inner_between = jax.lax.psum(c * jnp.square(a - _tree_sq_norm(mean)), axis_name)
    return _from_sums(n, mean, between, groups, s2_between, inner_between)


def microbatch_grad_stats(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    num_microbatches: int,
    *,
    mask: jax.Array | None = None,
    sq_sum: bool = False,
    inner_sq_sum: bool = False,
) -> tuple[GradStats, jax.Array]:
    r"""``grad_stats(method="microbatch")``: split the batch into ``num_microbatches`` consecutive groups, take
    each group's mean gradient one group at a time (gradient accumulation: memory of one group's activations),
    and estimate the statistics with :func:`from_group_means`.

    Groups have :math:`\lceil b/k\rceil` examples, the last one fewer when :math:`k` does not divide :math:`b`;
    masked examples count in no group.

    Returns:
      ``(GradStats, per-example losses (b,))``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import microbatch_grad_stats
      >>> loss = lambda w, x: x @ w  # per-example gradient = x_i
      >>> x = jnp.array([[1.0], [3.0], [2.0], [6.0]])
      >>> stats, _ = microbatch_grad_stats(loss, jnp.zeros(1), x, 2)
      >>> int(stats.count), stats.mean.tolist()
      (4, [3.0])
    """
    check_positive_int("num_microbatches", num_microbatches)
    if num_microbatches == 1:
        raise _one_group_error("num_microbatches", num_microbatches)
    b = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if num_microbatches > b:
        raise ValueError(f"num_microbatches must be at most the batch size {b}, got {num_microbatches}")
    size = -(-b // num_microbatches)
    padded = size * num_microbatches
    groups, weights = split_batch(batch, num_microbatches, size, mask)

    def group_mean(args):
        xs, w = args

        def mean_loss(p):
            losses = loss_fn(p, xs)
            return jnp.sum(losses * w.astype(losses.dtype)) / jnp.maximum(jnp.sum(w), 1).astype(losses.dtype), losses

        (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        return grads, losses

    means, losses = jax.lax.map(group_mean, (groups, weights))
    stats = from_group_means(means, jnp.sum(weights, 1), sq_sum=sq_sum, inner_sq_sum=inner_sq_sum)
    return stats, losses.reshape(padded)[:b]
