r"""Adaptive batch-size tests as Optax transformations (AdAdaGrad, Lau, Liu & Kolar 2024).

Each rule reads the statistics of the current batch of :math:`b` per-example gradients and decides the size of
the next batch. With :math:`\widehat{\operatorname{tr}\Sigma}`, :math:`\widehat{\operatorname{Var}}(a)`,
:math:`V_\perp`, :math:`s_j^2` the sample estimators of :mod:`adabatch.stats`, the *required* batch size of each
test (the practical tests of Lau, Liu & Kolar 2024, on the whole parameter vector) is

================================  ========================================================================
``norm_test``                     :math:`b^\star = \widehat{\operatorname{tr}\Sigma}/(\eta^2\lVert\bar g\rVert^2)`
``inner_product_test``            :math:`b^\star = \widehat{\operatorname{Var}}(a)/(\theta^2\lVert\bar g\rVert^4)`
``orthogonality_test``            :math:`b^\star = V_\perp/(\nu^2\lVert\bar g\rVert^2)`
``augmented_inner_product_test``  :math:`b^\star = \max` of the two above
``coordinate_norm_test``          :math:`b^\star = \operatorname{agg}_j\, s_j^2/(\eta^2\bar g_j^2)`
================================  ========================================================================

The test passes when :math:`b \ge b^\star`; the next batch size is

.. math:: b_{k+1} = \min\bigl(B_{\max},\ \operatorname{roundup}_G(\max(b_k, b, \lceil b^\star\rceil))\bigr),

monotone non-decreasing, rounded up to a multiple of ``granularity`` :math:`G`, capped at ``max_batch_size``.
A zero mean gradient gives :math:`b^\star=\infty` (the batch goes to ``max_batch_size``, never NaN); a
non-finite statistic (NaN/inf gradients, or a batch of one example) leaves the decision unchanged and increments
``nonfinite_count``.

Each rule takes the mean gradient as ``updates`` plus a ``grad_stats=`` extra argument (a
:class:`~adabatch.stats.GradStats`; ``updates`` are returned unchanged), the optax convention and the default; or,
built with ``per_example=True``, per-example gradients on the leading axis of ``updates`` (returning their mean).
:func:`adabatch.stats.read_statistics` reads both entry points (and refuses a mean gradient without
``grad_stats=``); one function, :func:`decide`, computes the decision for both.

References:
  Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods", 2024,
  https://arxiv.org/abs/2402.11215.
  Byrd, Chin, Nocedal, Wu, "Sample size selection in optimization methods for machine learning", Math. Prog. 2012.
  Bollapragada, Byrd, Nocedal, "Adaptive sampling strategies for stochastic optimization", SIAM J. Optim. 2018,
  https://arxiv.org/abs/1710.11258.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch import stats as st
from adabatch._validation import check_choice, check_flag, check_positive, check_unit_interval
from adabatch.rules._common import (
    DEFAULT_INIT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    check_rule_arguments,
    round_batch_size,
)
from adabatch.stats import GradStatsNeeds, read_statistics

__all__ = [
    "BatchSizeTestState",
    "augmented_inner_product_test",
    "coordinate_norm_test",
    "decide",
    "inner_product_test",
    "norm_test",
    "orthogonality_test",
]

TESTS = ("norm", "inner_product", "orthogonality", "augmented_inner_product", "coordinate_norm")
AGGREGATIONS = ("max", "mean", "quantile")


class BatchSizeTestState(NamedTuple):
    """State of every batch-size test (one shared layout, so tooling reads any rule the same way)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates seen
    next_batch_size: jax.Array  # int32[]: the decision, size of the next batch
    statistic: jax.Array  # float32[]: b*/b at the last finite test (≤ 1 means it passed)
    trace_cov: jax.Array  # float32[]: trΣ̂ at the last finite test
    mean_sq_norm: jax.Array  # float32[]: ‖ḡ‖² at the last finite test
    threshold: jax.Array  # float32[] (float32[2] = (θ_max, ν_max) for the augmented test): smallest passing constant
    nonfinite_count: jax.Array  # int32[]: tests skipped because a statistic was non-finite
    grad_stats_needs: GradStatsNeeds  # static (no leaves): the optional statistics this test reads


class _Requirement(NamedTuple):
    required: jax.Array  # b*: the batch size the test asks for (may be +inf)
    threshold: jax.Array  # smallest constant(s) that would pass at the current b
    finite: jax.Array  # bool: every statistic the test read is finite


def _safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, +inf where the denominator is zero (a zero gradient asks for the largest batch)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), jnp.inf)


def _threshold(constant: Any, required: jax.Array, n: jax.Array) -> jax.Array:
    # b* scales as 1/constant², so the constant at which b* = b is constant·√(b*/b).
    return constant * jnp.sqrt(required / n)


def _coordinate_ratio(stats: st.GradStats, aggregation: str, quantile: float, guard: float) -> jax.Array:
    """agg_j s_j²/ḡ_j² over the coordinates with ḡ_j² > guard · mean_j ḡ_j² (and > 0)."""
    variances = jnp.concatenate([jnp.ravel(v) for v in jax.tree_util.tree_leaves(st.coordinate_variance(stats))])
    means_sq = jnp.concatenate([jnp.ravel(jnp.square(m)) for m in jax.tree_util.tree_leaves(stats.mean)])
    cutoff = guard * jnp.mean(means_sq)
    valid = (means_sq > cutoff) & (means_sq > 0)
    ratios = jnp.where(valid, variances / jnp.where(valid, means_sq, 1), 0)
    if aggregation == "max":
        agg = jnp.max(jnp.where(valid, ratios, -jnp.inf))
    elif aggregation == "mean":
        agg = jnp.sum(ratios) / jnp.maximum(jnp.sum(valid), 1)
    else:
        agg = jnp.nanquantile(jnp.where(valid, ratios, jnp.nan), quantile)
    # No usable coordinate (zero gradient): ask for the largest batch; NaN variances propagate as non-finite.
    return jnp.where(jnp.any(valid), agg, jnp.where(jnp.any(jnp.isnan(variances)), jnp.nan, jnp.inf))


def _requirement(test: str, stats: st.GradStats, hp: dict[str, Any]) -> _Requirement:
    n = jnp.asarray(stats.count, jnp.float32)
    g2 = st.mean_sq_norm(stats)
    if test == "norm":
        trace = st.trace_covariance(stats)
        required = _safe_ratio(trace, hp["eta"] ** 2 * g2)
        return _Requirement(required, _threshold(hp["eta"], required, n), jnp.isfinite(trace) & jnp.isfinite(g2))
    if test == "coordinate_norm":
        ratio = _coordinate_ratio(stats, hp["aggregation"], hp["quantile"], hp["guard"])
        required = ratio / hp["eta"] ** 2
        return _Requirement(required, _threshold(hp["eta"], required, n), ~jnp.isnan(ratio) & jnp.isfinite(g2))
    if test == "inner_product":
        var_a = st.inner_product_variance(stats)
        ip = _safe_ratio(var_a, hp["theta"] ** 2 * jnp.square(g2))
        return _Requirement(ip, _threshold(hp["theta"], ip, n), jnp.isfinite(var_a) & jnp.isfinite(g2))
    v_orth = st.orthogonal_variance(stats)
    orth = _safe_ratio(v_orth, hp["nu"] ** 2 * g2)
    if test == "orthogonality":
        return _Requirement(orth, _threshold(hp["nu"], orth, n), jnp.isfinite(v_orth) & jnp.isfinite(g2))
    var_a = st.inner_product_variance(stats)
    ip = _safe_ratio(var_a, hp["theta"] ** 2 * jnp.square(g2))
    finite = jnp.isfinite(var_a) & jnp.isfinite(v_orth) & jnp.isfinite(g2)
    both = jnp.stack([_threshold(hp["theta"], ip, n), _threshold(hp["nu"], orth, n)])
    return _Requirement(jnp.maximum(ip, orth), both, finite)


def decide(
    test: str,
    stats: st.GradStats,
    state: BatchSizeTestState,
    *,
    max_batch_size: Any,
    granularity: Any = 1,
    test_interval: Any = 1,
    **constants: Any,
) -> BatchSizeTestState:
    r"""The next state of a batch-size test from the statistics of the current batch (the one decision function
    both entry points of every rule call).

    Args:
      test: one of ``"norm"``, ``"inner_product"``, ``"orthogonality"``, ``"augmented_inner_product"``,
        ``"coordinate_norm"``.
      stats: statistics of the current batch of :math:`b` = ``stats.count`` examples.
      state: the rule's current state.
      max_batch_size, granularity, test_interval: as in :func:`norm_test`.
      **constants: ``eta`` (norm tests), ``theta`` / ``nu`` (inner-product tests), ``aggregation``, ``quantile``,
        ``guard`` (coordinate test).

    Returns:
      The new state: ``batch_size`` is :math:`\min(B_{\max}, \operatorname{roundup}_G(\max(b_k, b,
      \lceil b^\star\rceil)))` when the test runs and its statistics are finite, else unchanged.
    """
    req = _requirement(test, stats, constants)
    n = jnp.asarray(stats.count, jnp.int32)
    cap = jnp.asarray(max_batch_size, jnp.int32)
    ceiling = jnp.ceil(jnp.minimum(req.required, jnp.asarray(cap, jnp.float32))).astype(jnp.int32)
    proposed = round_batch_size(jnp.maximum(jnp.maximum(state.next_batch_size, n), ceiling), granularity, cap)
    scheduled = state.count % jnp.asarray(test_interval, jnp.int32) == 0
    run = scheduled & req.finite
    keep = lambda new, old: jnp.where(run, jnp.asarray(new, old.dtype), old)  # noqa: E731
    return BatchSizeTestState(
        count=optax.safe_increment(state.count),
        next_batch_size=keep(proposed, state.next_batch_size),
        statistic=keep(req.required / jnp.maximum(n, 1), state.statistic),
        trace_cov=keep(st.trace_covariance(stats), state.trace_cov),
        mean_sq_norm=keep(st.mean_sq_norm(stats), state.mean_sq_norm),
        threshold=keep(req.threshold, state.threshold),
        nonfinite_count=state.nonfinite_count + (scheduled & ~req.finite).astype(jnp.int32),
        grad_stats_needs=state.grad_stats_needs,
    )


def _make_test(
    test: str,
    max_batch_size: Any,
    init_batch_size: Any,
    granularity: Any,
    test_interval: Any,
    per_example: bool,
    **constants: Any,
) -> optax.GradientTransformationExtraArgs:
    """The transformation of one test; the public factories validate their constants and call this."""
    check_rule_arguments(max_batch_size, init_batch_size, granularity, test_interval)
    check_flag("per_example", per_example)
    hp = dict(max_batch_size=max_batch_size, granularity=granularity, test_interval=test_interval, **constants)
    needs = GradStatsNeeds(
        sq_sum=test == "coordinate_norm",
        inner_sq_sum=test in ("inner_product", "orthogonality", "augmented_inner_product"),
    )

    def init_fn(params: Any) -> BatchSizeTestState:
        del params
        zero = jnp.zeros((), jnp.float32)
        return BatchSizeTestState(
            count=jnp.zeros((), jnp.int32),
            next_batch_size=jnp.asarray(init_batch_size, jnp.int32),
            statistic=zero,
            trace_cov=zero,
            mean_sq_norm=zero,
            threshold=jnp.zeros((2,) if test == "augmented_inner_product" else (), jnp.float32),
            nonfinite_count=jnp.zeros((), jnp.int32),
            grad_stats_needs=needs,
        )

    def update_fn(updates, state, params=None, *, grad_stats=None, **extra_args):
        del params, extra_args
        updates, stats = read_statistics(
            updates, grad_stats, max_batch_size, needs=needs, per_example=per_example, name=f"{test}_test"
        )
        return updates, decide(test, stats, state, **hp)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_COMMON_DOC = """      max_batch_size: the cap :math:`B_{\\max}` (default 50 000, the reference code's); a multiple of
        ``granularity`` and at least ``init_batch_size``.
      init_batch_size: the decision before the first update, the size of the first batch (default 16; at least 2:
        one example cannot estimate a variance, so a loop feeding the decision would never move).
      granularity: round every decision up to a multiple of this (e.g. micro-batch size × devices).
      test_interval: run the test every this many updates; in between the decision stays.
      per_example: ``False`` (default, the optax convention): ``updates`` is the mean gradient and ``update``
        requires the extra argument ``grad_stats``. ``True``: the leading axis of ``updates`` holds per-example
        gradients (used when no ``grad_stats`` is passed).

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its ``update`` takes the mean gradient plus the extra argument
      ``grad_stats`` (:class:`~adabatch.GradStats`, returning ``updates`` unchanged), or, with ``per_example=True``,
      per-example gradients on the leading axis of ``updates`` (returning their mean); a mean gradient without
      ``grad_stats`` raises a ``ValueError``. The state is a :class:`BatchSizeTestState`; read the decision with
      :func:`adabatch.next_batch_size`.

"""


def _with_common_doc(fn):
    fn.__doc__ = fn.__doc__.replace("    {common}\n", _COMMON_DOC)
    return fn


@_with_common_doc
def norm_test(
    eta: float = 0.1,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The norm test (Byrd et al. 2012) as used by AdAdaGrad-Norm.

    Exact: :math:`\mathbb E\lVert\bar g-\nabla F\rVert^2 \le \eta^2\lVert\nabla F\rVert^2
    \iff \operatorname{tr}\Sigma/b \le \eta^2\lVert\nabla F\rVert^2`. Practical: :math:`\nabla F\to\bar g`,
    :math:`\operatorname{tr}\Sigma\to\widehat{\operatorname{tr}\Sigma}`, so
    :math:`b^\star = \widehat{\operatorname{tr}\Sigma}/(\eta^2\lVert\bar g\rVert^2)` and ``threshold`` is
    :math:`\eta_{\max} = \sqrt{\widehat{\operatorname{tr}\Sigma}/(b\lVert\bar g\rVert^2)}`. The decision is
    unchanged when every gradient is scaled by the same constant. Needs only ``count``, ``mean`` and
    ``sq_norm_sum``.

    Args:
      eta: the constant :math:`\eta>0` (reference code default 0.1; Byrd et al. used 0.5).
    {common}
    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adabatch
      >>> tx = adabatch.norm_test(eta=0.5, max_batch_size=1024, init_batch_size=4)
      >>> per_example = {"w": jnp.array([[2.0, -1.0], [-1.0, 1.5], [1.0, 0.2], [0.1, 0.9]])}
      >>> stats = adabatch.stats.from_per_example(per_example)  # or adabatch.grad_stats(loss_fn, params, batch)
      >>> mean, state = tx.update(stats.mean, tx.init({"w": jnp.zeros(2)}), grad_stats=stats)
      >>> int(adabatch.next_batch_size(state))
      26
      >>> tx = adabatch.norm_test(eta=0.5, max_batch_size=1024, init_batch_size=4, per_example=True)
      >>> mean, state = tx.update(per_example, tx.init({"w": jnp.zeros(2)}))  # the examples on the leading axis
      >>> int(adabatch.next_batch_size(state))
      26

    References:
      Byrd, Chin, Nocedal, Wu, "Sample size selection in optimization methods for machine learning", 2012.
      Lau, Liu, Kolar, "AdAdaGrad", 2024, https://arxiv.org/abs/2402.11215.
    """
    check_positive("eta", eta)
    shared = (max_batch_size, init_batch_size, granularity, test_interval, per_example)
    return _make_test("norm", *shared, eta=eta)


@_with_common_doc
def inner_product_test(
    theta: float = 0.1,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The inner-product test (Bollapragada, Byrd, Nocedal 2018).

    Exact: :math:`\operatorname{Var}(\langle g_i,\nabla F\rangle)/b \le \theta^2\lVert\nabla F\rVert^4`. Practical,
    on the whole parameter vector: with :math:`a_i=\langle g_i,\bar g\rangle`,
    :math:`b^\star = \widehat{\operatorname{Var}}(a)/(\theta^2\lVert\bar g\rVert^4)`; ``threshold`` is
    :math:`\theta_{\max}=\sqrt{\widehat{\operatorname{Var}}(a)/(b\lVert\bar g\rVert^4)}`. Needs
    ``inner_sq_sum`` (the AdAdaGrad reference code computes :math:`a_i` per parameter tensor and sums the
    variances, dropping cross-layer covariances; adabatch uses the whole vector).

    Args:
      theta: the constant :math:`\theta>0` (reference code default 0.1; Bollapragada et al. used 0.9).
    {common}
    Example:
      >>> import jax.numpy as jnp
      >>> import adabatch
      >>> tx = adabatch.inner_product_test(theta=0.25, max_batch_size=1024, init_batch_size=4, per_example=True)
      >>> g = {"w": jnp.array([[2.0, -1.0], [-1.0, 1.5], [1.0, 0.2], [0.1, 0.9]])}
      >>> int(adabatch.next_batch_size(tx.update(g, tx.init({"w": jnp.zeros(2)}))[1]))
      6
    """
    check_positive("theta", theta)
    shared = (max_batch_size, init_batch_size, granularity, test_interval, per_example)
    return _make_test("inner_product", *shared, theta=theta)


@_with_common_doc
def orthogonality_test(
    nu: float = 0.1,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The orthogonality test (Bollapragada, Byrd, Nocedal 2018).

    Exact: :math:`\mathbb E\lVert\bar g - (\langle\bar g,\nabla F\rangle/\lVert\nabla F\rVert^2)\nabla F\rVert^2
    \le \nu^2\lVert\nabla F\rVert^2`. Practical: :math:`b^\star = V_\perp/(\nu^2\lVert\bar g\rVert^2)` with
    :math:`V_\perp = (q-\sum_i a_i^2/\lVert\bar g\rVert^2)/(b-1)`; ``threshold`` is
    :math:`\nu_{\max}=\sqrt{V_\perp/(b\lVert\bar g\rVert^2)}`. Needs ``inner_sq_sum``.

    Args:
      nu: the constant :math:`\nu>0` (reference code default 0.1; Bollapragada et al. used 5.84 ≈ tan 80°).
    {common}
    Example:
      >>> import jax.numpy as jnp
      >>> import adabatch
      >>> tx = adabatch.orthogonality_test(nu=0.5, max_batch_size=1024, init_batch_size=4, per_example=True)
      >>> g = {"w": jnp.array([[2.0, -1.0], [-1.0, 1.5], [1.0, 0.2], [0.1, 0.9]])}
      >>> int(adabatch.next_batch_size(tx.update(g, tx.init({"w": jnp.zeros(2)}))[1]))
      25
    """
    check_positive("nu", nu)
    shared = (max_batch_size, init_batch_size, granularity, test_interval, per_example)
    return _make_test("orthogonality", *shared, nu=nu)


@_with_common_doc
def augmented_inner_product_test(
    theta: float = 0.1,
    nu: float = 0.1,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The augmented inner-product test: the inner-product test **and** the orthogonality test.

    :math:`b^\star = \max\bigl(\widehat{\operatorname{Var}}(a)/(\theta^2\lVert\bar g\rVert^4),\
    V_\perp/(\nu^2\lVert\bar g\rVert^2)\bigr)`; ``threshold`` holds :math:`(\theta_{\max}, \nu_{\max})`.

    Args:
      theta: the inner-product constant :math:`\theta>0` (the reference README uses 0.5).
      nu: the orthogonality constant :math:`\nu>0` (the reference README uses 1.0).
    {common}
    Example:
      >>> import jax.numpy as jnp
      >>> import adabatch
      >>> kw = dict(max_batch_size=1024, init_batch_size=4, per_example=True)
      >>> tx = adabatch.augmented_inner_product_test(theta=0.25, nu=0.5, **kw)
      >>> g = {"w": jnp.array([[2.0, -1.0], [-1.0, 1.5], [1.0, 0.2], [0.1, 0.9]])}
      >>> int(adabatch.next_batch_size(tx.update(g, tx.init({"w": jnp.zeros(2)}))[1]))
      25
    """
    check_positive("theta", theta)
    check_positive("nu", nu)
    shared = (max_batch_size, init_batch_size, granularity, test_interval, per_example)
    return _make_test("augmented_inner_product", *shared, theta=theta, nu=nu)


@_with_common_doc
def coordinate_norm_test(
    eta: float = 0.1,
    *,
    aggregation: str = "mean",
    quantile: float = 0.5,
    guard: float = 1e-3,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    init_batch_size: int = DEFAULT_INIT_BATCH_SIZE,
    granularity: int = 1,
    test_interval: int = 1,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The coordinate-wise norm test of AdAdaGrad (for coordinate-wise AdaGrad).

    Exact, for every coordinate :math:`j`: :math:`\mathbb E(\bar g_j-\partial_jF)^2 \le \eta^2(\partial_jF)^2
    \iff \sigma_j^2/b \le \eta^2(\partial_jF)^2`. Practical: :math:`r_j = s_j^2/(\eta^2\bar g_j^2)` and
    :math:`b^\star = \operatorname{agg}_{j\in J} r_j` over the guarded set
    :math:`J = \{j: \bar g_j^2 > \text{guard}\cdot\operatorname{mean}_k\bar g_k^2\}`.

    The paper requires every coordinate (``aggregation="max"``) and leaves the aggregation open. Coordinates whose
    true partial derivative is zero have :math:`\bar g_j^2\approx s_j^2/b`, so their ratio is about :math:`b`
    divided by a :math:`\chi^2_1` draw: heavy-tailed, and the maximum over millions of coordinates sends the batch
    to ``max_batch_size`` at once. adabatch therefore defaults to the **mean** of the ratios over the guarded
    coordinates (the guard bounds each ratio by :math:`s_j^2/(\text{guard}\cdot\operatorname{mean}\bar g^2)`),
    and offers ``"max"`` (the paper's literal test) and ``"quantile"`` (the ``quantile`` of the ratios; costs a
    sort of the :math:`d` ratios). ``threshold`` is :math:`\eta\sqrt{b^\star/b}`. With no coordinate above the
    guard (a zero gradient) :math:`b^\star=\infty`. Needs ``sq_sum``.

    Args:
      eta: the constant :math:`\eta>0`.
      aggregation: ``"mean"`` (default), ``"max"`` or ``"quantile"``.
      quantile: the quantile in (0, 1) for ``aggregation="quantile"``.
      guard: coordinates with :math:`\bar g_j^2 \le` ``guard`` × the mean :math:`\bar g^2` are ignored (≥ 0).
    {common}
    Example:
      >>> import jax.numpy as jnp
      >>> import adabatch
      >>> tx = adabatch.coordinate_norm_test(eta=0.5, max_batch_size=1024, init_batch_size=4, per_example=True)
      >>> g = {"w": jnp.array([[2.0, -1.0], [-1.0, 1.5], [1.0, 0.2], [0.1, 0.9]])}
      >>> int(adabatch.next_batch_size(tx.update(g, tx.init({"w": jnp.zeros(2)}))[1]))
      27
    """
    check_positive("eta", eta)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_unit_interval("quantile", quantile, closed_left=False)
    check_positive("guard", guard, allow_zero=True)
    shared = (max_batch_size, init_batch_size, granularity, test_interval, per_example)
    return _make_test("coordinate_norm", *shared, eta=eta, aggregation=aggregation, quantile=quantile, guard=guard)
