"""Tom against a NumPy float64 transcription of the official PyTorch optimizer (``AnirudhMaiya/Tom``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch.optimizers import ScaleByTomState, scale_by_tom, tom

try:
    from tests.optimizer_harness import (
        assert_close,
        in_dtype,
        rounded,
        run_jax,
        run_reference,
        schedule_fn,
        split_kwargs,
    )
    from tests.reference_optimizers import ReferenceTom
except ImportError:  # tests/ is not a package: pytest puts the directory itself on sys.path
    from optimizer_harness import assert_close, in_dtype, rounded, run_jax, run_reference, schedule_fn, split_kwargs
    from reference_optimizers import ReferenceTom

# One xdist worker runs the whole file: the trajectories are cached and shared between tests.
pytestmark = pytest.mark.xdist_group("tom")

LR = 1e-2
WD = 1e-2

# Every numeric hyperparameter is passed (traced) in every mode, so that modes share compilations.
NUMERIC_DEFAULTS = dict(b1=0.9, b2=0.99, b3=0.999, eps=1e-8, weight_decay=0.0)

# name -> (kwargs of adabatch.tom, use a schedule)
MODES = {
    "default": (dict(), False),
    "bias_correction": (dict(level_trend_bias_correction=True), False),
    "l2": (dict(weight_decay=WD), False),
    "betas_eps": (dict(b1=0.8, b2=0.9, b3=0.99, eps=1e-3), False),
    "schedule_l2_bias": (dict(weight_decay=WD, level_trend_bias_correction=True), True),
}


@functools.cache
def reference(name: str, input_dtype: str = "float64") -> dict[str, np.ndarray]:
    kwargs, use_schedule = MODES[name]
    kw = rounded({"lr": LR, **kwargs}, input_dtype)
    betas = (kw.pop("b1", 0.9), kw.pop("b2", 0.99), kw.pop("b3", 0.999))
    bias = kw.pop("level_trend_bias_correction", False)
    return run_reference(
        lambda p: ReferenceTom(p, betas=rounded({"b": betas}, input_dtype)["b"], bias_correction=bias, **kw),
        input_dtype,
        use_schedule=use_schedule,
    )


@functools.cache
def trajectory(name: str, dtype: str) -> dict[str, np.ndarray]:
    """``tom`` in mode ``name``, everything in ``dtype``; numeric hyperparameters are traced, so the modes that
    differ only in them share one compilation (weight_decay=0 is passed as a traced zero: the same maths)."""
    kwargs, use_schedule = MODES[name]
    static, numeric = split_kwargs({**NUMERIC_DEFAULTS, **kwargs})
    if use_schedule:
        static["learning_rate"] = schedule_fn
    else:
        numeric["learning_rate"] = LR
    traj = in_dtype(dtype, lambda: run_jax(tom, jnp.dtype(dtype), static=static, numeric=numeric))
    assert all(v.dtype == np.dtype(dtype) for v in traj.values())
    return traj


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float64(name):
    assert_close(trajectory(name, "float64"), reference(name), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float32(name):
    """Against the reference on the same float32-rounded inputs: 100 steps within 1e-5 relative (1e-7 absolute for
    coordinates crossing zero)."""
    assert_close(trajectory(name, "float32"), reference(name, "float32"), rtol=1e-5, atol=1e-7)


def test_float32_with_unrounded_inputs():
    assert_close(trajectory("default", "float32"), reference("default"), rtol=1e-4, atol=1e-6)


def test_modes_actually_differ():
    finals = {name: reference(name)["w"][-1] for name in MODES}
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-6, atol=0), (a, b)


def test_trend_matters():
    """With b2 -> 0 the trend is the last gradient difference; Tom then differs from Adam (optax.adam, b2 = b3)."""
    g = [jnp.array([1.0, -2.0]), jnp.array([2.0, -1.0]), jnp.array([0.5, 0.5])]
    tx, adam = scale_by_tom(), optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)

    @jax.jit
    def run(gs):
        s, sa = tx.init(gs[0]), adam.init(gs[0])
        for gt in gs:
            d, s = tx.update(gt, s)
            da, sa = adam.update(gt, sa)
        return d, da, s

    d, da, s = run(g)
    assert not np.allclose(d, da, rtol=1e-3)
    np.testing.assert_allclose(s.prev_grad, g[-1])


def test_state_and_jit_step():
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(5)}
    tx = scale_by_tom(level_trend_bias_correction=True)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    betas = tuple(float(np.float32(b)) for b in (0.9, 0.99, 0.999))
    ref = ReferenceTom(jax.tree.map(np.asarray, params), lr=1.0, betas=betas, bias_correction=True)
    for t in range(6):
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)) + 0.1 * t, params)
        d, state = update(grads, state)
        before = {k: v.copy() for k, v in ref.params.items()}
        ref.step(jax.tree.map(np.asarray, grads))
        for k in params:
            np.testing.assert_allclose(d[k], before[k] - ref.params[k], rtol=2e-5, atol=1e-7)
    assert isinstance(state, ScaleByTomState) and int(state.count) == 6 and state.count.dtype == jnp.int32
    for field in (state.level, state.trend, state.nu, state.prev_grad):
        assert jax.tree.map(jnp.shape, field) == jax.tree.map(jnp.shape, params)


def test_bf16_and_state_dtype():
    params = {"w": jnp.ones((3, 4), jnp.bfloat16)}
    opt = tom(LR, weight_decay=WD)
    state = opt.init(params)
    updates, state = jax.jit(opt.update)({"w": jnp.full((3, 4), 0.5, jnp.bfloat16)}, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    assert state[1].level["w"].dtype == jnp.float32
    assert scale_by_tom(state_dtype=jnp.bfloat16).init(params).nu["w"].dtype == jnp.bfloat16


def test_untraced_hyperparameters_match():
    """The plain Python-float path (no weight-decay transformation at all) gives the traced path's trajectory."""
    traj = run_jax(lambda: tom(LR, 0.8, 0.9, 0.99, 1e-3), jnp.float32)
    assert_close(traj, trajectory("betas_eps", "float32"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(b1=1.0), "b1"),
        (dict(b2=-0.1), "b2"),
        (dict(b3=1.5), "b3"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(level_trend_bias_correction="yes"), "level_trend_bias_correction"),
        (dict(state_dtype=jnp.int32), "state_dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tom(**kwargs)


def test_zero_hyperparameters_accepted():
    tom(learning_rate=optax.constant_schedule(1e-3), b1=0.0, b2=0.0, b3=0.0, eps=0.0)
