"""GradStats and its estimators against float64 NumPy brute force over explicit per-example gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adabatch
from adabatch import stats as st
from tests import reference as ref
from tests.conftest import random_per_example

ESTIMATORS = [
    "mean_sq_norm",
    "trace_covariance",
    "unbiased_grad_sq_norm",
    "b_simple",
    "inner_product_variance",
    "orthogonal_variance",
]


def _flat(tree):
    return ref.flatten_per_example([tree[k] for k in sorted(tree)])


def _flat_params(tree):
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def assert_rel(actual, expected, rtol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=0)


def assert_rel_norm(actual, expected, rtol):
    """‖actual − expected‖ ≤ rtol ‖expected‖: the relative error of a vector as a whole (a coordinate near zero
    may differ by float32 rounding between two exact computations of the per-example gradients)."""
    actual = np.asarray(actual, np.float64)
    assert np.linalg.norm(actual - expected) <= rtol * np.linalg.norm(expected)


@pytest.mark.parametrize("b", [2, 7, 64])
def test_estimators_match_bruteforce(dtype, b):
    rng = np.random.default_rng(b)
    grads = {k: v.astype(dtype) for k, v in random_per_example(rng, b, offset=0.5).items()}
    G = _flat(grads)
    expected = ref.estimators(G)
    s = st.from_per_example(jax.tree_util.tree_map(jnp.asarray, grads), sq_sum=True, inner_sq_sum=True)
    rtol = 1e-5 if dtype == np.float32 else 1e-11
    assert int(s.count) == b
    assert s.sq_norm_sum.dtype == dtype
    assert_rel(_flat_params(s.mean), expected["mean"], rtol)
    assert_rel(s.sq_norm_sum, expected["sq_norm_sum"], rtol)
    assert_rel(_flat_params(s.sq_sum), expected["sq_sum"], rtol)
    assert_rel(s.inner_sq_sum, expected["inner_sq_sum"], rtol)
    for name in ESTIMATORS:
        assert_rel(getattr(st, name)(s), expected[name], rtol)
    assert_rel(_flat_params(st.coordinate_variance(s)), expected["coordinate_variance"], rtol)


def test_bf16_gradients_accumulate_in_float32():
    rng = np.random.default_rng(0)
    grads = {k: jnp.asarray(v, jnp.bfloat16) for k, v in random_per_example(rng, 32).items()}
    s = st.from_per_example(grads, sq_sum=True)
    assert s.sq_norm_sum.dtype == jnp.float32 and s.mean["w"].dtype == jnp.float32
    exact = ref.estimators(_flat({k: np.asarray(v.astype(jnp.float32)) for k, v in grads.items()}))
    assert_rel(st.trace_covariance(s), exact["trace_covariance"], 1e-5)
    assert_rel(s.sq_norm_sum, exact["sq_norm_sum"], 1e-6)


def test_mask_ignores_padding():
    rng = np.random.default_rng(1)
    grads = random_per_example(rng, 10)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    masked = st.from_per_example(jax.tree_util.tree_map(jnp.asarray, grads), mask=mask, sq_sum=True, inner_sq_sum=True)
    kept = st.from_per_example({k: jnp.asarray(v[mask]) for k, v in grads.items()}, sq_sum=True, inner_sq_sum=True)
    for a, b in zip(jax.tree_util.tree_leaves(masked), jax.tree_util.tree_leaves(kept), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_variances_undefined_for_one_example_are_nan_not_division_by_zero():
    s = st.from_per_example({"w": jnp.ones((1, 3))}, sq_sum=True, inner_sq_sum=True)
    for value in (st.trace_covariance(s), st.inner_product_variance(s), st.orthogonal_variance(s), st.b_simple(s)):
        assert np.isnan(value)
    assert np.isnan(st.coordinate_variance(s)["w"]).all()
    assert float(st.mean_sq_norm(s)) == 3.0


def test_zero_gradients_give_finite_statistics():
    s = st.from_per_example({"w": jnp.zeros((4, 3))}, sq_sum=True, inner_sq_sum=True)
    assert float(st.trace_covariance(s)) == 0.0
    assert float(st.orthogonal_variance(s)) == 0.0
    assert float(st.inner_product_variance(s)) == 0.0
    assert np.isposinf(st.b_simple(s))


def test_b_simple_is_inf_when_unbiased_signal_is_negative():
    # Two opposite gradients: ‖ḡ‖² = 0 < trΣ̂/n, the unbiased ‖∇F‖² estimate is negative.
    s = st.from_per_example({"w": jnp.array([[1.0, 0.0], [-1.0, 0.2]])})
    assert float(st.unbiased_grad_sq_norm(s)) < 0
    assert np.isposinf(st.b_simple(s))


def test_merge_is_exact_and_drops_inner_sq_sum():
    rng = np.random.default_rng(2)
    grads = jax.tree_util.tree_map(jnp.asarray, random_per_example(rng, 9))
    whole = st.from_per_example(grads, sq_sum=True)
    a = st.from_per_example(jax.tree_util.tree_map(lambda x: x[:4], grads), sq_sum=True, inner_sq_sum=True)
    b = st.from_per_example(jax.tree_util.tree_map(lambda x: x[4:], grads), sq_sum=True)
    merged = st.merge(a, b)
    assert merged.inner_sq_sum is None
    for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(whole), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert st.merge(a, st.from_per_example(jax.tree_util.tree_map(lambda x: x[4:], grads))).sq_sum is None


# --- the producer: grad_stats(loss_fn, params, batch) ------------------------------------------------------------


def _linear_loss(p, batch):
    x, y = batch
    return 0.5 * jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2, axis=-1)


# one jax.grad per example, no vmap (compiled once per dtype for the whole module: the rows are passed as
# arguments, not sliced eagerly, and the function is shared by every test)
_grad_one = jax.jit(jax.grad(lambda q, xi, yi: _linear_loss(q, (xi[None], yi[None]))[0]))


def _linear_problem(rng, b, dtype=np.float32):
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)), dtype), "b": jnp.asarray(rng.standard_normal(3), dtype)}
    batch = (jnp.asarray(rng.standard_normal((b, 5)), dtype), jnp.asarray(rng.standard_normal((b, 3)), dtype))
    loss_fn, grad_one = _linear_loss, _grad_one

    def brute_force(p):
        x, y = np.asarray(batch[0]), np.asarray(batch[1])
        rows = [grad_one(p, x[i], y[i]) for i in range(b)]
        return {k: np.stack([np.asarray(r[k], np.float64) for r in rows]) for k in p}

    return params, batch, loss_fn, brute_force


@pytest.mark.parametrize("chunk_size", [None, 4, 5, 11])
def test_grad_stats_matches_bruteforce(dtype, chunk_size):
    rng = np.random.default_rng(3)
    params, batch, loss_fn, brute_force = _linear_problem(rng, 11, dtype)
    expected = ref.estimators(_flat(brute_force(params)))
    s, losses = adabatch.grad_stats(
        loss_fn, params, batch, chunk_size=chunk_size, sq_sum=True, inner_sq_sum=True, return_losses=True
    )
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    assert int(s.count) == 11 and losses.shape == (11,)
    assert_rel(losses, np.asarray(loss_fn(params, batch)), rtol)
    assert_rel_norm(_flat_params(s.mean), expected["mean"], rtol)
    assert_rel(s.sq_norm_sum, expected["sq_norm_sum"], rtol)
    assert_rel_norm(_flat_params(s.sq_sum), expected["sq_sum"], rtol)
    assert_rel(s.inner_sq_sum, expected["inner_sq_sum"], rtol)
    assert_rel(st.trace_covariance(s), expected["trace_covariance"], rtol)


def test_grad_stats_mask_and_jit():
    rng = np.random.default_rng(4)
    params, batch, loss_fn, _ = _linear_problem(rng, 8)
    mask = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    masked = jax.jit(lambda p, x, m: adabatch.grad_stats(loss_fn, p, x, mask=m, chunk_size=3))(params, batch, mask)
    kept = adabatch.grad_stats(loss_fn, params, jax.tree_util.tree_map(lambda x: x[:5], batch))
    assert int(masked.count) == 5
    for x, y in zip(jax.tree_util.tree_leaves(masked), jax.tree_util.tree_leaves(kept), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_inner_products_by_jvp_match_bruteforce():
    rng = np.random.default_rng(5)
    params, batch, loss_fn, brute_force = _linear_problem(rng, 6)
    G = _flat(brute_force(params))
    v = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "b": jnp.asarray(rng.standard_normal(3))}
    assert_rel(adabatch.inner_products(loss_fn, params, batch, v), G @ _flat_params(v), 1e-5)


def test_grad_stats_bad_input():
    rng = np.random.default_rng(6)
    params, batch, loss_fn, _ = _linear_problem(rng, 4)
    with pytest.raises(ValueError, match="per-example losses"):
        adabatch.grad_stats(lambda p, b: jnp.mean(loss_fn(p, b)), params, batch)
    with pytest.raises(ValueError, match="method"):
        adabatch.grad_stats(loss_fn, params, batch, method="magic")
    with pytest.raises(ValueError, match="chunk_size"):
        adabatch.grad_stats(loss_fn, params, batch, chunk_size=0)
    with pytest.raises(ValueError, match="leading batch axis"):
        adabatch.grad_stats(loss_fn, params, (batch[0], batch[1][:3]))
    with pytest.raises(ValueError, match="mask"):
        adabatch.grad_stats(loss_fn, params, batch, mask=jnp.ones(3))
    with pytest.raises(ValueError, match="params"):
        adabatch.grad_stats(loss_fn, {"w": jnp.ones((5, 3), jnp.int32), "b": params["b"]}, batch)
