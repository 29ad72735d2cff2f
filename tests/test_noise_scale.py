"""Gradient-noise-scale estimators, tracker and batch-size rule against known truths and NumPy transcriptions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch.rules import NoiseScaleRuleState, next_batch_size, noise_scale_rule
from adabatch.stats import (
    GradStats,
    adam_preconditioner,
    clamp_noise_scale,
    estimate_from_stats,
    from_per_example,
    noise_scale,
    precondition,
    two_batch_estimate,
)

D = 6
TRIALS = 20_000
SIGMAS = 4.5  # Monte Carlo tolerance: |mean estimate - truth| <= 4.5 standard errors (two-sided p ~ 7e-6)


def gaussian_problem(seed=0):
    """True gradient G and per-example covariance Σ (full, anisotropic) of a synthetic problem."""
    rng = np.random.default_rng(seed)
    grad = rng.normal(size=D) * 0.5
    a = rng.normal(size=(D, D)) * 0.7
    return rng, grad, a @ a.T


def draw(rng, grad, cov, shape):
    chol = np.linalg.cholesky(cov)
    return grad + rng.normal(size=shape + (D,)) @ chol.T


def assert_unbiased(samples, truth, what):
    samples = np.asarray(samples, np.float64)
    se = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - truth) <= SIGMAS * se, f"{what}: mean {samples.mean():.5f} vs {truth:.5f} (se {se:.2g})"
    return se


def test_per_example_estimates_are_unbiased():
    rng, grad, cov = gaussian_problem()
    b = 4
    g = draw(rng, grad, cov, (TRIALS, b))
    stats = jax.vmap(lambda x: from_per_example({"w": x}))(jnp.asarray(g, jnp.float32))
    est = jax.vmap(estimate_from_stats)(stats)
    assert_unbiased(est.trace_cov, np.trace(cov), "trΣ̂")
    se = assert_unbiased(est.grad_sq_norm, grad @ grad, "unbiased ‖G‖²")
    # The test has power: the naive ‖ḡ‖² is off by trΣ/b, far outside the tolerance.
    naive = np.asarray(jax.vmap(lambda s: jnp.sum(s.mean["w"] ** 2))(stats))
    assert abs(naive.mean() - grad @ grad) > 10 * se


def test_two_batch_estimator_is_unbiased():
    rng, grad, cov = gaussian_problem(1)
    small, big = 2, 8
    g = draw(rng, grad, cov, (TRIALS, big))
    big_sq = np.sum(g.mean(1) ** 2, -1)
    small_sq = np.mean(np.sum(g.reshape(TRIALS, big // small, small, D).mean(2) ** 2, -1), 1)  # 4 "devices"
    est = two_batch_estimate(jnp.asarray(small_sq), jnp.asarray(big_sq), small, big)
    assert_unbiased(est.trace_cov, np.trace(cov), "two-batch trΣ")
    assert_unbiased(est.grad_sq_norm, grad @ grad, "two-batch ‖G‖²")


def test_two_batch_with_single_examples_equals_per_example_estimates():
    g = np.random.default_rng(2).normal(0.3, 1.0, size=(9, D))
    stats = from_per_example({"w": jnp.asarray(g)})
    per_example = estimate_from_stats(stats)
    two = two_batch_estimate(stats.sq_norm_sum / 9, jnp.sum(stats.mean["w"] ** 2), 1, 9)
    np.testing.assert_allclose(float(two.trace_cov), float(per_example.trace_cov), rtol=1e-5)
    np.testing.assert_allclose(float(two.grad_sq_norm), float(per_example.grad_sq_norm), rtol=1e-5)
    # and against NumPy directly
    np.testing.assert_allclose(float(per_example.trace_cov), np.sum(np.var(g, axis=0, ddof=1)), rtol=1e-5)


def test_precondition_equals_brute_force():
    rng = np.random.default_rng(3)
    g = {"a": rng.normal(size=(5, 3, 2)), "b": rng.normal(size=(5, 4))}
    p = {"a": rng.uniform(0.1, 3.0, size=(3, 2)), "b": rng.uniform(0.1, 3.0, size=(4,))}
    stats = from_per_example(jax.tree_util.tree_map(jnp.asarray, g), sq_sum=True)
    got = precondition(stats, jax.tree_util.tree_map(jnp.asarray, p))
    want = from_per_example({k: jnp.asarray(g[k] * p[k]) for k in g}, sq_sum=True)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5)
    with pytest.raises(ValueError, match="sq_sum"):
        precondition(from_per_example({"a": jnp.ones((2, 3))}), {"a": jnp.ones(3)})


def numpy_tracker(batches, decay, adam=False, b2=0.999, eps=1e-8, after=0):
    """B_simple with separately smoothed, bias-corrected numerator and denominator (optionally Adam-preconditioned)."""
    m_t = m_g = u = 0.0
    nu = np.zeros(batches[0].shape[1])
    k = 0
    out = []
    for g in batches:
        raw_mean = g.mean(0)
        if adam:
            p = 1 / (np.sqrt(nu / (1 - b2**k)) + eps) if k > 0 else np.ones_like(nu)
            if k < after:
                p = np.ones_like(nu)
            g = g * p
        b = g.shape[0]
        mean = g.mean(0)
        trace = ((g - mean) ** 2).sum() / (b - 1)
        g2 = mean @ mean - trace / b
        m_t, m_g, u = decay * m_t + (1 - decay) * trace, decay * m_g + (1 - decay) * g2, decay * u + 1 - decay
        nu = b2 * nu + (1 - b2) * raw_mean**2
        k += 1
        out.append((m_t / u, m_g / u, m_t / m_g, trace / g2))
    return out


@pytest.mark.parametrize("entry", ["per_example", "grad_stats"])
def test_tracker_matches_numpy(entry):
    rng = np.random.default_rng(4)
    batches = [rng.normal(0.8, 1.0, size=(n, D)) for n in (8, 16, 5, 32, 12, 64)]
    tx = noise_scale(decay=0.8, per_example=entry == "per_example")
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(D))
    for g, (trace, g2, bs, step) in zip(batches, numpy_tracker(batches, 0.8), strict=True):
        gj = jnp.asarray(g, jnp.float32)
        if entry == "per_example":
            mean, state = update(gj, state)
        else:
            stats = from_per_example(gj)
            mean, state = update(stats.mean, state, None, grad_stats=stats)
        np.testing.assert_allclose(np.asarray(mean), g.mean(0), rtol=1e-5)
        np.testing.assert_allclose(float(state.trace_cov), trace, rtol=1e-5)
        np.testing.assert_allclose(float(state.grad_sq_norm), g2, rtol=1e-5)
        np.testing.assert_allclose(float(state.b_simple), bs, rtol=1e-4)
        np.testing.assert_allclose(float(state.b_simple_step), step, rtol=1e-4)
        assert not bool(state.clamped)
    assert int(state.count) == int(state.num_estimates) == len(batches)


def test_adam_preconditioned_tracker_matches_numpy():
    rng = np.random.default_rng(5)
    scales = np.array([0.1, 0.3, 1.0, 3.0, 10.0, 30.0])  # very different coordinate scales
    batches = [rng.normal(0.5, 1.0, size=(n, D)) * scales for n in (16, 8, 32, 16, 24, 16, 40)]
    tx = noise_scale(decay=0.7, preconditioner="adam", b2=0.9, eps=1e-3, precondition_after=2)
    state = tx.init(jnp.zeros(D))
    update = jax.jit(tx.update)
    want = numpy_tracker(batches, 0.7, adam=True, b2=0.9, eps=1e-3, after=2)
    for g, (trace, g2, bs, _) in zip(batches, want, strict=True):
        stats = from_per_example(jnp.asarray(g, jnp.float32), sq_sum=True)
        _, state = update(stats.mean, state, None, grad_stats=stats)
        np.testing.assert_allclose(float(state.trace_cov), trace, rtol=1e-4)
        np.testing.assert_allclose(float(state.grad_sq_norm), g2, rtol=1e-4)
        np.testing.assert_allclose(float(state.b_simple), bs, rtol=1e-4)
    # The preconditioner is Adam's own: 1/(sqrt(v_hat) + eps).
    np.testing.assert_allclose(
        np.asarray(adam_preconditioner(state.nu, state.num_estimates, b2=0.9, eps=1e-3)),
        1 / (np.sqrt(sum(0.1 * 0.9 ** (6 - i) * b.mean(0) ** 2 for i, b in enumerate(batches)) / (1 - 0.9**7)) + 1e-3),
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="sq_sum"):
        plain = from_per_example(jnp.ones((4, D)))
        tx.update(plain.mean, state, None, grad_stats=plain)


def test_clamping_and_flags_never_nan():
    # Zero-mean noise: the unbiased ‖G‖² is negative -> B_simple clamped at the upper bound and flagged.
    noise = np.random.default_rng(6).normal(size=(16, D))
    noise -= noise.mean(0) - 1e-3
    tx = noise_scale(decay=0.0, max_noise_scale=1e6, per_example=True)
    _, state = tx.update(jnp.asarray(noise, jnp.float32), tx.init(jnp.zeros(D)))
    assert float(state.grad_sq_norm) < 0
    assert float(state.b_simple) == 1e6 and bool(state.clamped) and int(state.clamped_count) == 1
    # A noisy difference can make the two-batch trace negative: clamped at the lower bound and flagged.
    est = two_batch_estimate(1.0, 1.5, 2, 8)
    assert float(est.trace_cov) < 0
    value, flag = clamp_noise_scale(est.trace_cov, est.grad_sq_norm, min_noise_scale=0.5)
    assert float(value) == 0.5 and bool(flag)
    for trace, g2 in ((jnp.nan, 1.0), (1.0, jnp.nan), (jnp.inf, 1.0), (1.0, 0.0), (-jnp.inf, -1.0)):
        value, flag = clamp_noise_scale(trace, g2)
        assert np.isfinite(float(value)) and bool(flag)
    # NaN gradients and single-example batches are skipped and counted; the state stays finite.
    state = tx.init(jnp.zeros(2))
    good = from_per_example(jnp.array([[1.0, 2.0], [2.0, 1.5], [1.5, 2.5]]))
    _, state = tx.update(good.mean, state, None, grad_stats=good)
    before = float(state.b_simple)
    single = GradStats(count=jnp.int32(1), mean=jnp.array([1.0, 1.0]), sq_norm_sum=jnp.float32(2.0))
    nan = from_per_example(jnp.array([[jnp.nan, 1.0], [0.0, 1.0]]))
    for stats in (single, nan):
        _, state = tx.update(stats.mean, state, None, grad_stats=stats)
    assert int(state.nonfinite_count) == 2 and int(state.num_estimates) == 1
    assert float(state.b_simple) == before
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


def stats_with(b_simple, n=32, g2=1.0):
    """GradStats of n examples whose unbiased trΣ̂ / ‖G‖² estimate is exactly b_simple (‖G‖² estimate = g2)."""
    trace = b_simple * g2
    mean_sq = g2 + trace / n
    q = (n - 1) * trace + n * mean_sq
    return GradStats(count=jnp.int32(n), mean=jnp.array([np.sqrt(mean_sq), 0.0]), sq_norm_sum=jnp.float32(q))


def numpy_rule(targets, counts, *, init, cap, gran, rho, monotone, interval):
    b, out = init, []
    for t, (target, n) in enumerate(zip(targets, counts, strict=True)):
        prop = int(np.ceil(min(target, cap)))
        if monotone:
            prop = max(prop, b, n)
        prop = min(-(-max(prop, 1) // gran) * gran, cap)
        if t % interval == 0 and prop != b and (abs(prop - b) > rho * b or (prop == cap and target >= cap)):
            b = prop
        out.append(b)
    return out


@pytest.mark.parametrize("monotone", [True, False])
@pytest.mark.parametrize("interval", [1, 2])
def test_rule_hysteresis_matches_numpy(monotone, interval):
    targets = [50.0, 53.0, 80.0, 70.0, 75.0, 40.0, 300.0, 310.0, 980.0, 5000.0, 20.0]
    counts = [32] * len(targets)
    kw = dict(init=32, cap=1024, gran=8, rho=0.1, monotone=monotone, interval=interval)
    want = numpy_rule(targets, counts, **kw)
    tx = noise_scale_rule(
        decay=0.0,
        min_relative_change=0.1,
        monotone=monotone,
        init_batch_size=32,
        max_batch_size=1024,
        granularity=8,
        test_interval=interval,
    )
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    got = []
    for target, n in zip(targets, counts, strict=True):
        stats = stats_with(target, n)
        _, state = update(stats.mean, state, None, grad_stats=stats)
        np.testing.assert_allclose(float(state.noise.b_simple), target, rtol=1e-4)
        got.append(int(next_batch_size(state)))
    assert got == want
    assert int(state.change_count) == sum(a != b for a, b in zip([32] + want[:-1], want, strict=True))
    assert (np.diff(want) >= 0).all() or not monotone


def test_rule_holds_on_flagged_estimate_and_composes():
    tx = optax.chain(noise_scale_rule(decay=0.0, init_batch_size=16, max_batch_size=512), optax.sgd(0.1))
    params = jnp.zeros(2)
    state = tx.init(params)
    noise = np.random.default_rng(7).normal(size=(16, 2))
    noise -= noise.mean(0)
    stats = from_per_example(jnp.asarray(noise, jnp.float32))
    _, state = tx.update(stats.mean, state, params, grad_stats=stats)
    assert bool(state[0].noise.clamped) and int(next_batch_size(state)) == 16
    stats = stats_with(100.0, 16)
    _, state = tx.update(stats.mean, state, params, grad_stats=stats)
    assert int(next_batch_size(state)) == 100 and isinstance(state[0], NoiseScaleRuleState)
    # inject_hyperparams: the multiplier is a traced hyperparameter.
    injected = optax.inject_hyperparams(noise_scale_rule)(multiplier=2.0, decay=0.0, max_batch_size=4096)
    st_ = injected.init(params)
    _, st_ = jax.jit(injected.update)(stats.mean, st_, params, grad_stats=stats)
    assert int(next_batch_size(st_)) == 200


def test_bad_arguments():
    with pytest.raises(ValueError, match="preconditioner must be one of 'none', 'adam'; got 'lamb'"):
        noise_scale(preconditioner="lamb")
    with pytest.raises(ValueError, match="decay"):
        noise_scale(decay=1.0)
    with pytest.raises(ValueError, match="precondition_after"):
        noise_scale(precondition_after=-1)
    with pytest.raises(ValueError, match="min_noise_scale"):
        noise_scale(min_noise_scale=10.0, max_noise_scale=1.0)
    with pytest.raises(ValueError, match="big_batch_size must exceed small_batch_size"):
        two_batch_estimate(1.0, 0.5, 8, 8)
    with pytest.raises(ValueError, match="max_batch_size"):
        noise_scale_rule(init_batch_size=64, max_batch_size=32)
    with pytest.raises(ValueError, match="granularity"):
        noise_scale_rule(max_batch_size=100, granularity=8)
    with pytest.raises(ValueError, match="multiplier"):
        noise_scale_rule(multiplier=0.0)
    with pytest.raises(ValueError, match="at least 2 examples"):
        tx = noise_scale(per_example=True)
        tx.update(jnp.ones((1, 3)), tx.init(jnp.zeros(3)))
