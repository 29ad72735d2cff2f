"""Group-mean (micro-batch / device) estimators: exact in the limit of one example per group, unbiased in a
Monte-Carlo test on synthetic Gaussian gradients, and a clear error for a single group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adabatch.stats import (
    coordinate_variance,
    device_grad_stats,
    from_group_means,
    from_per_example,
    grad_stats,
    inner_product_variance,
    trace_covariance,
    unbiased_grad_sq_norm,
)


def linear_loss(theta, g):
    """Per-example loss ⟨θ, g_i⟩: its gradient is exactly g_i, so batches of g are batches of gradients."""
    return g @ theta


def test_groups_of_one_example_equal_per_example_statistics():
    g = jax.random.normal(jax.random.key(0), (6, 4))
    exact = from_per_example({"w": g}, sq_sum=True, inner_sq_sum=True)
    est = from_group_means({"w": g}, jnp.ones(6), sq_sum=True, inner_sq_sum=True)
    for a, b in [(est.sq_norm_sum, exact.sq_norm_sum), (est.inner_sq_sum, exact.inner_sq_sum)]:
        np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(est.sq_sum["w"], exact.sq_sum["w"], rtol=1e-5)
    assert int(est.count) == 6


def test_equal_groups_match_the_formula_and_the_method():
    g = np.asarray(jax.random.normal(jax.random.key(1), (12, 3)), np.float64)
    means = g.reshape(4, 3, 3).mean(1)
    expected_trace = 3 * np.sum((means - means.mean(0)) ** 2) / (4 - 1)  # b_group × sample variance of means
    stats = grad_stats(linear_loss, jnp.zeros(3), jnp.asarray(g, jnp.float32), method="microbatch", num_microbatches=4)
    np.testing.assert_allclose(trace_covariance(stats), expected_trace, rtol=1e-5)
    np.testing.assert_allclose(stats.mean, g.mean(0), rtol=1e-5, atol=1e-7)
    assert int(stats.count) == 12


def test_unequal_groups_and_mask_keep_the_exact_mean():
    g = jax.random.normal(jax.random.key(2), (10, 3))
    mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], jnp.float32)
    stats, losses = grad_stats(
        linear_loss, jnp.ones(3), g, method="microbatch", num_microbatches=3, mask=mask, return_losses=True
    )
    assert int(stats.count) == 8
    np.testing.assert_allclose(stats.mean, np.asarray(g)[np.asarray(mask) > 0].mean(0), rtol=1e-5)
    np.testing.assert_allclose(losses, np.asarray(g).sum(1), rtol=1e-6)


def test_device_statistics_equal_group_statistics():
    means = {"a": jax.random.normal(jax.random.key(3), (4, 2, 3)), "b": jax.random.normal(jax.random.key(4), (4, 5))}
    counts = jnp.array([3.0, 5.0, 4.0, 4.0])
    expected = from_group_means(means, counts, sq_sum=True, inner_sq_sum=True)
    per_device = jax.vmap(
        lambda m, c: device_grad_stats(m, c, "devices", sq_sum=True, inner_sq_sum=True), axis_name="devices"
    )(means, counts)
    got = jax.tree.map(lambda x: x[0], per_device)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unbiased_monte_carlo():
    """E[trΣ̂_k] = trΣ and E[‖∇F‖²̂] = ‖μ‖² over 4000 batches of b = 16 Gaussian gradients in k = 4 groups; each
    mean is checked within 5 standard errors (false-failure probability < 1e-6 per check)."""
    d, b, k, trials = 5, 16, 4, 4000
    mu = jnp.array([0.5, -0.3, 0.2, 0.0, 0.1])
    sigma = jnp.array([1.0, 0.5, 2.0, 0.3, 1.5])

    @jax.jit
    def one(key):
        g = mu + sigma * jax.random.normal(key, (b, d))
        s = grad_stats(linear_loss, jnp.zeros(d), g, method="microbatch", num_microbatches=k, sq_sum=True)
        return trace_covariance(s), unbiased_grad_sq_norm(s), coordinate_variance(s)

    trace, norm, coords = jax.vmap(one)(jax.random.split(jax.random.key(5), trials))
    for samples, truth in [(trace, jnp.sum(sigma**2)), (norm, jnp.sum(mu**2)), *zip(coords.T, sigma**2, strict=True)]:
        samples = np.asarray(samples, np.float64)
        stderr = samples.std(ddof=1) / np.sqrt(trials)
        assert abs(samples.mean() - float(truth)) < 5 * stderr, (samples.mean(), float(truth), stderr)
    # and the documented variance: Var trΣ̂_k = 2 tr(Σ²)/(k−1) for Gaussian gradients
    np.testing.assert_allclose(np.var(np.asarray(trace)), 2 * float(jnp.sum(sigma**4)) / (k - 1), rtol=0.15)


def test_inner_product_statistic_is_consistent():
    g = jax.random.normal(jax.random.key(6), (8, 3)) + 1.0
    stats = grad_stats(linear_loss, jnp.zeros(3), g, method="microbatch", num_microbatches=4, inner_sq_sum=True)
    means = np.asarray(g, np.float64).reshape(4, 2, 3).mean(1)
    a = means @ means.mean(0)
    np.testing.assert_allclose(inner_product_variance(stats), 2 * a.var(ddof=1), rtol=1e-5)


def test_one_group_is_an_error():
    g = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="num_microbatches.*one group"):
        grad_stats(linear_loss, jnp.zeros(3), g, method="microbatch", num_microbatches=1)
    with pytest.raises(ValueError, match="one group"):
        from_group_means({"w": jnp.ones((1, 3))}, jnp.array([4]))
    with pytest.raises(ValueError, match="one group"):
        jax.vmap(lambda m: device_grad_stats(m, 4, "devices"), axis_name="devices")(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="one group"):  # default k = min(8, b) with b = 1
        grad_stats(linear_loss, jnp.zeros(3), jnp.ones((1, 3)), method="microbatch")
    with pytest.raises(ValueError, match="num_microbatches must be at most"):
        grad_stats(linear_loss, jnp.zeros(3), g, method="microbatch", num_microbatches=5)


def test_empty_groups_give_nan_not_zero():
    stats = from_group_means({"w": jnp.ones((3, 2))}, jnp.array([4.0, 0.0, 0.0]))
    assert np.isnan(float(trace_covariance(stats)))
