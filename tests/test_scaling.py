"""Learning-rate-vs-batch-size rules and AdaScale against NumPy transcriptions of the papers' formulas."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch.scaling import (
    ScaleByAdaScaleState,
    ScaleByBatchSizeState,
    adascale,
    batch_size_factor,
    scale_by_batch_size,
    scale_by_sample_schedule,
)
from adabatch.stats import GradStats, from_per_example, noise_scale

BATCH_SIZES = (1, 2, 3, 7, 16, 32, 100, 257, 1024, 4096, 65536)
BASES = (1, 32, 100)
NOISE_SCALES = (0.5, 10.0, 300.0, 1e5)


@contextlib.contextmanager
def x64_enabled():
    with jax.enable_x64(True):
        yield


def hand_factor(rule: str, b: float, b0: float, bn: float | None = None) -> float:
    """The rules written out by hand in float64 (Li et al.'s surge law in its paper form)."""
    if rule == "linear":
        return b / b0
    if rule == "sqrt":
        return np.sqrt(b / b0)

    def eps_opt(x):  # eps_max = 1
        return 1.0 / (0.5 * (np.sqrt(bn / x) + np.sqrt(x / bn)))

    return eps_opt(b) / eps_opt(b0)


def apply_once(tx, b, params=None, **extra):
    params = {"w": jnp.ones(3), "b": jnp.ones(())} if params is None else params
    updates = jax.tree_util.tree_map(jnp.ones_like, params)
    out, state = tx.update(updates, tx.init(params), params, batch_size=b, **extra)
    return out, state


@pytest.mark.parametrize("rule", ["linear", "sqrt", "surge"])
def test_factor_table_matches_hand_formulas(rule):
    noise_scales = NOISE_SCALES if rule == "surge" else (None,)
    for b0 in BASES:
        for bn in noise_scales:
            tx = jax.jit(scale_by_batch_size(rule, b0, noise_scale=bn).update)
            state = scale_by_batch_size(rule, b0, noise_scale=bn).init(jnp.zeros(2))
            for b in BATCH_SIZES:
                want = hand_factor(rule, b, b0, bn)
                out, new = tx(jnp.full(2, 3.0), state, None, batch_size=jnp.int32(b))
                np.testing.assert_allclose(float(new.factor), want, rtol=2e-6, err_msg=f"{rule} B={b} B0={b0} Bn={bn}")
                np.testing.assert_allclose(np.asarray(out), 3.0 * want, rtol=2e-6)
                np.testing.assert_allclose(float(batch_size_factor(rule, b, b0, bn)), want, rtol=2e-6)


def test_surge_shape():
    # Rises like sqrt well below B_noise, peaks at B_noise, falls like 1/sqrt beyond.
    bn, b0 = 1000.0, 10
    f = [float(batch_size_factor("surge", b, b0, bn)) for b in (10, 40, 1000, 25000)]
    assert f[1] == pytest.approx(2.0, rel=0.05) and f[2] == max(f) and f[3] < f[2]
    np.testing.assert_allclose(f[2], hand_factor("surge", 1000, b0, bn), rtol=1e-6)
    # Huge B_noise: the square-root rule.
    np.testing.assert_allclose(float(batch_size_factor("surge", 400, 4, 1e12)), 10.0, rtol=1e-4)


def test_max_factor_caps_every_rule():
    for rule, bn in (("linear", None), ("sqrt", None), ("surge", 1e6)):
        _, state = apply_once(scale_by_batch_size(rule, 2, noise_scale=bn, max_factor=3.0), 512)
        assert float(state.factor) == pytest.approx(3.0)
        _, state = apply_once(scale_by_batch_size(rule, 2, noise_scale=bn, max_factor=3.0), 4)
        assert float(state.factor) == pytest.approx(hand_factor(rule, 4, 2, bn), rel=1e-6)


def test_chain_after_adam_keeps_sign_and_scales():
    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    grads = {"w": jnp.array([0.3, -0.2, 0.1])}
    adam = optax.adam(1e-2)
    tx = optax.chain(optax.adam(1e-2), scale_by_batch_size("sqrt", 16))
    ref, _ = adam.update(grads, adam.init(params), params)
    out, state = tx.update(grads, tx.init(params), params, batch_size=64)
    np.testing.assert_allclose(np.asarray(out["w"]), 2.0 * np.asarray(ref["w"]), rtol=1e-6)
    assert isinstance(state[1], ScaleByBatchSizeState)


def test_inject_hyperparams_and_jit_no_retrace():
    traces = []
    factory = optax.inject_hyperparams(scale_by_batch_size)
    tx = factory(rule="surge", base_batch_size=32, noise_scale=128.0)
    params = jnp.zeros(2)
    state = tx.init(params)

    @jax.jit
    def step(state, b):
        traces.append(1)
        return tx.update(jnp.ones(2), state, params, batch_size=b)

    for b in (32, 64, 128, 1000):
        out, new = step(state, jnp.int32(b))
        np.testing.assert_allclose(np.asarray(out), hand_factor("surge", b, 32, 128.0), rtol=2e-6)
    assert len(traces) == 1
    state.hyperparams["noise_scale"] = jnp.asarray(1000.0, jnp.float32)
    state.hyperparams["base_batch_size"] = jnp.asarray(16)
    out, _ = step(state, jnp.int32(64))
    np.testing.assert_allclose(np.asarray(out), hand_factor("surge", 64, 16, 1000.0), rtol=2e-6)
    assert len(traces) == 1


def numpy_stats(g):
    """(b, trΣ̂, ‖ḡ‖²) of per-example gradients g (b, d) in float64."""
    b = g.shape[0]
    mean = g.mean(0)
    trace = ((g - mean) ** 2).sum() / (b - 1)
    return b, trace, float(mean @ mean)


def test_surge_online_matches_numpy_ema():
    rng = np.random.default_rng(0)
    decay, b0 = 0.5, 8
    tx = jax.jit(scale_by_batch_size("surge", b0, noise_scale=noise_scale(decay=decay)).update)
    params = jnp.zeros(4)
    state = scale_by_batch_size("surge", b0).init(params)
    m = u = v = 0.0
    for size in (6, 12, 9, 30, 5):
        g = rng.normal(1.0, 1.0, size=(size, 4))
        b, trace, g2 = numpy_stats(g)
        m, v, u = decay * m + (1 - decay) * trace, decay * v + (1 - decay) * (g2 - trace / b), decay * u + 1 - decay
        bn = (m / u) / (v / u)
        stats = from_per_example(jnp.asarray(g, jnp.float32))
        out, state = tx(stats.mean, state, params, batch_size=jnp.int32(b), grad_stats=stats)
        np.testing.assert_allclose(float(state.noise.b_simple), bn, rtol=1e-4)
        np.testing.assert_allclose(float(state.factor), hand_factor("surge", b, b0, bn), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(out), np.asarray(stats.mean) * hand_factor("surge", b, b0, bn), rtol=1e-4)


def numpy_adascale(batches, b0, form, smoothing, min_variance=1e-6, schedule=None):
    """AdaScale (Johnson et al.) with per-example statistics, Pollux's EMA and clamp-on-read, in float64."""
    var_b = sqr_b = norm = 0.0
    tau = 0.0
    gains, taus, factors = [], [], []
    for g in batches:
        b, trace, g2 = numpy_stats(g)
        s = b / b0
        theta = smoothing**s
        var_b = theta * var_b + (1 - theta) * trace  # σ₁² = trΣ̂
        sqr_b = theta * sqr_b + (1 - theta) * (g2 - trace / b)  # μ̂² = ‖ḡ‖² − trΣ̂/b
        norm = theta * norm + (1 - theta)
        sigma2 = max(var_b / norm / b0, min_variance)
        mu2 = max(sqr_b / norm, 0.0)
        r = (sigma2 + mu2) / (sigma2 / s + mu2)
        f = r if form == "sgd" else np.sqrt(r)
        if schedule is not None:
            f *= schedule(np.floor(tau))
        tau += r
        gains.append(r)
        taus.append(tau)
        factors.append(f)
    return gains, taus, factors


@pytest.mark.parametrize("form", ["sgd", "adam"])
@pytest.mark.parametrize("x64", [False, True])
def test_adascale_matches_numpy(form, x64):
    rng = np.random.default_rng(1)
    sizes = (16, 16, 64, 8, 128, 32, 256)
    batches = [rng.normal(rng.normal(size=5) * 0.3, 1.0, size=(n, 5)) for n in sizes]
    schedule = lambda t: 1.0 / (1.0 + 0.1 * t)  # noqa: E731
    want_gain, want_tau, want_factor = numpy_adascale(batches, 16, form, smoothing=0.9, schedule=schedule)
    ctx = x64_enabled() if x64 else contextlib.nullcontext()
    with ctx:
        dtype = jnp.float64 if x64 else jnp.float32
        params = jnp.zeros(5, dtype)
        tx = adascale(16, form=form, smoothing=0.9, schedule=schedule)
        state = tx.init(params)
        update = jax.jit(tx.update)
        rtol = 1e-10 if x64 else 2e-5
        for g, r, tau, f in zip(batches, want_gain, want_tau, want_factor, strict=True):
            stats = from_per_example(jnp.asarray(g, dtype))
            out, state = update(jnp.ones(5, dtype), state, params, grad_stats=stats)
            assert state.progress.dtype == dtype
            np.testing.assert_allclose(float(state.gain), r, rtol=rtol)
            np.testing.assert_allclose(float(state.progress), tau, rtol=rtol)
            np.testing.assert_allclose(np.asarray(out), f, rtol=rtol)
    assert want_gain[-1] > 1.0 and want_gain[4] <= 128 / 16  # 1 <= r <= S


def test_adascale_gain_limits():
    # No noise (identical examples): r = 1. Pure noise (zero mean gradient): r = S = b / B0.
    g = jnp.tile(jnp.array([[1.0, -2.0]]), (64, 1))
    _, state = adascale(4).update(jnp.ones(2), adascale(4).init(jnp.zeros(2)), grad_stats=from_per_example(g))
    assert float(state.gain) == pytest.approx(1.0, rel=1e-5)
    noise = np.random.default_rng(0).normal(size=(64, 3))
    noise -= noise.mean(0)
    _, state = adascale(4).update(
        jnp.ones(3), adascale(4).init(jnp.zeros(3)), grad_stats=from_per_example(jnp.asarray(noise, jnp.float32))
    )
    assert float(state.gain) == pytest.approx(16.0, rel=1e-5)


def test_adascale_skips_nonfinite_and_single_example():
    tx = adascale(2)
    state = tx.init(jnp.zeros(2))
    one = GradStats(count=jnp.int32(1), mean=jnp.array([1.0, 2.0]), sq_norm_sum=jnp.float32(5.0))
    out, state = tx.update(jnp.ones(2), state, grad_stats=one)
    assert float(state.gain) == 1.0 and int(state.nonfinite_count) == 1 and np.isfinite(np.asarray(out)).all()
    bad = from_per_example(jnp.array([[jnp.nan, 1.0], [0.0, 1.0]]))
    out, state = tx.update(jnp.ones(2), state, grad_stats=bad)
    assert int(state.nonfinite_count) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))


def test_adascale_in_chain_with_inject_hyperparams():
    tx = optax.chain(
        optax.sgd(0.1),
        optax.inject_hyperparams(adascale, static_args=("form", "schedule"))(base_batch_size=4, smoothing=0.5),
    )
    params = jnp.zeros(3)
    g = jnp.asarray(np.random.default_rng(2).normal(0.5, 1.0, size=(16, 3)), jnp.float32)
    stats = from_per_example(g)
    out, state = jax.jit(tx.update)(stats.mean, tx.init(params), params, grad_stats=stats, batch_size=16)
    inner = state[1].inner_state
    assert isinstance(inner, ScaleByAdaScaleState)
    np.testing.assert_allclose(np.asarray(out), -0.1 * float(inner.gain) * np.asarray(stats.mean), rtol=1e-5)
    want = numpy_adascale([np.asarray(g, np.float64)], 4, "sgd", smoothing=0.5)[0][0]
    np.testing.assert_allclose(float(inner.gain), want, rtol=1e-4)


def test_sample_schedule_keyed_on_examples_seen():
    schedule = optax.linear_schedule(1.0, 0.1, transition_steps=1000)
    tx = optax.chain(optax.sgd(1.0), scale_by_sample_schedule(schedule))
    params = jnp.zeros(1)
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = 0
    for b in (100, 50, 400, 300, 500):
        out, state = update(jnp.ones(1), state, params, batch_size=jnp.int32(b))
        want = 1.0 - 0.9 * min(seen, 1000) / 1000
        np.testing.assert_allclose(float(out[0]), -want, rtol=1e-6)
        seen += b
    assert float(state[1].samples) == seen and int(state[1].count) == 5


@pytest.mark.parametrize(
    "bad, match",
    [
        (None, "batch_size"),
        (32.0, "batch_size must be an integer"),
        (jnp.float32(32), "batch_size must be an integer"),
        (True, "batch_size must be an integer"),
        (0, "batch_size must be >= 1"),
        (-4, "batch_size must be >= 1"),
        (jnp.array([4, 8]), "batch_size must be a scalar"),
    ],
)
def test_bad_batch_size(bad, match):
    extra = {} if bad is None else {"batch_size": bad}
    for tx in (scale_by_batch_size("linear", 8), scale_by_sample_schedule(lambda n: 1.0)):
        with pytest.raises(ValueError, match=match):
            tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), **extra)


def test_bad_batch_size_under_jit():
    tx = scale_by_batch_size("linear", 8)
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        jax.jit(tx.update)(jnp.ones(2), state, None, batch_size=jnp.float32(8))
    # A traced non-positive value cannot raise: the previous factor is kept and the event counted.
    update = jax.jit(tx.update)
    _, state = update(jnp.ones(2), state, None, batch_size=jnp.int32(16))
    out, state = update(jnp.ones(2), state, None, batch_size=jnp.int32(-3))
    assert float(state.factor) == 2.0 and int(state.invalid_count) == 1
    np.testing.assert_allclose(np.asarray(out), 2.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rule must be one of 'linear', 'sqrt', 'surge'; got 'cubic'"):
        scale_by_batch_size("cubic", 8)
    with pytest.raises(ValueError, match="base_batch_size"):
        scale_by_batch_size("linear", 0)
    with pytest.raises(ValueError, match="base_batch_size"):
        adascale(2.5)
    with pytest.raises(ValueError, match="noise_scale"):
        scale_by_batch_size("surge", 8, noise_scale=-1.0)
    with pytest.raises(ValueError, match="only used by rule='surge'"):
        scale_by_batch_size("sqrt", 8, noise_scale=10.0)
    with pytest.raises(ValueError, match="max_factor"):
        scale_by_batch_size("sqrt", 8, max_factor=0.0)
    with pytest.raises(ValueError, match="form must be one of 'sgd', 'adam'"):
        adascale(8, form="lamb")
    with pytest.raises(ValueError, match="smoothing"):
        adascale(8, smoothing=1.0)
    with pytest.raises(ValueError, match="grad_stats"):
        tx = scale_by_batch_size("surge", 8)
        tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), batch_size=8)
    with pytest.raises(ValueError, match="grad_stats"):
        tx = adascale(8)
        tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    with pytest.raises(ValueError, match="schedule"):
        scale_by_sample_schedule(3.0)
