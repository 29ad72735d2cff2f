"""Batch-size tests: decisions against the formulas of algorithms.md §1.2 computed by hand in NumPy."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from adabatch import stats as st
from tests import reference as ref
from tests.conftest import random_per_example

RULES = {  # per-example gradients on the leading axis of updates unless per_example=False is passed
    "norm": lambda **kw: adabatch.norm_test(0.3, **{"per_example": True, **kw}),
    "inner_product": lambda **kw: adabatch.inner_product_test(0.4, **{"per_example": True, **kw}),
    "orthogonality": lambda **kw: adabatch.orthogonality_test(0.6, **{"per_example": True, **kw}),
    "augmented_inner_product": lambda **kw: adabatch.augmented_inner_product_test(
        0.4, 0.6, **{"per_example": True, **kw}
    ),
    "coordinate_norm": lambda **kw: adabatch.coordinate_norm_test(0.3, **{"per_example": True, **kw}),
}
CONSTANTS = {"eta": 0.3, "theta": 0.4, "nu": 0.6}
PARAMS = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4), "c": jnp.zeros(2)}


def _flat(tree):
    return ref.flatten_per_example([np.asarray(tree[k]) for k in sorted(tree)])


def _grads(seed, b, offset=0.3, scale=1.0):
    return jax.tree_util.tree_map(
        jnp.asarray, random_per_example(np.random.default_rng(seed), b, offset=offset, scale=scale)
    )


@functools.cache
def _jitted_decisions(dtype, seed, b, offset):
    """Every rule's jitted update of one batch, in one jitted function (one compilation per dtype and batch instead
    of one per rule); computed under the ``dtype`` fixture's x64 setting."""
    grads = jax.tree_util.tree_map(lambda x: x.astype(dtype), _grads(seed, b, offset))
    txs = {test: make(max_batch_size=4096, granularity=4, init_batch_size=4) for test, make in RULES.items()}
    outputs = jax.jit(lambda g, states: {t: tx.update(g, states[t]) for t, tx in txs.items()})(
        grads, {t: tx.init(PARAMS) for t, tx in txs.items()}
    )
    return grads, outputs


@pytest.mark.parametrize("test", RULES)
@pytest.mark.parametrize("seed,b,offset", [(0, 8, 0.3), (1, 16, 0.05), (2, 32, 1.0), (3, 5, 0.0)])
def test_decision_matches_hand_formula(dtype, test, seed, b, offset):
    grads, outputs = _jitted_decisions(np.dtype(dtype).name, seed, b, offset)
    mean, state = outputs[test]
    G = _flat(grads)
    required = ref.required_batch(test, G, **CONSTANTS)
    assert int(state.next_batch_size) == ref.next_batch_size(required, 4, b, 4096, granularity=4)
    np.testing.assert_allclose(float(state.statistic), required / b, rtol=2e-5)
    e = ref.estimators(G)
    np.testing.assert_allclose(float(state.trace_cov), e["trace_covariance"], rtol=1e-5)
    np.testing.assert_allclose(float(state.mean_sq_norm), e["mean_sq_norm"], rtol=1e-5)
    for leaf, expected in zip(jax.tree_util.tree_leaves(mean), jax.tree_util.tree_leaves(grads), strict=True):
        assert leaf.dtype == expected.dtype
        np.testing.assert_allclose(leaf, np.mean(np.asarray(expected, np.float64), axis=0), rtol=1e-5, atol=1e-7)


def test_thresholds_are_the_smallest_passing_constants():
    grads = _grads(4, 16, 0.2)
    G = _flat(grads)
    e = ref.estimators(G)
    b, g2 = 16, e["mean_sq_norm"]
    expected = {
        "norm": math.sqrt(e["trace_covariance"] / (b * g2)),
        "inner_product": math.sqrt(e["inner_product_variance"] / (b * g2**2)),
        "orthogonality": math.sqrt(e["orthogonal_variance"] / (b * g2)),
    }
    for test, value in expected.items():
        state = RULES[test]().update(grads, RULES[test]().init(PARAMS))[1]
        np.testing.assert_allclose(float(state.threshold), value, rtol=1e-5)
        # At the threshold the test asks for exactly the current batch.
        at = {"norm": adabatch.norm_test, "inner_product": adabatch.inner_product_test}.get(test)
        if at is not None:
            tx = at(value * (1 + 1e-4), per_example=True)
            assert int(tx.update(grads, tx.init(PARAMS))[1].next_batch_size) == b
    state = RULES["augmented_inner_product"]().update(grads, RULES["augmented_inner_product"]().init(PARAMS))[1]
    np.testing.assert_allclose(state.threshold, [expected["inner_product"], expected["orthogonality"]], rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_coordinate_aggregations(aggregation):
    grads = _grads(5, 12, 0.4)
    tx = adabatch.coordinate_norm_test(
        0.5, aggregation=aggregation, max_batch_size=10**6, init_batch_size=2, per_example=True
    )
    state = tx.update(grads, tx.init(PARAMS))[1]
    required = ref.required_batch("coordinate_norm", _flat(grads), eta=0.5, aggregation=aggregation)
    assert int(state.next_batch_size) == ref.next_batch_size(required, 2, 12, 10**6)


def test_coordinate_quantile_and_guard():
    grads = {"w": jnp.array([[1.0, 1e-6, 2.0], [3.0, -1e-6, 1.0], [2.0, 3e-6, 0.0]])}
    G = np.asarray(grads["w"], np.float64)
    ratios = G.var(axis=0, ddof=1) / G.mean(axis=0) ** 2
    tx = adabatch.coordinate_norm_test(1.0, aggregation="quantile", quantile=0.5, max_batch_size=1024, per_example=True)
    state = tx.update(grads, tx.init({"w": jnp.zeros(3)}))[1]
    # The middle coordinate is below the guard; the median of the two others is their mean.
    np.testing.assert_allclose(float(state.statistic) * 3, (ratios[0] + ratios[2]) / 2, rtol=1e-5)


def test_grad_stats_entry_point_gives_the_same_decision():
    """``per_example=True`` on per-example gradients and the default (``grad_stats=`` with the mean) from the same
    gradients give exactly the same state; ``grad_stats=`` also takes precedence with ``per_example=True``."""
    grads = _grads(6, 24, 0.2)
    s = st.from_per_example(grads, sq_sum=True, inner_sq_sum=True)
    for test, make in RULES.items():
        per_example, optax_convention = make(max_batch_size=2048), make(max_batch_size=2048, per_example=False)
        mean, a = per_example.update(grads, per_example.init(PARAMS))
        out, b = optax_convention.update(s.mean, optax_convention.init(PARAMS), grad_stats=s)
        out2, c = per_example.update(s.mean, per_example.init(PARAMS), grad_stats=s)
        assert out is s.mean and out2 is s.mean, test
        for x, y, z in zip(*(jax.tree_util.tree_leaves(t) for t in (a, b, c)), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=test)
            np.testing.assert_array_equal(x, z, err_msg=test)
        for x, y in zip(jax.tree_util.tree_leaves(mean), jax.tree_util.tree_leaves(s.mean), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=test)


@pytest.mark.parametrize("test", RULES)
def test_mean_gradient_without_grad_stats_is_refused(test):
    """The optax convention (the default ``per_example=False``): a mean gradient alone is refused with a message
    naming both ways out, never read as per-example gradients (a (3, 4) leaf would look like 3 examples)."""
    tx = RULES[test](per_example=False)
    mean = jax.tree_util.tree_map(lambda x: jnp.mean(x, 0), _grads(0, 8))
    with pytest.raises(ValueError, match=r"(?s)grad_stats=.*per_example=True") as info:
        tx.update(mean, tx.init(PARAMS))
    assert f"{test}_test" in str(info.value)
    with pytest.raises(ValueError, match="per_example"):
        RULES[test](per_example=1)


def test_never_shrinks_caps_and_interval():
    noisy, clean = _grads(7, 8, 0.05), _grads(8, 8, 5.0, scale=0.01)
    tx = adabatch.norm_test(0.1, max_batch_size=96, granularity=8, init_batch_size=8, test_interval=2, per_example=True)
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    sizes = []
    for grads in (noisy, noisy, clean, noisy, clean):
        state = update(grads, state)[1]
        sizes.append(int(state.next_batch_size))
    # Test at updates 0, 2, 4 only; noise drives it to the cap; clean gradients never shrink it.
    assert sizes == [96, 96, 96, 96, 96]
    tx = adabatch.norm_test(0.1, max_batch_size=96, granularity=8, init_batch_size=8, test_interval=2, per_example=True)
    state = tx.init(PARAMS)
    sizes = []
    for grads in (clean, noisy, clean):
        state = tx.update(grads, state)[1]
        sizes.append(int(state.next_batch_size))
    assert sizes == [8, 8, 8]  # the noisy batch fell on a skipped update


def test_zero_gradient_goes_to_max_without_nan():
    zero = {"w": jnp.zeros((4, 3, 4)), "b": jnp.zeros((4, 4)), "c": jnp.zeros((4, 2))}
    for test, make in RULES.items():
        tx = make(max_batch_size=512)
        state = tx.update(zero, tx.init(PARAMS))[1]
        assert int(state.next_batch_size) == 512, test
        assert int(state.nonfinite_count) == 0, test
        assert np.isfinite(state.trace_cov) and np.isfinite(state.mean_sq_norm)


def test_nonfinite_statistics_leave_the_decision_and_are_flagged():
    grads = _grads(9, 8)
    bad = dict(grads, b=grads["b"].at[0, 0].set(jnp.nan))
    for test, make in RULES.items():
        tx = make(max_batch_size=512, init_batch_size=8)
        state = tx.init(PARAMS)
        state = tx.update(bad, state)[1]
        assert int(state.next_batch_size) == 8 and int(state.nonfinite_count) == 1, test
        assert float(state.statistic) == 0.0  # diagnostics keep the last finite test
        state = tx.update(grads, state)[1]
        assert int(state.nonfinite_count) == 1 and float(state.statistic) > 0, test


def test_next_batch_size_finds_the_decision_in_any_nesting():
    rule = adabatch.norm_test(init_batch_size=16, max_batch_size=64)
    nested = [
        optax.chain(optax.clip_by_global_norm(1.0), rule, optax.sgd(0.1)),
        optax.inject_hyperparams(adabatch.norm_test)(eta=0.2, init_batch_size=16, max_batch_size=64),
        optax.MultiSteps(optax.chain(rule, optax.sgd(0.1)), every_k_schedule=2),
        adabatch.adadagrad_norm(0.1, init_batch_size=16, max_batch_size=64),
    ]
    for tx in nested:
        assert int(adabatch.next_batch_size(tx.init(PARAMS))) == 16
    assert int(optax.tree.get(nested[0].init(PARAMS), "next_batch_size")) == 16  # optax's own lookup finds it too
    with pytest.raises(ValueError, match="batch_size"):
        adabatch.next_batch_size(optax.sgd(0.1).init(PARAMS))
    assert int(adabatch.next_batch_size(optax.chain(rule).init(PARAMS))) == 16
    assert adabatch.norm_test().init(PARAMS).next_batch_size == 16  # the default first batch


def test_inject_hyperparams_changes_eta_without_retracing():
    tx = optax.inject_hyperparams(adabatch.norm_test)(eta=0.3, max_batch_size=4096, per_example=True)
    grads = _grads(10, 8, 0.3)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    small = int(adabatch.next_batch_size(update(grads, state)[1]))
    state.hyperparams["eta"] = jnp.asarray(0.1)
    large = int(adabatch.next_batch_size(update(grads, state)[1]))
    required = ref.required_batch("norm", _flat(grads), eta=0.1)
    assert large == ref.next_batch_size(required, 1, 8, 4096) and large > small


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: adabatch.norm_test(0.0), "eta"),
        (lambda: adabatch.norm_test(float("nan")), "eta"),
        (lambda: adabatch.norm_test(-1.0), "eta"),
        (lambda: adabatch.inner_product_test(float("inf")), "theta"),
        (lambda: adabatch.orthogonality_test(0), "nu"),
        (lambda: adabatch.augmented_inner_product_test(0.1, -2), "nu"),
        (lambda: adabatch.norm_test(max_batch_size=0), "max_batch_size"),
        (lambda: adabatch.norm_test(max_batch_size=2.5), "max_batch_size"),
        (lambda: adabatch.norm_test(max_batch_size=64, init_batch_size=128), "max_batch_size=64"),
        (lambda: adabatch.norm_test(init_batch_size=1), "at least 2"),
        (lambda: adabatch.norm_test(max_batch_size=100, granularity=8), "granularity"),
        (lambda: adabatch.norm_test(test_interval=0), "test_interval"),
        (lambda: adabatch.coordinate_norm_test(aggregation="median"), "aggregation"),
        (lambda: adabatch.coordinate_norm_test(aggregation="quantile", quantile=1.5), "quantile"),
        (lambda: adabatch.coordinate_norm_test(guard=-1.0), "guard"),
        (lambda: adabatch.adadagrad_norm(0.1, test="bogus"), "test"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_update_inputs():
    tx = adabatch.norm_test(max_batch_size=64, per_example=True)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="at least 2 examples"):
        tx.update(_grads(0, 1), state)
    with pytest.raises(ValueError, match="max_batch_size=64"):
        tx.update(_grads(0, 65), state)
    with pytest.raises(ValueError, match="floating"):
        tx.update({"w": jnp.ones((4, 3), jnp.int32)}, state)
    with pytest.raises(ValueError, match="leading axis"):
        tx.update({"w": jnp.ones((4, 3)), "b": jnp.ones((5,))}, state)
    mean = jax.tree_util.tree_map(lambda x: x[0], _grads(0, 4))
    s = st.from_per_example(_grads(0, 4))
    with pytest.raises(ValueError, match="grad_stats.mean"):
        tx.update({"w": mean["w"]}, state, grad_stats=s)
    with pytest.raises(ValueError, match="does not match"):
        tx.update(dict(mean, c=jnp.ones(3)), state, grad_stats=s)
    with pytest.raises(ValueError, match="GradStats"):
        tx.update(mean, state, grad_stats={"count": 4})
    ip = adabatch.inner_product_test()
    with pytest.raises(ValueError, match="inner_sq_sum"):
        ip.update(mean, ip.init(PARAMS), grad_stats=s)
    coord = adabatch.coordinate_norm_test()
    with pytest.raises(ValueError, match="sq_sum"):
        coord.update(mean, coord.init(PARAMS), grad_stats=s)
