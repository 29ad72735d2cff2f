"""AdaLomo against a NumPy transcription of the official class (OpenLMLab/LOMO ``lomo_optim/adalomo.py``)."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch.optimizers import ScaleByAdalomoState, adalomo, scale_by_adalomo

try:
    from tests.reference_adalomo import ReferenceAdaLomo
except ImportError:  # tests/ is not a package: pytest puts the directory itself on sys.path
    from reference_adalomo import ReferenceAdaLomo

STEPS = 120
LR = 1e-2
SHAPES = {"w": (4, 6), "v": (6, 3), "b": (5,)}  # the official class's shapes: matrices and vectors
ND_SHAPES = {"w": (4, 6), "k": (2, 3, 4), "s": ()}  # the documented extension: last two dims factored; scalars

# name -> keyword arguments shared by adalomo and the reference ("schedule" and "nd" are test switches). Each mode
# exercises several options (every compiled trajectory costs about half a second of CPU).
MODES = {
    "default": dict(),
    "weight_decay_clip_threshold": dict(weight_decay=0.5, clip_threshold=0.5),  # the update normalisation binds
    "clip_grad_norm_and_value": dict(clip_grad_norm=1.0, clip_grad_value=0.5),
    # clipping by the global norm alone; eps_scale 2 > RMS(theta): the floor of the relative rate binds
    "clip_grad_norm_eps_decay_rate": dict(clip_grad_norm=0.5, eps=(1e-3, 2.0), decay_rate=-0.5),
    "schedule_nd": dict(schedule=True, nd=True, weight_decay=0.1),  # 3-d and 0-d tensors, learning-rate schedule
}


@contextlib.contextmanager
def x64_enabled():
    with jax.enable_x64(True):
        yield


def make_problem(shapes, seed: int = 0):
    """Initial params, per-element curvatures and per-step gradient noise for the quadratic 0.5 * sum(a * theta^2)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    curv = {k: rng.uniform(0.5, 2.0, size=s) for k, s in shapes.items()}
    noise = {k: 0.3 * rng.normal(size=(STEPS, *s)) for k, s in shapes.items()}
    return params, curv, noise


def schedule_fn(count):
    return 2e-2 - 1.5e-2 * jnp.minimum(count, STEPS) / STEPS


def split(name: str):
    kwargs = dict(MODES[name])
    use_schedule = kwargs.pop("schedule", False)
    shapes = ND_SHAPES if kwargs.pop("nd", False) else SHAPES
    return kwargs, use_schedule, shapes


@functools.cache
def run_reference(name: str, input_dtype: str = "float64") -> dict[str, np.ndarray]:
    """Reference trajectory (float64 arithmetic) from the inputs rounded to ``input_dtype``."""
    kwargs, use_schedule, shapes = split(name)
    cast = np.dtype(input_dtype).type

    def r(v):
        return float(cast(v))

    kwargs = {k: tuple(map(r, v)) if isinstance(v, tuple) else r(v) for k, v in kwargs.items()}
    params, curv, noise = jax.tree.map(lambda x: x.astype(input_dtype).astype(np.float64), make_problem(shapes))
    ref = ReferenceAdaLomo(params, lr=r(LR), **kwargs)
    traj = {k: np.empty((STEPS, *s)) for k, s in shapes.items()}
    for t in range(STEPS):
        grads = {k: curv[k] * ref.params[k] + noise[k][t] for k in shapes}
        lr = r(cast(2e-2) - cast(1.5e-2) * cast(min(t, STEPS)) / cast(STEPS)) if use_schedule else None
        ref.step(grads, lr=lr)
        for k in shapes:
            traj[k][t] = ref.params[k]
    return traj


def make_opt(name: str) -> optax.GradientTransformation:
    kwargs, use_schedule, _ = split(name)
    if "eps" in kwargs:
        kwargs["eps"], kwargs["eps_scale"] = kwargs.pop("eps")
    return adalomo(schedule_fn if use_schedule else LR, **kwargs)


@functools.cache
def jax_runs(dtype: str):
    """Every mode's trajectory with everything in ``dtype``, traced into one compiled program (one compilation)."""
    with x64_enabled() if dtype == "float64" else contextlib.nullcontext():
        problems = {name: jax.tree.map(lambda x: jnp.asarray(x, dtype), make_problem(split(name)[2])) for name in MODES}
        opts = {name: make_opt(name) for name in MODES}

        @jax.jit
        def run(problems):
            out = {}
            for name, opt in opts.items():
                p0, curv, noise = problems[name]

                def body(carry, n, opt=opt, curv=curv):
                    p, state = carry
                    grads = jax.tree.map(lambda a, x, e: a * x + e, curv, p, n)
                    updates, state = opt.update(grads, state, p)
                    p = optax.apply_updates(p, updates)
                    return (p, state), p

                (_, state), out[name] = jax.lax.scan(body, (p0, opt.init(p0)), noise)
                assert isinstance(state[1], ScaleByAdalomoState)
            return out

        out = jax.tree.map(np.asarray, run(problems))
    assert all(v.dtype == np.dtype(dtype) for traj in out.values() for v in traj.values())
    return out


def max_rel_err(actual, expected, atol):
    return max(float(np.max(np.abs(actual[k] - expected[k]) / (np.abs(expected[k]) + atol))) for k in expected)


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float64(name):
    assert max_rel_err(jax_runs("float64")[name], run_reference(name), atol=1e-12) < 1e-10


# float32: the reference sees the same float32-rounded inputs; 1e-4 relative (the required bound) with an absolute
# floor of 1e-6 (1e-4 of a step lr * RMS(theta) ~ 1e-2) for coordinates crossing zero.
@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float32(name):
    traj, ref = jax_runs("float32")[name], run_reference(name, "float32")
    for k in ref:
        np.testing.assert_allclose(traj[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_modes_actually_differ():
    finals = {name: run_reference(name)["w"][-1] for name in MODES}
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-6, atol=0), (a, b)


def test_state_memory_is_linear_in_the_matrix_sides():
    """An n×m matrix keeps n + m second-moment numbers (Adam keeps 2 n m); a vector keeps its length."""
    n, m = 1000, 3000
    params = {"w": jax.ShapeDtypeStruct((n, m), jnp.float32), "b": jax.ShapeDtypeStruct((m,), jnp.float32)}
    state = jax.eval_shape(scale_by_adalomo().init, params)
    sizes = {
        field: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(getattr(state, field))) for field in state._fields
    }
    assert sizes == {"count": 1, "v_row": n, "v_col": m, "v": m}
    adam = jax.eval_shape(optax.scale_by_adam().init, params)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adam)) == 2 * (n * m + m) + 1
    nd = jax.eval_shape(scale_by_adalomo().init, {"k": jax.ShapeDtypeStruct((7, n, m), jnp.float32)})
    assert nd.v_row["k"].shape == (7, n) and nd.v_col["k"].shape == (7, m) and nd.v["k"].shape == (0,)


def _run(opts, params, curv, noise, steps):
    """Final params of each optimizer after ``steps`` steps, all traced into one compiled program."""

    @jax.jit
    def run(params, curv, noise):
        finals = []
        for opt in opts:

            def body(carry, n, opt=opt):
                p, state = carry
                updates, state = opt.update(jax.tree.map(lambda a, x, e: a * x + e, curv, p, n), state, p)
                return (optax.apply_updates(p, updates), state), None

            (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), jax.tree.map(lambda x: x[:steps], noise))
            finals.append(p)
        return finals

    return run(params, curv, noise)


def test_difference_from_optax_adafactor():
    """optax.adafactor with the nearest settings (factor every matrix, decay 0.8, clip 1, parameter scale, no
    momentum, eps 1e-30) equals adalomo without weight decay; its default min_dim_size_to_factor=128 leaves small
    matrices unfactored, and its weight decay is neither multiplied by the learning rate nor by the parameter scale."""
    params, curv, noise = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), make_problem(SHAPES))
    steps, wd = 30, 0.5

    def nearest(**kw):
        return optax.adafactor(LR, decay_rate=0.8, clipping_threshold=1.0, momentum=None, eps=1e-30, **kw)

    ours, theirs, unfactored, ours_wd, theirs_wd = _run(
        [
            adalomo(LR),
            nearest(min_dim_size_to_factor=1),
            nearest(),  # default min_dim_size_to_factor=128
            adalomo(LR, weight_decay=wd),
            nearest(min_dim_size_to_factor=1, weight_decay_rate=wd),
        ],
        params,
        curv,
        noise,
        steps,
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours, theirs)

    np.testing.assert_allclose(unfactored["b"], ours["b"], rtol=1e-5)  # vectors agree
    for k in ("w", "v"):  # matrices: per-entry second moment in optax, factored here
        assert max_rel_err({k: unfactored[k]}, {k: ours[k]}, atol=1e-3) > 1e-3

    # optax shrinks theta by (1 - wd) per step, the official class by (1 - lr * RMS(theta) * wd) ~ (1 - 5e-3)
    assert float(jnp.sqrt(jnp.mean(theirs_wd["w"] ** 2))) < 0.5 * float(jnp.sqrt(jnp.mean(ours_wd["w"] ** 2)))
    ref = ReferenceAdaLomo(jax.tree.map(np.asarray, params), lr=float(np.float32(LR)), weight_decay=wd)
    for t in range(steps):
        ref.step({k: np.asarray(curv[k]) * ref.params[k] + np.asarray(noise[k][t]) for k in SHAPES})
    for k in SHAPES:
        np.testing.assert_allclose(ours_wd[k], ref.params[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_low_precision_params_compute_in_float32():
    """bf16 params: float32 state and arithmetic (as the official class), bf16 updates equal to the float32 step
    rounded once."""
    params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(3, jnp.float32)}
    grads = {"w": jnp.sin(jnp.arange(12.0)).reshape(3, 4), "b": jnp.array([0.3, -0.2, 0.1])}
    tx = scale_by_adalomo(weight_decay=0.1)
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), (params, grads))
    high = jax.tree.map(lambda x: x.astype(jnp.float32), low)

    @jax.jit
    def both(low, high):
        return [tx.update(g, tx.init(p), p) for p, g in (low, high)]

    (d_low, state), (d_high, _) = both(low, high)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.v_row, state.v_col, state.v)))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(d_low))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), d_low, d_high)
    small = scale_by_adalomo(state_dtype=jnp.bfloat16).init(low[0])
    assert small.v_row["w"].dtype == jnp.bfloat16


def test_inject_hyperparams_and_count():
    params, curv, noise = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), make_problem(SHAPES))
    injected = optax.inject_hyperparams(adalomo)(learning_rate=LR, weight_decay=0.1, clip_grad_norm=1.0)
    (p,) = _run([injected], params, curv, noise, 10)
    ref = ReferenceAdaLomo(
        jax.tree.map(np.asarray, params),
        lr=float(np.float32(LR)),
        weight_decay=float(np.float32(0.1)),
        clip_grad_norm=1.0,
    )
    for t in range(10):
        ref.step({k: np.asarray(curv[k]) * ref.params[k] + np.asarray(noise[k][t]) for k in SHAPES})
    for k in SHAPES:
        np.testing.assert_allclose(p[k], ref.params[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_update_needs_params():
    tx = scale_by_adalomo()
    state = tx.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="params"):
        tx.update(jnp.ones(3), state)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(eps=-1e-30), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps_scale=-1e-3), "eps_scale"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(clip_threshold=-1.0), "clip_threshold"),
        (dict(decay_rate=0.8), "decay_rate"),
        (dict(decay_rate=float("-inf")), "decay_rate"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(clip_grad_norm=0.0), "clip_grad_norm"),
        (dict(clip_grad_norm=-1.0), "clip_grad_norm"),
        (dict(clip_grad_value=-0.5), "clip_grad_value"),
        (dict(state_dtype=jnp.int32), "state_dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        adalomo(**kwargs)


def test_integer_updates_raise():
    tx = scale_by_adalomo()
    state = tx.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="updates"):
        tx.update(jnp.arange(3), state, jnp.zeros(3))
