"""ActiveLR against NumPy transcriptions of the official ActiveAdam and ActiveBelief (davoodwadi/ConsciousLR)."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch.optimizers import (
    ActiveLRState,
    active_adabelief,
    active_adam,
    active_lr,
    scale_by_belief,
)

try:
    from tests.reference_active_lr import ReferenceActiveAdam, ReferenceActiveBelief
except ImportError:  # tests/ is not a package: pytest puts the directory itself on sys.path
    from reference_active_lr import ReferenceActiveAdam, ReferenceActiveBelief

STEPS = 120
LR = 1e-2
WD = 1e-2
SHAPES = {"w": (3, 4), "b": (5,)}

# name -> (algorithm, keyword arguments shared by the JAX alias and the reference). "schedule" is a test switch.
# Each mode exercises several options at once (every compiled trajectory costs about a second of CPU).
MODES = {
    "adam": ("adam", dict(period=10)),  # official defaults: weight decay 1e-2 through the gain, additive increase
    "adam_period_1_no_decay": ("adam", dict(period=1, weight_decay=0.0, lr_high=0.1, lr_low=0.8)),
    "adam_multiplicative_schedule": (
        "adam",
        dict(period=7, weight_decay=0.1, increase="multiplicative", lr_high=1.5, schedule=True),
    ),
    "belief_l2": ("belief", dict(period=6, weight_decay=0.1)),  # official defaults but for weight_decay and period
    "belief_decoupled_multiplicative": (
        "belief",
        dict(period=4, weight_decay=0.1, weight_decouple=True, increase="multiplicative", lr_high=1.3, lr_low=0.6),
    ),
    "belief_fixed_decay_schedule": (
        "belief",
        dict(period=3, weight_decay=WD, weight_decouple=True, fixed_decay=True, schedule=True, lr_high=0.5, lr_low=0.3),
    ),
}


@contextlib.contextmanager
def x64_enabled():
    with jax.enable_x64(True):
        yield


def make_problem(seed: int = 0):
    """Initial params, per-element curvatures and per-step gradient noise for the quadratic 0.5 * sum(a * theta^2)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    curv = {k: rng.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()}
    noise = {k: 0.3 * rng.normal(size=(STEPS, *s)) for k, s in SHAPES.items()}
    return params, curv, noise


def schedule_fn(count):
    return 1e-2 - 9e-3 * jnp.minimum(count, STEPS) / STEPS


def split(name: str):
    algo, kwargs = MODES[name]
    kwargs = dict(kwargs)
    return algo, kwargs, kwargs.pop("schedule", False)


@functools.cache
def run_reference(name: str, input_dtype: str = "float64"):
    """Reference trajectory and final gains (float64 arithmetic) from inputs rounded to ``input_dtype``."""
    algo, kwargs, use_schedule = split(name)
    cast = np.dtype(input_dtype).type

    def r(v):
        return float(cast(v))

    kwargs = {k: r(v) if isinstance(v, float) else v for k, v in kwargs.items()}
    params, curv, noise = jax.tree.map(lambda x: x.astype(input_dtype).astype(np.float64), make_problem())
    cls = ReferenceActiveAdam if algo == "adam" else ReferenceActiveBelief
    ref = cls(params, lr=r(LR), betas=(r(0.9), r(0.999)), eps=r(1e-8), **kwargs)
    traj = {k: np.empty((STEPS, *s)) for k, s in SHAPES.items()}
    for t in range(STEPS):
        grads = {k: curv[k] * ref.params[k] + noise[k][t] for k in SHAPES}
        lr = r(cast(1e-2) - cast(9e-3) * cast(min(t, STEPS)) / cast(STEPS)) if use_schedule else None
        ref.step(grads, lr=lr)
        for k in SHAPES:
            traj[k][t] = ref.params[k]
    gains = {k: ref.state[k]["gain"] for k in SHAPES}
    return traj, gains


def make_opt(name: str) -> optax.GradientTransformation:
    algo, kwargs, use_schedule = split(name)
    lr = schedule_fn if use_schedule else LR
    return (active_adam if algo == "adam" else active_adabelief)(lr, **kwargs)


@functools.cache
def jax_runs(dtype: str):
    """Trajectories and final gains of every mode with everything in ``dtype``, traced into one compiled program
    (one XLA compilation instead of one per mode: the test file stays within its CPU budget)."""
    with x64_enabled() if dtype == "float64" else contextlib.nullcontext():
        opts = {name: make_opt(name) for name in MODES}
        params, curv, noise = jax.tree.map(lambda x: jnp.asarray(x, dtype), make_problem())

        @jax.jit
        def run(p0):
            out = {}
            for name, opt in opts.items():

                def body(carry, n, opt=opt):
                    p, state = carry
                    grads = jax.tree.map(lambda a, x, e: a * x + e, curv, p, n)
                    updates, state = opt.update(grads, state, p)
                    p = optax.apply_updates(p, updates)
                    return (p, state), p

                (_, state), traj = jax.lax.scan(body, (p0, opt.init(p0)), noise)
                assert isinstance(state[0], ActiveLRState)
                out[name] = (traj, state[0].gain)
            return out

        out = jax.tree.map(np.asarray, run(params))
    assert all(v.dtype == np.dtype(dtype) for traj, _ in out.values() for v in traj.values())
    return out


def jax_run(name: str, dtype: str):
    return jax_runs(dtype)[name]


def max_rel_err(actual, expected, atol):
    return max(float(np.max(np.abs(actual[k] - expected[k]) / (np.abs(expected[k]) + atol))) for k in SHAPES)


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float64(name):
    traj, gains = jax_run(name, "float64")
    ref_traj, ref_gains = run_reference(name)
    assert max_rel_err(traj, ref_traj, atol=1e-12) < 1e-10
    assert max_rel_err(gains, ref_gains, atol=0) < 1e-12


# float32: the reference sees the same float32-rounded inputs (params, noise, hyperparameters). Bound: 1e-4 relative,
# with an absolute floor of 1e-5 of the trajectory's scale for coordinates crossing zero (steps grow to lr * gain ~ 0.2
# here, and 100 float32 steps of that size leave ~1e-5 absolute; relative error at a zero crossing means nothing).
@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float32(name):
    traj, gains = jax_run(name, "float32")
    ref_traj, ref_gains = run_reference(name, "float32")
    for k in SHAPES:
        scale = np.max(np.abs(ref_traj[k]))
        np.testing.assert_allclose(traj[k], ref_traj[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)
    assert max_rel_err(gains, ref_gains, atol=0) < 1e-5  # the same sign decisions in float32


@pytest.mark.parametrize("name", list(MODES))
def test_gain_moved_both_ways(name):
    """Guard against a comparison that passes because the gain never changed: both branches fired."""
    _, gains = run_reference(name)
    leaves = np.concatenate([g.ravel() for g in gains.values()])
    assert np.any(leaves > 1) and np.any(leaves < 1), leaves


def test_modes_actually_differ():
    finals = {name: run_reference(name)[0]["w"][-1] for name in MODES}
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-6, atol=0), (a, b)


def test_gain_timing_and_generic_inner():
    """active_lr around any transformation (here SGD with momentum): the gain multiplies the inner step, first changes
    after step 2K, takes effect from the next step, and a zero product counts as a sign change."""
    period, lr_high, lr_low, lr, mom = 3, 0.5, 0.25, 0.1, 0.9
    tx = active_lr(optax.sgd(lr, momentum=mom), period=period, lr_high=lr_high, lr_low=lr_low)
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(40, 4))
    grads[3:6, 3] = 0.0  # second period of coordinate 3 sums to exactly 0: a "sign change"
    state = tx.init(jnp.zeros(4))
    update = jax.jit(tx.update)
    gain, trace, cumm, old = np.ones(4), np.zeros(4), np.zeros(4), None
    for t, g in enumerate(grads, start=1):
        u, state = update(jnp.asarray(g, jnp.float32), state)
        cumm += g
        trace = mom * trace + g
        np.testing.assert_allclose(u, -lr * gain * trace, rtol=2e-5, atol=1e-7, err_msg=f"t={t}")
        if t % period == 0:
            if t >= 2 * period:
                gain = np.where(old * cumm <= 0, gain * lr_low, gain + lr_high)
            old, cumm = cumm.copy(), np.zeros(4)
        np.testing.assert_allclose(state.gain, gain, rtol=1e-6, err_msg=f"t={t}")
        if t < 2 * period:
            assert np.all(np.asarray(state.gain) == 1)
    assert gain[3] < 1 or t < 2 * period
    assert int(state.count) == len(grads) and state.count.dtype == jnp.int32


def test_state_layout_and_dtypes():
    params = {"w": jnp.ones((3, 4), jnp.bfloat16), "b": jnp.zeros(5, jnp.float32)}
    tx = active_lr(optax.scale(-1.0), period=2)
    state = tx.init(params)
    for field in (state.gain, state.accum, state.prev_accum):
        assert jax.tree.map(jnp.shape, field) == jax.tree.map(jnp.shape, params)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(field))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    updates, state = jax.jit(tx.update)(grads, state)
    assert updates["w"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32
    low = active_lr(scale_by_belief(), period=2, state_dtype=jnp.bfloat16).init(params)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(low.gain))


def test_inject_hyperparams_matches_reference():
    """Every numeric argument traced (period included) through optax.inject_hyperparams, under jit."""
    params, curv, noise = make_problem()
    params, curv, noise = jax.tree.map(lambda x: x.astype(np.float32).astype(np.float64), (params, curv, noise))
    injected = optax.inject_hyperparams(active_adam)(learning_rate=LR, period=3, lr_high=1.0, lr_low=0.5)
    r = lambda v: float(np.float32(v))  # noqa: E731 - the injected hyperparameters are float32
    ref = ReferenceActiveAdam(params, period=3, lr=r(LR), eps=r(1e-8), betas=(r(0.9), r(0.999)), lr_high=1.0)
    update = jax.jit(injected.update)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = injected.init(p)
    for t in range(12):
        updates, state = update(jax.tree.map(lambda a, x, e, t=t: a * x + e[t], curv, p, noise), state, p)
        p = optax.apply_updates(p, updates)
        ref.step({k: curv[k] * ref.params[k] + noise[k][t] for k in SHAPES})
    assert int(state.hyperparams["period"]) == 3
    for k in SHAPES:
        np.testing.assert_allclose(p[k], ref.params[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (active_adam, dict(period=0), "period"),
        (active_adam, dict(period=2.5), "period"),
        (active_adam, dict(period=-3), "period"),
        (active_adam, dict(period=4, lr_low=0.0), "lr_low"),
        (active_adam, dict(period=4, lr_low=1.5), "lr_low"),
        (active_adam, dict(period=4, lr_low=-0.5), "lr_low"),
        (active_adam, dict(period=4, lr_high=-1.0), "lr_high"),
        (active_adam, dict(period=4, lr_high=float("inf")), "lr_high"),
        (active_adam, dict(period=4, increase="multiplicative", lr_high=0.5), "lr_high"),
        (active_adam, dict(period=4, increase="exponential"), "increase"),
        (active_adam, dict(period=4, learning_rate=-1e-3), "learning_rate"),
        (active_adam, dict(period=4, b1=1.0), "b1"),
        (active_adam, dict(period=4, b2=-0.1), "b2"),
        (active_adam, dict(period=4, eps=-1e-8), "eps"),
        (active_adam, dict(period=4, weight_decay=-1e-2), "weight_decay"),
        (active_adam, dict(period=4, state_dtype=jnp.int32), "state_dtype"),
        (active_adabelief, dict(period=0), "period"),
        (active_adabelief, dict(period=4, lr_low=2.0), "lr_low"),
        (active_adabelief, dict(period=4, lr_high=-0.05), "lr_high"),
        (active_adabelief, dict(period=4, b1=1.5), "b1"),
        (active_adabelief, dict(period=4, eps=-1.0), "eps"),
        (active_adabelief, dict(period=4, weight_decay=-1.0), "weight_decay"),
        (active_adabelief, dict(period=4, weight_decouple="yes"), "weight_decouple"),
        (active_lr, dict(inner="adam", period=4), "inner"),
        (active_lr, dict(inner=optax.identity(), period=None), "period"),
    ],
)
def test_bad_arguments_raise(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_period_is_required():
    with pytest.raises(TypeError):
        active_adam()  # the official classes have no default stepSize either


def test_integer_updates_raise():
    tx = active_lr(optax.identity(), period=2)
    state = tx.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="updates"):
        tx.update(jnp.arange(3), state)
