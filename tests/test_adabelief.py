"""AdaBelief against a NumPy transcription of the official PyTorch optimizer (adabelief-pytorch v0.2.1)."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch.optimizers import ScaleByBeliefState, adabelief, scale_by_belief

try:
    from tests.reference_adabelief import ReferenceAdaBelief
except ImportError:  # tests/ is not a package: pytest puts the directory itself on sys.path
    from reference_adabelief import ReferenceAdaBelief

STEPS = 100
LR = 1e-2
WD = 1e-2
SHAPES = {"w": (3, 4), "b": (5,)}

MODES = {
    "plain": dict(rectify=False),
    "rectify_sgd": dict(rectify=True, degenerated_to_sgd=True),
    "rectify_skip": dict(rectify=True, degenerated_to_sgd=False),
    "amsgrad": dict(amsgrad=True, rectify=False),
    "amsgrad_rectify": dict(amsgrad=True, rectify=True),
    "decoupled": dict(weight_decay=WD),
    "decoupled_plain": dict(weight_decay=WD, rectify=False),
    "decoupled_skip": dict(weight_decay=WD, degenerated_to_sgd=False),
    "l2": dict(weight_decay=WD, weight_decouple=False),
    "l2_amsgrad_plain": dict(weight_decay=WD, weight_decouple=False, amsgrad=True, rectify=False),
    "fixed_decay": dict(weight_decay=WD, fixed_decay=True),
    "fixed_decay_skip": dict(weight_decay=WD, fixed_decay=True, degenerated_to_sgd=False),
    # eps large enough that adding it into the stored belief every step visibly changes the trajectory.
    "eps_in_state": dict(eps=1e-4, rectify=False),
    "eps_amsgrad_rectify": dict(eps=1e-4, amsgrad=True, rectify=True, b2=0.99),
    "schedule": dict(schedule=True, weight_decay=WD),
}


@contextlib.contextmanager
def x64_enabled():
    """Turn on float64 in JAX for the duration, restoring the previous setting."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # older JAX
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def make_problem(seed: int = 0):
    """Initial params, per-element curvatures and per-step gradient noise for the quadratic 0.5 * sum(a * theta^2)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    curv = {k: rng.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()}
    noise = {k: 0.1 * rng.normal(size=(STEPS, *s)) for k, s in SHAPES.items()}
    return params, curv, noise


def schedule_fn(count):
    return 1e-2 - 9e-3 * jnp.minimum(count, STEPS) / STEPS


def split_mode(mode: dict):
    kwargs = dict(mode)
    use_schedule = kwargs.pop("schedule", False)
    b1, b2 = kwargs.pop("b1", 0.9), kwargs.pop("b2", 0.999)
    return kwargs, use_schedule, b1, b2


@functools.cache
def run_reference(name: str, input_dtype: str = "float64") -> dict[str, np.ndarray]:
    """Reference trajectory (float64 arithmetic) from the inputs rounded to ``input_dtype``.

    The float32 JAX run sees float32 hyperparameters (1 - float32(0.999) is 1.3e-5 away from 0.001), float32 initial
    params and float32 noise; feeding the reference the same rounded values isolates the algorithm from the rounding
    of its inputs, which alone moves rectified trajectories by up to ~6e-5 relative over 100 steps.
    """
    kwargs, use_schedule, b1, b2 = split_mode(MODES[name])
    cast = np.dtype(input_dtype).type

    def r(v):
        return float(cast(v))

    kwargs = {k: r(v) if isinstance(v, float) else v for k, v in kwargs.items()}
    params, curv, noise = jax.tree.map(lambda x: x.astype(input_dtype).astype(np.float64), make_problem())
    ref = ReferenceAdaBelief(params, lr=r(LR), betas=(r(b1), r(b2)), **kwargs)
    traj = {k: np.empty((STEPS, *s)) for k, s in SHAPES.items()}
    for t in range(STEPS):
        grads = {k: curv[k] * ref.params[k] + noise[k][t] for k in SHAPES}
        # schedule_fn(t), evaluated with the same rounding as in JAX
        lr = r(cast(1e-2) - cast(9e-3) * cast(min(t, STEPS)) / cast(STEPS)) if use_schedule else None
        ref.step(grads, lr=lr)
        for k in SHAPES:
            traj[k][t] = ref.params[k]
    return traj


def run_jax(opt: optax.GradientTransformation, dtype) -> dict[str, np.ndarray]:
    params, curv, noise = make_problem()
    params, curv, noise = jax.tree.map(lambda x: jnp.asarray(x, dtype), (params, curv, noise))

    def body(carry, n):
        p, state = carry
        grads = jax.tree.map(lambda a, x, e: a * x + e, curv, p, n)
        updates, state = opt.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        return (p, state), p

    @jax.jit
    def run(p0):
        _, traj = jax.lax.scan(body, (p0, opt.init(p0)), noise)
        return traj

    return jax.tree.map(np.asarray, run(params))


def make_opt(mode: dict) -> optax.GradientTransformation:
    kwargs, use_schedule, b1, b2 = split_mode(mode)
    return adabelief(schedule_fn if use_schedule else LR, b1, b2, **kwargs)


@functools.cache
def jax_trajectory(name: str, dtype: str) -> dict[str, np.ndarray]:
    """The trajectory of ``adabelief`` in mode ``name`` with everything in ``dtype`` (cached: several tests use it)."""
    with x64_enabled() if dtype == "float64" else contextlib.nullcontext():
        traj = run_jax(make_opt(MODES[name]), jnp.dtype(dtype))
    assert all(v.dtype == np.dtype(dtype) for v in traj.values())
    return traj


def assert_close(actual, expected, rtol, atol):
    for k in SHAPES:
        assert actual[k].shape == expected[k].shape
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


# float32: rtol 1e-5 on params of order 1 (float32 spacing there is 6e-8-1.2e-7; 100 steps accumulate rounding).
# atol 1e-7 (1e-5 of one step of size lr = 1e-2) only matters for the few coordinates whose trajectory passes near
# zero, where a relative error is meaningless; the params are never subnormal-small, so it hides nothing else.
@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float32(name):
    assert_close(jax_trajectory(name, "float32"), run_reference(name, "float32"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["rectify_sgd", "decoupled", "eps_in_state"])
def test_float32_with_unrounded_hyperparameters(name):
    """Against the exact float64 hyperparameters the float32 run is still within 1e-5 relative plus 1e-6 absolute."""
    assert_close(jax_trajectory(name, "float32"), run_reference(name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float64(name):
    assert_close(jax_trajectory(name, "float64"), run_reference(name), rtol=1e-10, atol=1e-12)


def test_modes_actually_differ():
    """Guard against a comparison that passes because the modes collapse onto one another."""
    trajs = {name: run_reference(name)["w"][-1] for name in MODES}
    names = list(trajs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if {a, b} == {"rectify_sgd", "amsgrad_rectify"}:
                continue  # identical by design, see test_amsgrad_is_inert_when_rectified
            assert not np.allclose(trajs[a], trajs[b], rtol=1e-6, atol=0), (a, b)


def test_amsgrad_is_inert_when_rectified():
    """Official quirk: with rectify=True the rectified branch normalises by s_t, and the warm-up branch uses no
    denominator, so amsgrad changes only the state (nu_max), never the parameters."""
    np.testing.assert_array_equal(run_reference("amsgrad_rectify")["w"], run_reference("rectify_sgd")["w"])
    for dtype in ("float32", "float64"):
        with_max, without = jax_trajectory("amsgrad_rectify", dtype), jax_trajectory("rectify_sgd", dtype)
        jax.tree.map(np.testing.assert_array_equal, with_max, without)


@pytest.mark.parametrize("kwargs", [dict(), dict(amsgrad=True, rectify=False)])
def test_scale_by_belief_jit_step_matches_reference(kwargs):
    """Under jit, scale_by_belief returns the official d_t (reference run with lr = 1 and float32-rounded betas)."""
    tx = scale_by_belief(**kwargs)
    params = {"w": np.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": np.ones(5)}
    betas = (float(np.float32(0.9)), float(np.float32(0.999)))
    ref = ReferenceAdaBelief(params, lr=1.0, betas=betas, **kwargs)
    state = jax.jit(tx.init)(jax.tree.map(jnp.asarray, params))
    update = jax.jit(tx.update)
    for t in range(8):  # crosses rho_t >= 5 at t = 6
        grads = jax.tree.map(lambda p, t=t: np.sin(p * (t + 1)) + 0.1 * t, params)
        grads = jax.tree.map(lambda g: g.astype(np.float32).astype(np.float64), grads)
        d, state = update(jax.tree.map(jnp.asarray, grads), state)
        before = {k: v.copy() for k, v in ref.params.items()}
        ref.step(grads)
        for k in params:
            assert d[k].dtype == jnp.float32
            np.testing.assert_allclose(d[k], before[k] - ref.params[k], rtol=1e-5, atol=1e-7, err_msg=f"{k} t={t + 1}")
    assert isinstance(state, ScaleByBeliefState)
    assert state.count.dtype == jnp.int32 and state.count.shape == () and int(state.count) == 8
    fields = (state.mu, state.nu, state.nu_max) if kwargs.get("amsgrad") else (state.mu, state.nu)
    for field in fields:
        assert jax.tree.map(jnp.shape, field) == jax.tree.map(np.shape, params)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(field))
    if not kwargs.get("amsgrad"):
        assert state.nu_max is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rectification_switch_step(dtype):
    """rho_5 = 4.996 for b2 = 0.999, and closer to 5 for larger b2: the naive float32 formula for rho_t misplaces the
    switch. Without the SGD warm-up, steps before the first rho_t >= 5 must be exactly zero and later ones not.
    b2 is passed traced (as through inject_hyperparams), so one compilation serves every value."""
    first_rectified = {0.8: 7, 0.99: 6, 0.999: 6, 0.9999: 6, 0.99999: 6}
    with x64_enabled() if dtype == "float64" else contextlib.nullcontext():
        g = jnp.array([1.0, -2.0, 3.0], dtype)

        @jax.jit
        def update(grads, state, b2):
            return scale_by_belief(b2=b2, degenerated_to_sgd=False).update(grads, state)

        for b2, first in first_rectified.items():
            state = scale_by_belief().init(g)
            for t in range(1, 10):
                d, state = update(g * t, state, jnp.asarray(b2, dtype))
                assert d.dtype == jnp.dtype(dtype)
                assert bool(jnp.all(d == 0)) == (t < first), (b2, t)


def test_non_rectified_matches_optax_adabelief_with_eps_root_equal_eps():
    """Independent cross-check: optax's version (eps_root into the state, eps in the denominator) is the official
    non-rectified update when both are set to the official eps."""
    params, curv, noise = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), make_problem())
    ours = adabelief(LR, 0.9, 0.99, 1e-4, rectify=False)
    theirs = optax.adabelief(LR, 0.9, 0.99, eps=1e-4, eps_root=1e-4)
    finals = []
    for opt in (ours, theirs):
        p, state = params, opt.init(params)
        update = jax.jit(opt.update)
        for t in range(20):
            grads = jax.tree.map(lambda a, x, e, t=t: a * x + e[t], curv, p, noise)
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
        finals.append(p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *finals)


def test_first_step_is_bias_corrected_momentum():
    g = jnp.array([1.0, -2.0, 3.0])
    d, _ = jax.jit(scale_by_belief().update)(g, scale_by_belief().init(g))
    np.testing.assert_allclose(d, g, rtol=1e-6)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_inject_hyperparams_matches_plain(amsgrad):
    params, curv, noise = make_problem()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    injected = optax.inject_hyperparams(adabelief)(learning_rate=LR, b1=0.8, b2=0.99, eps=1e-8, amsgrad=amsgrad)
    plain = adabelief(LR, 0.8, 0.99, 1e-8, amsgrad=amsgrad)
    for opt in (injected, plain):
        opt_update = jax.jit(opt.update)
        p, state = params, opt.init(params)
        for t in range(12):
            grads = jax.tree.map(lambda a, x, e, t=t: a * x + e[t], curv, p, noise)
            updates, state = opt_update(grads, state, p)
            p = optax.apply_updates(p, updates)
        if opt is injected:
            p_injected = p
            assert float(state.hyperparams["b2"]) == pytest.approx(0.99)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p_injected, p)


def test_bf16_params_keep_bf16_updates():
    params = {"w": jnp.ones((3, 4), jnp.bfloat16), "b": jnp.zeros(5, jnp.bfloat16)}
    opt = adabelief(LR, weight_decay=WD)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.bfloat16), params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    belief_state = state[0]
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves((belief_state.mu, belief_state.nu)))
    low = scale_by_belief(state_dtype=jnp.bfloat16).init(params)
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(low.mu))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(b1=1.0), "b1"),
        (dict(b1=-0.5), "b1"),
        (dict(b2=-0.1), "b2"),
        (dict(b2=1.0), "b2"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(amsgrad="yes"), "amsgrad"),
        (dict(state_dtype=jnp.int32), "state_dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        adabelief(**kwargs)


def test_schedule_and_zero_are_accepted():
    adabelief(learning_rate=optax.constant_schedule(1e-3), eps=0.0, b1=0.0)
    scale_by_belief(b1=0.0, b2=0.0, eps=0.0)


def test_integer_updates_raise():
    tx = scale_by_belief()
    state = tx.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="updates"):
        tx.update(jnp.arange(3), state)
    with pytest.raises(ValueError, match="updates"):
        jax.jit(tx.update)(jnp.arange(3), state)
