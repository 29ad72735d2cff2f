"""The SLQ learning-rate/momentum learner against a NumPy transcription of its equations, and inside the training
step against the exact eigenvalues of the batch Hessian."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch.curvature import (
    CurvatureRequest,
    Spectrum,
    curvature_due,
    curvature_hyperparams,
    declared_curvature,
    scale_by_slq_learner,
    slq_learner,
)
from adabatch.training import init_train_state, make_train_step


def reference_hyperparams(lam_max, lam_min, rule, safety, max_condition, max_momentum):
    """Polyak's heavy-ball map (or the 2/L stability bound) with λ_min clipped to [L/κ_max, L], in plain Python."""
    mu = min(max(lam_min, lam_max / max_condition), lam_max)
    root = math.sqrt(lam_max / mu)
    rho = min(((root - 1) / (root + 1)) ** 2, max_momentum)
    if rule == "heavy_ball":
        alpha = safety * min(4 / (math.sqrt(lam_max) + math.sqrt(mu)) ** 2, 2 * (1 + rho) / lam_max)
    else:
        alpha = safety * 2 / lam_max
    return alpha, rho


CASES = [(9.0, 1.0), (4.0, 4.0), (2.5, -3.0), (1.0, 0.0), (1e3, 1e-6), (50.0, 49.0)]


@pytest.mark.parametrize("rule", ["heavy_ball", "stability"])
@pytest.mark.parametrize("max_momentum", [0.9, 0.3])
def test_hyperparameter_map_equals_the_formulas(rule, max_momentum):
    with jax.enable_x64(True):
        for lam_max, lam_min in CASES:
            alpha, rho = curvature_hyperparams(
                jnp.float64(lam_max),
                jnp.float64(lam_min),
                rule=rule,
                safety=0.7,
                max_condition=100.0,
                max_momentum=max_momentum,
            )
            expected = reference_hyperparams(lam_max, lam_min, rule, 0.7, 100.0, max_momentum)
            assert (float(alpha), float(rho)) == pytest.approx(expected, rel=1e-12), (lam_max, lam_min)


def test_heavy_ball_step_stays_inside_the_stability_region():
    """With the momentum capped below Polyak's optimum, α L < 2(1+ρ) still holds (the min in the map)."""
    for lam_max, lam_min in CASES:
        alpha, rho = curvature_hyperparams(lam_max, lam_min, safety=1.0, max_momentum=0.2)
        assert float(alpha) * lam_max <= 2 * (1 + float(rho)) * (1 + 1e-6)


def test_hyperparameter_map_of_a_non_positive_lambda_max_is_zero_not_nan():
    alpha, rho = curvature_hyperparams(jnp.float32(0.0), jnp.float32(-1.0))
    assert float(alpha) == 0.0 and np.isfinite(float(rho))


def spectra_sequence(n, d, rng):
    """Spectra with changing extremal values; some refused (λ_max NaN, 0 or negative; λ_min inf)."""
    base = np.sort(rng.uniform(0.5, 5.0, d))
    out = []
    for t in range(n):
        nodes = base * (1 + 0.3 * math.sin(0.7 * t)) - 0.8 * math.cos(0.3 * t)
        if t % 11 == 5:
            nodes = np.full(d, np.nan)
        elif t % 13 == 7:
            nodes = -np.abs(nodes)
        elif t % 17 == 3:
            nodes = np.concatenate([[-np.inf], nodes[1:]])
        out.append(np.sort(nodes))
    return out


def reference_run(grads, spectra, hp):
    """NumPy transcription of scale_by_slq_learner's update (the docstring's equations)."""
    beta, interval = hp["smoothing"], hp["interval"]
    alpha, rho = hp["init_learning_rate"], hp["init_momentum"]
    ema_max = ema_min = 0.0
    estimates = rejected = 0
    v = np.zeros_like(grads[0])
    outs, alphas, rhos = [], [], []
    for t, (g, nodes) in enumerate(zip(grads, spectra, strict=True)):
        if t % interval == 0:
            big, low = float(np.max(nodes)), float(np.min(nodes))
            if np.isfinite(big) and np.isfinite(low) and big > 0:
                mu = min(max(low, big / hp["max_condition"]), big)
                ema_max = beta * ema_max + (1 - beta) * big
                ema_min = beta * ema_min + (1 - beta) * mu
                estimates += 1
                debias = 1 - beta**estimates
                alpha, rho = reference_hyperparams(
                    ema_max / debias, ema_min / debias, hp["rule"], hp["safety"], hp["max_condition"], 0.95
                )
            else:
                rejected += 1
        v = rho * v + g
        outs.append(alpha * v)
        alphas.append(alpha)
        rhos.append(rho)
    return np.array(outs), np.array(alphas), np.array(rhos), estimates, rejected


@pytest.mark.parametrize(("dtype", "rtol"), [("float64", 1e-10), ("float32", 2e-4)])
@pytest.mark.parametrize("rule", ["heavy_ball", "stability"])
def test_learner_equals_the_numpy_reference_over_120_steps(dtype, rtol, rule):
    n, d = 120, 6
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=d) for _ in range(n)]
    spectra = spectra_sequence(n, d, rng)
    hp = dict(
        interval=3,
        smoothing=0.8,
        rule=rule,
        safety=0.6,
        max_condition=50.0,
        init_learning_rate=0.01,
        init_momentum=0.5,
    )
    expected, alphas, rhos, estimates, rejected = reference_run(grads, spectra, hp)
    with jax.enable_x64(dtype == "float64"):
        tx = scale_by_slq_learner(num_steps=d, max_momentum=0.95, **hp)
        params = jnp.zeros(d, dtype)
        state = tx.init(params)

        @jax.jit
        def step(state, g, nodes):
            spectrum = Spectrum(nodes[None, :], jnp.full((1, d), 1 / d, dtype), jnp.asarray(d, jnp.int32))
            return tx.update(g, state, params, curvature=spectrum)

        outs = []
        for t in range(n):
            assert bool(state.due) == (t % 3 == 0)
            out, state = step(state, jnp.asarray(grads[t], dtype), jnp.asarray(spectra[t], dtype))
            outs.append(np.asarray(out, np.float64))
            assert float(state.learning_rate) == pytest.approx(alphas[t], rel=rtol)
            assert float(state.momentum) == pytest.approx(rhos[t], rel=rtol, abs=1e-7)
    np.testing.assert_allclose(np.array(outs), expected, rtol=rtol * 10, atol=rtol * 1e-2)
    assert (int(state.estimates), int(state.rejected)) == (estimates, rejected)
    assert rejected >= 3 and estimates >= 30  # the sequence exercises both paths


def test_without_a_spectrum_the_learner_is_heavy_ball_with_its_initial_values():
    tx = scale_by_slq_learner(init_learning_rate=0.1, init_momentum=0.5)
    state = tx.init(jnp.zeros(2))
    g = jnp.array([1.0, -2.0])
    out1, state = tx.update(g, state)
    out2, state = tx.update(g, state)
    np.testing.assert_allclose(out1, 0.1 * g)
    np.testing.assert_allclose(out2, 0.1 * (0.5 * g + g))
    assert int(state.estimates) == 0 and int(state.rejected) == 0


def least_squares(b=16, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d)) * np.linspace(0.5, 2.0, d)
    y = x @ rng.normal(size=d)

    def loss(w, xy):
        return 0.5 * (xy[0] @ w - xy[1]) ** 2

    return loss, x, y


@pytest.mark.parametrize("micro_batch_size", [None, 8])
def test_training_step_feeds_the_batch_hessian_spectrum(micro_batch_size):
    """Least squares: H_B = XᵀX/b whatever θ. With m = d Lanczos steps the learner's λ_max, λ_min are the exact
    extremal eigenvalues of the first micro-batch's Hessian, and its α, ρ the map of those; spectra are computed on
    the due steps only (every 4th)."""
    with jax.enable_x64(True):
        loss, x, y = least_squares()
        tx = slq_learner(interval=4, num_steps=5, smoothing=0.0, safety=0.5)
        step = make_train_step(loss, tx, micro_batch_size=micro_batch_size)
        state = init_train_state(jnp.zeros(5), tx)
        rows = micro_batch_size or len(x)
        eig = np.linalg.eigvalsh(x[:rows].T @ x[:rows] / rows)
        alpha, rho = reference_hyperparams(eig[-1], eig[0], "heavy_ball", 0.5, 1e3, 0.9)
        for _ in range(9):
            state, metrics = step(state, (jnp.asarray(x), jnp.asarray(y)))
        assert float(metrics["lambda_max"]) == pytest.approx(eig[-1], rel=1e-8)
        assert float(metrics["lambda_min"]) == pytest.approx(eig[0], rel=1e-6)
        assert float(metrics["learning_rate"]) == pytest.approx(alpha, rel=1e-8)
        assert float(metrics["momentum"]) == pytest.approx(rho, rel=1e-8)
        learner = state.opt_state[0]
        assert int(learner.estimates) == 3 and int(metrics["curvature_rejected"]) == 0
        assert float(metrics["loss"]) < 0.05 * float(np.mean(0.5 * y**2))  # and it trains


def test_declaration_is_found_through_wrappers_and_survives_jit():
    inner = slq_learner(interval=7, num_steps=3)
    for tx in (inner, optax.chain(optax.clip(1.0), inner), optax.MultiSteps(inner, 2)):
        state = tx.init(jnp.zeros(3))
        assert declared_curvature(state) == CurvatureRequest(7, 3, 1, "hessian")
        state = jax.jit(lambda s: s)(state)
        assert declared_curvature(state) == CurvatureRequest(7, 3, 1, "hessian")
        assert bool(curvature_due(state))
    plain = optax.adam(0.1).init(jnp.zeros(3))
    assert declared_curvature(plain) is None and not bool(curvature_due(plain))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(interval=0), "interval"),
        (dict(num_steps=-1), "num_steps"),
        (dict(num_probes=0), "num_probes"),
        (dict(matrix="fisher"), "matrix"),
        (dict(rule="newton"), "rule"),
        (dict(safety=0.0), "safety"),
        (dict(max_condition=0.5), "max_condition"),
        (dict(max_momentum=1.0), "max_momentum"),
        (dict(smoothing=1.0), "smoothing"),
        (dict(init_learning_rate=-0.1), "init_learning_rate"),
        (dict(max_learning_rate=0.0), "max_learning_rate"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        slq_learner(**kwargs)


def test_a_curvature_that_is_not_a_spectrum_is_refused():
    tx = scale_by_slq_learner()
    with pytest.raises(ValueError, match="curvature must be"):
        tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), curvature=jnp.ones(3))


def test_max_learning_rate_caps_the_step():
    tx = scale_by_slq_learner(max_learning_rate=0.01, smoothing=0.0)
    state = tx.init(jnp.zeros(2))
    spectrum = Spectrum(jnp.array([[0.1, 0.2]]), jnp.array([[0.5, 0.5]]), jnp.asarray(2))
    _, state = tx.update(jnp.ones(2), state, curvature=spectrum)
    assert float(state.learning_rate) == pytest.approx(0.01)
