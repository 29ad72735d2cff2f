r"""Additive sufficient statistics of a batch of per-example gradients, and the estimators built on them.

For a batch of :math:`n` per-example gradients :math:`g_i = \nabla \ell_i(\theta)` (each the gradient of one
example's loss, not divided by :math:`n`) a :class:`GradStats` holds

* ``count`` :math:`n`,
* ``mean`` :math:`\bar g = \tfrac1n \sum_i g_i` (params-shaped),
* ``sq_norm_sum`` :math:`q = \sum_i \lVert g_i \rVert^2` (scalar, over the **whole** parameter vector),
* ``sq_sum`` :math:`S_2 = \sum_i g_i \odot g_i` (params-shaped, optional: coordinate-wise tests),
* ``inner_sq_sum`` :math:`\sum_i \langle g_i, \bar g\rangle^2` (scalar, optional: inner-product tests),
* ``inner_dev_sq_sum`` :math:`\sum_i (\langle g_i, \bar g\rangle - \lVert\bar g\rVert^2)^2` (scalar, optional:
  set with ``inner_sq_sum`` by every producer that has the per-example :math:`\langle g_i,\bar g\rangle`; the
  variance of the inner products from squared deviations, free of the cancellation of
  :math:`\sum_i a_i^2 - n\lVert\bar g\rVert^4`),
* ``leaf_sq_norm_sum`` :math:`q_l = \sum_i \lVert g_{i,l}\rVert^2`, one scalar per parameter leaf :math:`l` (a pytree
  of the params' structure with scalar leaves, optional: layer-wise methods such as CLARS); :math:`\sum_l q_l = q`.

Every field but ``inner_sq_sum`` and ``inner_dev_sq_sum`` is a sum (``mean`` is ``S_1/n`` with ``S_1`` a sum), so the
statistics of two disjoint groups of examples (micro-batches, devices) :func:`merge` exactly. The two inner-product
fields depend on the mean of the *whole* batch and cannot be merged: :func:`merge` drops them (see its docstring);
a second pass against the merged mean sums both chunk by chunk (their centre :math:`\lVert\bar g\rVert^2` is
known by then, so the squared deviations add up like the other sums).

Everything is accumulated in float32, or float64 when the gradients are float64, whatever the gradient dtype
(bf16 gradients are summed in float32).

The estimators are pure functions of a :class:`GradStats` (in the notation of the References below: Lau, Liu &
Kolar 2024; McCandlish et al. 2018):

==============================  ==========================================================
:func:`mean_sq_norm`            ‖ḡ‖²
:func:`trace_covariance`        trΣ̂ = (q − n‖ḡ‖²)/(n−1)
:func:`unbiased_grad_sq_norm`   ‖∇F‖² estimate = ‖ḡ‖² − trΣ̂/n  (unbiased; may be negative)
:func:`b_simple`                B_simple = trΣ̂ / (unbiased ‖∇F‖²)
:func:`coordinate_variance`     s²_j = (S2_j − n ḡ_j²)/(n−1)
:func:`inner_product_variance`  Var̂(a) = Σ (a_i − ‖ḡ‖²)²/(n−1),  a_i = ⟨g_i, ḡ⟩  (or (Σ a_i² − n‖ḡ‖⁴)/(n−1))
:func:`orthogonal_variance`     V_⊥ = (q − Σ a_i²/‖ḡ‖²)/(n−1)
:func:`leaf_norm_ratio`         ρ_l = ‖ḡ_l‖² / (q_l/n) per parameter leaf l
==============================  ==========================================================

Variances are undefined for :math:`n < 2`: they are NaN there (never a division by :math:`n-1=0`), and the
batch-size rules treat a non-finite statistic as "no decision" and flag it. Sample variances that come out
slightly negative from floating-point cancellation are clamped at zero.

References:
  Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods", 2024,
  https://arxiv.org/abs/2402.11215.
  McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018,
  https://arxiv.org/abs/1812.06162.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adabatch._validation import accumulation_dtype

__all__ = [
    "GradStats",
    "b_simple",
    "coordinate_variance",
    "from_per_example",
    "inner_product_variance",
    "leaf_norm_ratio",
    "mean_sq_norm",
    "merge",
    "orthogonal_variance",
    "trace_covariance",
    "unbiased_grad_sq_norm",
]


class GradStats(NamedTuple):
    """Sufficient statistics of ``count`` per-example gradients (a pytree; see the module docstring)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: number of examples n
    mean: Any  # params-shaped, float32 (float64 for float64 gradients): ḡ = S1 / n
    sq_norm_sum: jax.Array  # float32[]: q = Σ_i ‖g_i‖² over the whole parameter vector
    sq_sum: Any = None  # params-shaped float32, or None: S2 = Σ_i g_i ⊙ g_i
    inner_sq_sum: jax.Array | None = None  # float32[], or None: Σ_i ⟨g_i, ḡ⟩²
    leaf_sq_norm_sum: Any = None  # params-structured tree of float32[] scalars, or None: q_l = Σ_i ‖g_{i,l}‖² per leaf
    inner_dev_sq_sum: jax.Array | None = None  # float32[], or None: Σ_i (⟨g_i, ḡ⟩ − ‖ḡ‖²)²


def _tree_sum(tree: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum((jnp.sum(x) for x in leaves), start=jnp.zeros((), leaves[0].dtype if leaves else jnp.float32))


def _tree_sq_norm(tree: Any) -> jax.Array:
    return _tree_sum(jax.tree_util.tree_map(jnp.square, tree))


def _scalar_dtype(stats: GradStats) -> jnp.dtype:
    return jnp.result_type(stats.sq_norm_sum)


def _n(stats: GradStats) -> jax.Array:
    return jnp.asarray(stats.count, _scalar_dtype(stats))


def _unbiased(numerator: jax.Array, n: jax.Array) -> jax.Array:
    """``max(numerator, 0) / (n - 1)`` where ``n >= 2``, NaN where the sample variance is undefined."""
    safe = jnp.where(n > 1, n - 1, 1)
    return jnp.where(n > 1, jnp.maximum(numerator, 0) / safe, jnp.nan)


def from_per_example(
    grads: Any,
    *,
    mask: jax.Array | None = None,
    sq_sum: bool = False,
    inner_sq_sum: bool = False,
    leaf_sq_norm_sum: bool = False,
) -> GradStats:
    r"""Statistics of per-example gradients stacked on the leading axis of every leaf of ``grads``.

    Args:
      grads: a pytree whose leaves have shape ``(b, *param_shape)``; row ``i`` is :math:`g_i`.
      mask: optional ``(b,)`` weights in ``{0, 1}`` (bool or float): rows with weight 0 (padding) contribute to no
        statistic and are not counted.
      sq_sum: also compute :math:`S_2 = \sum_i g_i\odot g_i` (needed by the coordinate-wise test).
      inner_sq_sum: also compute :math:`\sum_i\langle g_i,\bar g\rangle^2` (needed by the inner-product tests).
      leaf_sq_norm_sum: also keep :math:`q_l = \sum_i\lVert g_{i,l}\rVert^2` for every leaf :math:`l` (needed by
        layer-wise methods such as CLARS; the same per-leaf sums :math:`q` adds up, so it costs nothing extra).

    Returns:
      A :class:`GradStats` accumulated in float32 (float64 for float64 gradients).

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import from_per_example, trace_covariance
      >>> s = from_per_example({"w": jnp.array([[1.0, 0.0], [3.0, 2.0]])})
      >>> int(s.count), s.mean["w"].tolist(), float(s.sq_norm_sum), float(trace_covariance(s))
      (2, [2.0, 1.0], 14.0, 4.0)
    """
    leaves = jax.tree_util.tree_leaves(grads)
    if not leaves:
        raise ValueError("grads must have at least one leaf")
    b = leaves[0].shape[0] if leaves[0].ndim else None
    if b is None or any(x.ndim == 0 or x.shape[0] != b for x in leaves):
        shapes = [tuple(x.shape) for x in leaves]
        raise ValueError(f"grads must carry the same leading (per-example) axis on every leaf; got shapes {shapes}")
    dtype = accumulation_dtype(jnp.result_type(*leaves))
    g = jax.tree_util.tree_map(lambda x: x.astype(dtype), grads)
    if mask is None:
        weight = jnp.ones((b,), dtype)
    else:
        weight = jnp.asarray(mask).astype(dtype).reshape(b)
        g = jax.tree_util.tree_map(lambda x: x * weight.reshape((b,) + (1,) * (x.ndim - 1)), g)
    count = jnp.sum(weight)
    safe_count = jnp.maximum(count, 1)
    mean = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0) / safe_count, g)
    per_leaf = _leaf_sums(jax.tree_util.tree_map(lambda x: jnp.sum(jnp.square(x)), g))
    inner = dev = None
    if inner_sq_sum:
        a = _tree_sum_rows(jax.tree_util.tree_map(lambda x, m: x * m, g, mean))
        inner, dev = _inner_sums(a, weight, mean)
    return GradStats(
        count=count.astype(jnp.int32),
        mean=mean,
        sq_norm_sum=per_leaf[0],
        sq_sum=jax.tree_util.tree_map(lambda x: jnp.sum(jnp.square(x), axis=0), g) if sq_sum else None,
        inner_sq_sum=inner,
        leaf_sq_norm_sum=per_leaf[1] if leaf_sq_norm_sum else None,
        inner_dev_sq_sum=dev,
    )


def _inner_sums(a: jax.Array, weights: jax.Array, mean: Any) -> tuple[jax.Array, jax.Array]:
    r"""``(Σ_i w_i a_i², Σ_i w_i (a_i − ‖ḡ‖²)²)`` from the per-example inner products :math:`a_i=\langle g_i,\bar
    g\rangle` (the one place both inner-product fields are formed; the centre :math:`\lVert\bar g\rVert^2` is the
    exact mean of the :math:`a_i`, so the second sum is the two-pass sum of squared deviations)."""
    dtype = jnp.result_type(a)
    w = jnp.asarray(weights).astype(dtype)
    centre = _tree_sq_norm(mean).astype(dtype)
    return jnp.sum(w * jnp.square(a)), jnp.sum(w * jnp.square(a - centre))


def _leaf_sums(per_leaf: Any) -> tuple[jax.Array, Any]:
    r"""``(q, per_leaf)``: the total :math:`q = \sum_l q_l` of a pytree of per-leaf scalars :math:`q_l` and the tree
    itself (the one place where ``sq_norm_sum`` and ``leaf_sq_norm_sum`` are tied together, for every producer)."""
    return _tree_sum(per_leaf), per_leaf


def _tree_sum_rows(tree: Any) -> jax.Array:
    """Sum every leaf over all but its leading axis, then over leaves: one number per row."""
    rows = [jnp.sum(x.reshape(x.shape[0], -1), axis=1) for x in jax.tree_util.tree_leaves(tree)]
    return sum(rows[1:], start=rows[0])


def merge(a: GradStats, b: GradStats) -> GradStats:
    r"""Statistics of the union of two disjoint groups of examples, exact for every additive field.

    :math:`n = n_a + n_b`, :math:`\bar g = (n_a\bar g_a + n_b\bar g_b)/n`, :math:`q = q_a + q_b`,
    :math:`S_2 = S_{2,a} + S_{2,b}` and :math:`q_l = q_{l,a} + q_{l,b}` (each None unless both groups have it).
    ``inner_sq_sum`` of the union needs :math:`\langle g_i, \bar g\rangle` against the *merged* mean, which the
    groups' statistics do not determine, so the result has ``inner_sq_sum=None`` and ``inner_dev_sq_sum=None``;
    compute them with a second pass over the examples (for instance :func:`adabatch.grad_stats` with
    ``inner_sq_sum=True``, which uses one forward-mode pass).

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import from_per_example, merge
      >>> g = {"w": jnp.arange(8.0).reshape(4, 2)}
      >>> whole = from_per_example(g)
      >>> halves = merge(from_per_example({"w": g["w"][:1]}), from_per_example({"w": g["w"][1:]}))
      >>> int(halves.count), halves.mean["w"].tolist() == whole.mean["w"].tolist()
      (4, True)
    """
    n = a.count + b.count
    dtype = jnp.promote_types(_scalar_dtype(a), _scalar_dtype(b))
    wa = jnp.asarray(a.count, dtype) / jnp.maximum(n, 1).astype(dtype)
    wb = jnp.asarray(b.count, dtype) / jnp.maximum(n, 1).astype(dtype)
    mean = jax.tree_util.tree_map(lambda x, y: wa * x + wb * y, a.mean, b.mean)
    sq_sum = None
    if a.sq_sum is not None and b.sq_sum is not None:
        sq_sum = jax.tree_util.tree_map(jnp.add, a.sq_sum, b.sq_sum)
    leaf = None
    if a.leaf_sq_norm_sum is not None and b.leaf_sq_norm_sum is not None:
        leaf = jax.tree_util.tree_map(jnp.add, a.leaf_sq_norm_sum, b.leaf_sq_norm_sum)
    return GradStats(
        count=n, mean=mean, sq_norm_sum=a.sq_norm_sum + b.sq_norm_sum, sq_sum=sq_sum, leaf_sq_norm_sum=leaf
    )


def mean_sq_norm(stats: GradStats) -> jax.Array:
    r""":math:`\lVert\bar g\rVert^2`, the squared norm of the batch-mean gradient (a biased estimate of
    :math:`\lVert\nabla F\rVert^2`: its expectation is :math:`\lVert\nabla F\rVert^2 + \operatorname{tr}\Sigma/n`)."""
    return _tree_sq_norm(stats.mean).astype(_scalar_dtype(stats))


def trace_covariance(stats: GradStats) -> jax.Array:
    r"""Unbiased trace of the per-example gradient covariance,
    :math:`\widehat{\operatorname{tr}\Sigma} = (q - n\lVert\bar g\rVert^2)/(n-1)` (NaN for :math:`n<2`)."""
    n = _n(stats)
    return _unbiased(stats.sq_norm_sum - n * mean_sq_norm(stats), n)


def unbiased_grad_sq_norm(stats: GradStats) -> jax.Array:
    r"""Unbiased estimate of :math:`\lVert\nabla F\rVert^2`:
    :math:`\lVert\bar g\rVert^2 - \widehat{\operatorname{tr}\Sigma}/n = (n\lVert\bar g\rVert^2 - q/n)/(n-1)`.

    This is McCandlish et al.'s two-batch-size estimator with :math:`B_\text{small}=1, B_\text{big}=n`. Being a
    difference it can be negative when the noise dominates; it is returned as is (NaN for :math:`n<2`).
    """
    n = _n(stats)
    return mean_sq_norm(stats) - trace_covariance(stats) / jnp.maximum(n, 1)


def b_simple(stats: GradStats) -> jax.Array:
    r"""McCandlish et al.'s simple noise scale
    :math:`B_\text{simple} = \widehat{\operatorname{tr}\Sigma}/\widehat{\lVert\nabla F\rVert^2}`.

    Where the unbiased :math:`\widehat{\lVert\nabla F\rVert^2}` is not positive (noise dominates the signal in this
    batch) the estimate is ``+inf``; NaN for :math:`n<2`.
    """
    trace = trace_covariance(stats)
    g2 = unbiased_grad_sq_norm(stats)
    ratio = trace / jnp.where(g2 > 0, g2, 1)
    return jnp.where(jnp.isnan(g2), jnp.nan, jnp.where(g2 > 0, ratio, jnp.inf))


def leaf_norm_ratio(stats: GradStats, *, debias: bool = False) -> Any:
    r"""Per parameter leaf :math:`l`, the ratio :math:`\rho_l` of the squared norm of the mean gradient to the mean
    squared per-example norm (one scalar per leaf, a tree of the params' structure; the layer-wise factor of CLARS).

    .. math:: \rho_l = \frac{\lVert\bar g_l\rVert^2}{\tfrac1b q_l} = \frac{\lVert\sum_i g_{i,l}\rVert^2}{b\,q_l}
        \in [0, 1], \qquad q_l = \sum_i\lVert g_{i,l}\rVert^2

    (:math:`\le 1` by Cauchy–Schwarz; clamped there against rounding). It is the plug-in estimate of
    :math:`r_l = \lVert\nabla_l F\rVert^2 / \mathbb E\lVert\nabla_l f_i\rVert^2`, biased upwards by about
    :math:`(1 - r_l)/b` because :math:`\mathbb E\lVert\bar g_l\rVert^2 = \lVert\nabla_l F\rVert^2 + \operatorname{tr}
    \Sigma_l/b`. With ``debias`` the numerator is the unbiased :math:`(b\lVert\bar g_l\rVert^2 - q_l/b)/(b-1)`,
    i.e. :math:`\tilde\rho_l = \operatorname{clip}((b\rho_l - 1)/(b - 1), 0, 1)`, for :math:`b \ge 2` (for
    :math:`b < 2` the variance is unknown and the plug-in :math:`\rho_l` is kept).

    A leaf whose per-example gradients are all zero (:math:`q_l = 0`) has :math:`\rho_l = 1`: the noise-free limit,
    never 0/0. :math:`b\rho_l = \lVert\sum_i g_{i,l}\rVert^2/\sum_i\lVert g_{i,l}\rVert^2` is the inverse of the
    layer's gradient diversity (Yin et al. 2018). Needs ``stats.leaf_sq_norm_sum``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import from_per_example, leaf_norm_ratio
      >>> g = {"a": jnp.array([[1.0, 1.0], [1.0, 1.0]]), "b": jnp.array([[1.0], [-1.0]]), "c": jnp.zeros((2, 1))}
      >>> r = leaf_norm_ratio(from_per_example(g, leaf_sq_norm_sum=True))  # a: no noise, b: pure noise, c: zero
      >>> [float(r[k]) for k in "abc"]
      [1.0, 0.0, 1.0]
    """
    if stats.leaf_sq_norm_sum is None:
        raise ValueError(
            "leaf_norm_ratio needs GradStats.leaf_sq_norm_sum; compute the statistics with leaf_sq_norm_sum=True"
        )

    def ratio(mean: jax.Array, q: jax.Array) -> jax.Array:
        dtype = jnp.result_type(q)
        n = jnp.asarray(stats.count).astype(dtype)
        mean_sq = jnp.sum(jnp.square(mean.astype(dtype)))  # ‖ḡ_l‖²
        positive = q > 0
        rho = jnp.where(positive, jnp.minimum(n * mean_sq / jnp.where(positive, q, 1), 1), 1)
        if debias:
            rho = jnp.where(n > 1, jnp.clip((n * rho - 1) / jnp.where(n > 1, n - 1, 1), 0, 1), rho)
        return rho

    return jax.tree.map(ratio, stats.mean, stats.leaf_sq_norm_sum)


def coordinate_variance(stats: GradStats) -> Any:
    r"""Per-coordinate unbiased variances :math:`s_j^2 = (S_{2,j} - n\bar g_j^2)/(n-1)` (params-shaped; NaN for
    :math:`n<2`). Needs ``stats.sq_sum``."""
    if stats.sq_sum is None:
        raise ValueError("coordinate_variance needs GradStats.sq_sum; compute the statistics with sq_sum=True")
    n = _n(stats)
    return jax.tree_util.tree_map(lambda s2, m: _unbiased(s2 - n * jnp.square(m), n), stats.sq_sum, stats.mean)


def inner_product_variance(stats: GradStats) -> jax.Array:
    r"""Sample variance of :math:`a_i = \langle g_i,\bar g\rangle` (whose mean is :math:`\lVert\bar g\rVert^2`):
    :math:`\sum_i(a_i-\lVert\bar g\rVert^2)^2/(n-1)` from ``stats.inner_dev_sq_sum`` when present (no
    cancellation), else :math:`(\sum_i a_i^2 - n\lVert\bar g\rVert^4)/(n-1)` from ``stats.inner_sq_sum`` (a
    difference of two large numbers when the mean dominates: float32 loses about
    :math:`\varepsilon_{32}\,n\lVert\bar g\rVert^4/\sum_i(a_i-\lVert\bar g\rVert^2)^2` of relative precision).

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import from_per_example, inner_product_variance
      >>> s = from_per_example({"w": jnp.array([[1.0, 0.0], [3.0, 2.0]])}, inner_sq_sum=True)
      >>> float(inner_product_variance(s)), float(inner_product_variance(s._replace(inner_dev_sq_sum=None)))
      (18.0, 18.0)
    """
    n = _n(stats)
    if stats.inner_dev_sq_sum is not None:
        return _unbiased(stats.inner_dev_sq_sum, n)
    if stats.inner_sq_sum is None:
        raise ValueError(
            "inner_product_variance needs GradStats.inner_sq_sum; compute the statistics with inner_sq_sum=True"
        )
    return _unbiased(stats.inner_sq_sum - n * jnp.square(mean_sq_norm(stats)), n)


def orthogonal_variance(stats: GradStats) -> jax.Array:
    r"""Sample variance of the components orthogonal to :math:`\bar g`,
    :math:`V_\perp = \tfrac1{n-1}\sum_i\lVert g_i - (a_i/\lVert\bar g\rVert^2)\bar g\rVert^2
    = (q - \sum_i a_i^2/\lVert\bar g\rVert^2)/(n-1)`.

    For :math:`\bar g = 0` every :math:`a_i` is zero and the projection is taken as zero:
    :math:`V_\perp = q/(n-1)`. With ``stats.inner_dev_sq_sum`` the numerator is formed as
    :math:`(q - n\lVert\bar g\rVert^2) - \sum_i(a_i-\lVert\bar g\rVert^2)^2/\lVert\bar g\rVert^2` (equal in exact
    arithmetic, since :math:`\sum_i a_i = n\lVert\bar g\rVert^2`), with no cancellation beyond that of
    :func:`trace_covariance`. Needs ``stats.inner_sq_sum``.
    """
    if stats.inner_sq_sum is None and stats.inner_dev_sq_sum is None:
        raise ValueError(
            "orthogonal_variance needs GradStats.inner_sq_sum; compute the statistics with inner_sq_sum=True"
        )
    n = _n(stats)
    g2 = mean_sq_norm(stats)
    positive = g2 > 0
    safe = jnp.where(positive, g2, 1)
    if stats.inner_dev_sq_sum is not None:
        numerator = stats.sq_norm_sum - n * g2 - jnp.where(positive, stats.inner_dev_sq_sum / safe, 0)
        return _unbiased(numerator, n)
    inner_sq_sum: jax.Array = stats.inner_sq_sum  # type: ignore[assignment]  # not None: checked above
    projected = jnp.where(positive, inner_sq_sum / safe, 0)
    return _unbiased(stats.sq_norm_sum - projected, n)
