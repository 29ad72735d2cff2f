"""EXTRAP-SGD against a float64 NumPy transcription of the paper's step, in a hand-written two-gradient loop, through
the training step, ``fit`` and the command line; the refusal without the second gradient; bad hyperparameters."""

from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from adabatch.optimizers import (
    ScaleByExtrapSGDState,
    extrap_sgd,
    extrapolate,
    needs_extrapolated_grads,
    scale_by_extrap_sgd,
)
from adabatch.training import fit, init_train_state, make_train_step

pytestmark = pytest.mark.xdist_group("extrap_sgd")

STEPS = 120
SHAPES = {"w": (2, 3), "b": (4,)}


def lr_schedule(count):
    """A decreasing learning rate of the 0-based update count (NumPy for the reference, jnp when traced)."""
    xp = np if isinstance(count, int) else jnp
    return 0.08 - 0.05 * xp.minimum(count, 100) / 100


def extrapolation_schedule(count):
    """An increasing extrapolation step (different from the learning rate)."""
    xp = np if isinstance(count, int) else jnp
    return 0.01 + 0.04 * xp.minimum(count, 50) / 50


# name -> kwargs of extrap_sgd (schedules are Python callables, used by both sides)
MODES = {
    "default": dict(learning_rate=0.05),
    "heavy_ball": dict(learning_rate=0.05, momentum=0.8, nesterov=False),
    "no_momentum": dict(learning_rate=0.1, momentum=0.0),
    "own_extrapolation_rate": dict(learning_rate=0.05, extrapolation_rate=0.02),
    "schedules": dict(learning_rate=lr_schedule, extrapolation_rate=extrapolation_schedule),
    "lr_schedule_extrapolates_with_it": dict(learning_rate=lr_schedule, momentum=0.5),
}


@functools.cache
def problem(input_dtype: str):
    """A random quadratic per leaf, ½(θ−θ*)ᵀA(θ−θ*) on the flattened leaf with a dense SPD A, and independent noise
    for the gradient at θ and the one at θ̃, all rounded to ``input_dtype`` (then held in float64)."""
    rng = np.random.default_rng(7)
    r = lambda x: np.asarray(x).astype(input_dtype).astype(np.float64)  # noqa: E731
    a, opt, p0, n1, n2 = {}, {}, {}, {}, {}
    for k, shape in SHAPES.items():
        d = int(np.prod(shape))
        q = rng.normal(size=(d, d))
        a[k] = r(q @ q.T / d + 0.5 * np.eye(d))
        opt[k] = r(rng.normal(size=shape))
        p0[k] = r(rng.normal(size=shape))
        n1[k] = r(0.1 * rng.normal(size=(STEPS, *shape)))
        n2[k] = r(0.1 * rng.normal(size=(STEPS, *shape)))
    return a, opt, p0, n1, n2


def reference(mode: str, input_dtype: str = "float64") -> dict[str, np.ndarray]:
    """The paper's step in float64 NumPy: g = ∇f(θ) + ξ, θ̃ = θ − γ̃_t g, g̃ = ∇f(θ̃) + ξ', u = m u + g̃,
    θ ← θ − γ_t (g̃ + m u) (Nesterov) or θ − γ_t u (heavy ball); the parameters after every step."""
    kw = MODES[mode]
    cast = np.dtype(input_dtype).type
    lr, m = kw["learning_rate"], float(cast(kw.get("momentum", 0.9)))
    ex = kw.get("extrapolation_rate", lr)
    value = lambda rate, t: float(rate(t)) if callable(rate) else float(cast(rate))  # noqa: E731
    a, opt, p0, n1, n2 = problem(input_dtype)
    grad = lambda k, x: (a[k] @ (x - opt[k]).ravel()).reshape(x.shape)  # noqa: E731
    theta = {k: v.copy() for k, v in p0.items()}
    u = {k: np.zeros_like(v) for k, v in p0.items()}
    traj = {k: np.empty((STEPS, *s)) for k, s in SHAPES.items()}
    for t in range(STEPS):
        for k in SHAPES:
            g = grad(k, theta[k]) + n1[k][t]
            tilde = theta[k] - value(ex, t) * g
            g_tilde = grad(k, tilde) + n2[k][t]
            u[k] = m * u[k] + g_tilde
            d = g_tilde + m * u[k] if kw.get("nesterov", True) else u[k]
            theta[k] = theta[k] - value(lr, t) * d
            traj[k][t] = theta[k]
    return traj


@contextlib.contextmanager
def precision(dtype: str):
    if dtype == "float64":
        with jax.enable_x64(True):
            yield
    else:
        yield


def hand_loop(mode: str, dtype: str) -> dict[str, np.ndarray]:
    """``extrap_sgd`` in ``dtype`` driven by a hand-written two-gradient loop (jit + scan): the gradient at θ, the
    extrapolated point from :func:`extrapolate`, the gradient there, ``update(..., extrapolated_grads=...)``."""
    with precision(dtype):
        a, opt, p0, n1, n2 = jax.tree.map(lambda x: jnp.asarray(x, dtype), problem(dtype))
        tx = extrap_sgd(**MODES[mode])

        def grad(p, noise):
            return {k: (a[k] @ (p[k] - opt[k]).ravel()).reshape(p[k].shape) + noise[k] for k in SHAPES}

        @jax.jit
        def run(p0, n1, n2):
            def body(carry, noises):
                p, state = carry
                g = grad(p, noises[0])
                g_tilde = grad(extrapolate(p, state, g), noises[1])
                updates, state = tx.update(g, state, p, extrapolated_grads=g_tilde)
                p = optax.apply_updates(p, updates)
                return (p, state), p

            return jax.lax.scan(body, (p0, tx.init(p0)), (n1, n2))[1]

        traj = jax.tree.map(np.asarray, run(p0, n1, n2))
    assert all(v.dtype == np.dtype(dtype) for v in traj.values())
    return traj


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-6), ("float32", 1e-4)])
def test_matches_numpy_reference(mode, dtype, rtol):
    actual, expected = hand_loop(mode, dtype), reference(mode, dtype)
    for k in SHAPES:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=rtol * 1e-2, err_msg=k)
    # the problem is not trivial: the iterates moved far from the start and the extrapolation matters
    assert np.max(np.abs(expected["w"][-1] - problem(dtype)[2]["w"])) > 0.5


def test_zero_extrapolation_is_sgd_with_nesterov_momentum():
    """With γ̃ = 0 the second gradient is taken at θ itself: the steps are optax.sgd(nesterov=True)'s."""
    params, target = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 0.2, -0.1])
    grad = lambda p: 2.0 * (p - target)  # noqa: E731
    ours, theirs = extrap_sgd(0.05, 0.9, extrapolation_rate=0.0), optax.sgd(0.05, 0.9, nesterov=True)
    p, q, s, r = params, params, ours.init(params), theirs.init(params)
    for _ in range(20):
        g = grad(p)
        u, s = ours.update(g, s, p, extrapolated_grads=grad(extrapolate(p, s, g)))
        p = optax.apply_updates(p, u)
        v, r = theirs.update(grad(q), r, q)
        q = optax.apply_updates(q, v)
    np.testing.assert_allclose(p, q, rtol=1e-6)


# --- the training step -------------------------------------------------------------------------------------------

X = np.random.default_rng(3).normal(size=(12, 3)).astype(np.float32)
Y = X @ np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]]) + 0.3 + 0.1 * np.random.default_rng(4).normal(size=(12, 2))
Y = Y.astype(np.float32)


def linear_losses(params, batch):
    x, y = batch
    return 0.5 * jnp.sum((x @ params["w"] + params["b"] - y) ** 2, axis=-1)


def numpy_step_loop(steps: int, size: int, lr: float, m: float):
    """The paper's step on the first ``size`` rows with closed-form least-squares gradients, in float64."""
    x, y = X[:size].astype(np.float64), Y[:size].astype(np.float64)
    w, b = np.zeros((3, 2)), np.zeros(2)

    def grad(w, b):
        r = x @ w + b - y
        return x.T @ r / size, r.mean(0)

    uw, ub, out, norms = np.zeros_like(w), np.zeros_like(b), [], []
    for _ in range(steps):
        gw, gb = grad(w, b)
        norms.append(np.sqrt(np.sum(gw**2) + np.sum(gb**2)))
        tw, tb = grad(w - lr * gw, b - lr * gb)
        uw, ub = m * uw + tw, m * ub + tb
        w, b = w - lr * (tw + m * uw), b - lr * (tb + m * ub)
        out.append((w.copy(), b.copy()))
    return out, norms


@pytest.mark.parametrize("micro_batch_size, size", [(None, 12), (4, 10)])
def test_training_step_equals_the_reference_loop(micro_batch_size, size):
    """make_train_step detects the declaration and evaluates the second gradient on the same examples (whole buffer,
    or micro-batches with padding rows masked out); grad_norm stays the first gradient's."""
    tx = extrap_sgd(0.1, 0.9)
    step = make_train_step(linear_losses, tx, micro_batch_size=micro_batch_size)
    state = init_train_state({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, tx)
    expected, norms = numpy_step_loop(4, size, 0.1, 0.9)
    for k in range(4):
        state, metrics = step(state, (jnp.asarray(X), jnp.asarray(Y)), size)
        np.testing.assert_allclose(state.params["w"], expected[k][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(state.params["b"], expected[k][1], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], norms[k], rtol=1e-4)
        assert int(metrics["batch_size"]) == size and bool(metrics["finite"])
    assert step.compilations == 1


def test_training_step_with_a_rule_and_fit():
    """A batch-size rule chained before extrap_sgd reads the first gradient's statistics; fit trains with it."""
    tx = optax.chain(adabatch.norm_test(0.5, max_batch_size=12, init_batch_size=4), extrap_sgd(0.05))
    assert needs_extrapolated_grads(tx.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}))
    step = make_train_step(linear_losses, tx, micro_batch_size=4)
    state = init_train_state({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, tx)
    result = fit(step, state, (X, Y), num_steps=6, init_batch_size=4)
    losses = [r["loss"] for r in result.history]
    assert all(r["finite"] for r in result.history) and losses[-1] < losses[0]
    assert int(result.state.step) == 6


def test_command_line_trains_with_extrap_sgd(tmp_path):
    from adabatch.cli import main

    out = tmp_path / "out"
    argv = ["train", "--quiet", "--model", "mlp", "--steps", "2", "--batch-size", "4", "--max-batch-size", "8"]
    assert main([*argv, "--optimizer", "extrap_sgd", "--out", str(out)]) == 0
    (summary,) = json.loads((out / "summary.json").read_text()).values()
    assert summary["config"]["optimizer"] == "extrap_sgd"


# --- the protocol and bad input ----------------------------------------------------------------------------------


def test_update_without_the_second_gradient_is_refused():
    params = {"w": jnp.ones((2, 2))}
    for tx in (extrap_sgd(0.1), scale_by_extrap_sgd(0.1), optax.chain(optax.clip_by_global_norm(1.0), extrap_sgd(0.1))):
        with pytest.raises(ValueError, match=r"(?s)extrapolated_grads=.*make_train_step"):
            tx.update(params, tx.init(params), params)
    tx = extrap_sgd(0.1)
    with pytest.raises(ValueError, match="tree of the updates"):
        tx.update(params, tx.init(params), params, extrapolated_grads={"v": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="does not match"):
        tx.update(params, tx.init(params), params, extrapolated_grads={"w": jnp.ones(4)})


def test_declaration_is_found_in_any_nesting():
    params = jnp.zeros(3)
    assert not needs_extrapolated_grads(optax.adam(0.1).init(params))
    for tx in (
        extrap_sgd(0.1),
        optax.inject_hyperparams(extrap_sgd)(learning_rate=0.1),
        optax.MultiSteps(extrap_sgd(0.1), every_k_schedule=2),
        optax.chain(optax.clip_by_global_norm(1.0), scale_by_extrap_sgd(0.1)),
    ):
        state = tx.init(params)
        assert needs_extrapolated_grads(state)
        np.testing.assert_allclose(extrapolate(params + 1, state, jnp.ones(3)), 0.9 * jnp.ones(3), rtol=1e-6)


def test_extrapolation_step_follows_the_schedule():
    tx = extrap_sgd(0.1, extrapolation_rate=lambda t: 0.5 / (1.0 + t))
    params = jnp.zeros(2)
    state = tx.init(params)
    for t in range(3):
        inner = state[0]
        assert isinstance(inner, ScaleByExtrapSGDState)
        np.testing.assert_allclose(inner.extrapolation_step, 0.5 / (1 + t), rtol=1e-6)
        _, state = tx.update(jnp.ones(2), state, params, extrapolated_grads=jnp.ones(2))


def test_extrapolate_needs_exactly_one_state():
    params = jnp.zeros(2)
    with pytest.raises(ValueError, match="found 0"):
        extrapolate(params, optax.sgd(0.1).init(params), params)
    two = optax.chain(extrap_sgd(0.1), extrap_sgd(0.1))
    with pytest.raises(ValueError, match="found 2"):
        extrapolate(params, two.init(params), params)


def test_dtypes_kept():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    tx = extrap_sgd(0.1)
    state = tx.init(params)
    assert state[0].trace["w"].dtype == jnp.float32 and state[0].extrapolation_step.dtype == jnp.float32
    tilde = extrapolate(params, state, params)
    assert tilde["w"].dtype == jnp.bfloat16
    updates, new = tx.update(params, state, params, extrapolated_grads=tilde)
    assert updates["w"].dtype == jnp.bfloat16
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, state)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(learning_rate=0.1, momentum=1.0), "momentum"),
        (dict(learning_rate=0.1, momentum=-0.1), "momentum"),
        (dict(learning_rate=0.1, extrapolation_rate=-1.0), "extrapolation_rate"),
        (dict(learning_rate=0.1, extrapolation_rate=float("nan")), "extrapolation_rate"),
        (dict(learning_rate=0.1, nesterov="yes"), "nesterov"),
        (dict(learning_rate=0.1, state_dtype=jnp.int32), "state_dtype"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        extrap_sgd(**kwargs)
