"""Eve against a NumPy float64 transcription of the official ``optax_eve.py`` (``juliuskunze/eve``), under the three
ways it receives examplewise statistics: per-example gradients, the mean plus ``grad_stats=``, and the statistics
of micro-batches combined with :func:`adabatch.stats.merge`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from adabatch.optimizers import ScaleByEveState, eve, evew, scale_by_eve
from adabatch.stats import GradStatsNeeds, declared_needs, from_per_example, merge

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
    from tests.reference_optimizers import ReferenceEve
except ImportError:  # tests/ is not a package: pytest puts the directory itself on sys.path
    from optimizer_harness import assert_close, in_dtype, rounded, run_jax, run_reference, schedule_fn, split_kwargs
    from reference_optimizers import ReferenceEve

# One xdist worker runs the whole file: the trajectories are cached and shared between tests.
pytestmark = pytest.mark.xdist_group("eve")

LR = 1e-2
EXAMPLES = 4
NUMERIC_DEFAULTS = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.0)

# name -> (kwargs of adabatch.evew, use a schedule); weight_decay=0 is adabatch.eve.
MODES = {
    "default": (dict(), False),
    "betas": (dict(b1=0.8, b2=0.99), False),
    "eps_root": (dict(eps=1e-3, eps_root=1e-3), False),
    "evew": (dict(weight_decay=1e-2), False),
    "schedule_evew": (dict(weight_decay=1e-2), True),
}


def feed_stats(per_example):
    stats = from_per_example(per_example, sq_sum=True)
    return stats.mean, {"grad_stats": stats}


def feed_merged(per_example):
    """Two micro-batches of 1 and 3 examples, merged: b must be the whole batch (4), not a micro-batch's."""
    parts = [jax.tree.map(lambda x, sl=sl: x[sl], per_example) for sl in (slice(0, 1), slice(1, None))]
    stats = merge(*(from_per_example(p, sq_sum=True) for p in parts))
    return stats.mean, {"grad_stats": stats}


FEEDS = {"per_example": None, "grad_stats": feed_stats, "merged": feed_merged}


@functools.cache
def reference(name: str, input_dtype: str = "float64") -> dict[str, np.ndarray]:
    kwargs, use_schedule = MODES[name]
    kw = rounded({"lr": LR, **NUMERIC_DEFAULTS, **kwargs}, input_dtype)
    return run_reference(lambda p: ReferenceEve(p, **kw), input_dtype, examples=EXAMPLES, use_schedule=use_schedule)


@functools.cache
def trajectory(name: str, dtype: str, feed: str = "per_example") -> dict[str, np.ndarray]:
    kwargs, use_schedule = MODES[name]
    static, numeric = split_kwargs({**NUMERIC_DEFAULTS, **kwargs})
    static["per_example"] = feed == "per_example"
    if use_schedule:
        static["learning_rate"] = schedule_fn
    else:
        numeric["learning_rate"] = LR
    run = functools.partial(
        run_jax, evew, jnp.dtype(dtype), static=static, numeric=numeric, examples=EXAMPLES, feed=FEEDS[feed]
    )
    traj = in_dtype(dtype, run)
    assert all(v.dtype == np.dtype(dtype) for v in traj.values())
    return traj


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float64(name):
    assert_close(trajectory(name, "float64"), reference(name), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float32(name):
    assert_close(trajectory(name, "float32"), reference(name, "float32"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("feed", ["grad_stats", "merged"])
@pytest.mark.parametrize("name", [n for n in MODES if not MODES[n][1]])
def test_grad_stats_and_merged_match_per_example_float64(name, feed):
    """The three inputs give one trajectory (float64: to rounding), and it is the official one."""
    traj = trajectory(name, "float64", feed)
    assert_close(traj, trajectory(name, "float64"), rtol=1e-12, atol=1e-14)
    assert_close(traj, reference(name), rtol=1e-10, atol=1e-12)


def test_grad_stats_float32():
    assert_close(trajectory("default", "float32", "grad_stats"), reference("default", "float32"), rtol=1e-5, atol=1e-7)


def test_float32_with_unrounded_inputs():
    assert_close(trajectory("default", "float32"), reference("default"), rtol=1e-4, atol=1e-6)


def test_modes_actually_differ():
    finals = {name: reference(name)["w"][-1] for name in MODES}
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-6, atol=0), (a, b)


def test_eve_alias_is_evew_without_decay():
    traj = run_jax(lambda: eve(LR, 0.8, 0.99, per_example=True), jnp.float32, examples=EXAMPLES)
    assert_close(traj, trajectory("betas", "float32"), rtol=1e-6, atol=1e-7)


def test_batch_size_is_the_count_of_the_statistics():
    """One step by hand: b = grad_stats.count enters as v/b + m^2 (1 - 1/b)."""
    g = jnp.array([[1.0, 2.0], [3.0, -2.0], [0.0, 1.0], [2.0, 0.0]])
    stats = from_per_example(g, sq_sum=True)
    tx = scale_by_eve(eps=0.0)
    update = jax.jit(tx.update)
    d, state = update(stats.mean, tx.init(jnp.zeros(2)), grad_stats=stats)
    mean, sq = np.asarray(g).mean(0), (np.asarray(g) ** 2).mean(0)
    np.testing.assert_allclose(d, mean / np.sqrt(sq / 4 + mean**2 * (1 - 1 / 4)), rtol=1e-6)
    # The same statistics labelled as a batch of 2 change the step: b is read, not guessed from shapes.
    d2, _ = update(stats.mean, tx.init(jnp.zeros(2)), grad_stats=stats._replace(count=jnp.asarray(2, jnp.int32)))
    # (s = sq_sum / count is then twice the mean square of the 4 examples.)
    np.testing.assert_allclose(d2, mean / np.sqrt(2 * sq / 2 + mean**2 * (1 - 1 / 2)), rtol=1e-6)
    assert isinstance(state, ScaleByEveState) and int(state.count) == 1
    np.testing.assert_allclose(state.nu, (1 - np.float32(0.999)) * sq, rtol=1e-6)


def test_first_moment_follows_incoming_updates():
    """With grad_stats, m_t follows ``updates`` (transformations chained before Eve apply), s_t the statistics."""
    g = jnp.array([[1.0, 2.0], [3.0, -2.0]])
    stats = from_per_example(g, sq_sum=True)
    tx = scale_by_eve()
    _, state = jax.jit(tx.update)(2 * stats.mean, tx.init(jnp.zeros(2)), grad_stats=stats)
    np.testing.assert_allclose(state.mu, 0.1 * 2 * stats.mean, rtol=1e-6)


def test_make_train_step_with_micro_batches_uses_the_whole_batch():
    """End to end: make_train_step sees the sq_sum declaration, accumulates the statistics of micro-batches of 3, 3
    and 2 examples, and Eve steps with b = 8, as the official step on the 8 per-example gradients does."""
    x = np.linspace(-1.0, 1.0, 16).reshape(8, 2)
    y = np.sin(np.arange(8.0))

    def losses(p, batch):
        xb, yb = batch
        return 0.5 * (xb @ p["w"] + p["c"] - yb) ** 2

    tx = evew(0.1, weight_decay=1e-2)
    step = adabatch.make_train_step(losses, tx, micro_batch_size=3)
    state = adabatch.init_train_state({"w": jnp.zeros(2), "c": jnp.zeros(())}, tx)
    ref = ReferenceEve({"w": np.zeros(2), "c": np.zeros(())}, lr=0.1, weight_decay=1e-2)
    for _ in range(4):
        state, metrics = step(state, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
        resid = x @ ref.params["w"] + ref.params["c"] - y  # per-example gradients of 0.5 * resid^2
        ref.step({"w": resid[:, None] * x, "c": resid})
    assert int(metrics["batch_size"]) == 8
    for k in ("w", "c"):
        np.testing.assert_allclose(state.params[k], ref.params[k], rtol=2e-5, atol=1e-7)


def test_declares_sq_sum():
    params = {"w": jnp.zeros(3)}
    state = evew().init(params)
    assert declared_needs(state) == GradStatsNeeds(sq_sum=True)
    assert adabatch.required_statistics(evew(), params, state) == (True, False)


def test_mean_gradient_alone_raises_and_says_what_is_needed():
    tx = eve()
    state = tx.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="grad_stats") as info:
        tx.update(jnp.ones(3), state)
    assert "per_example=True" in str(info.value) and "sq_sum" in str(info.value)
    with pytest.raises(ValueError, match="grad_stats"):
        jax.jit(tx.update)(jnp.ones(3), state)


def test_grad_stats_without_sq_sum_raises():
    stats = from_per_example(jnp.ones((2, 3)))
    tx = scale_by_eve()
    with pytest.raises(ValueError, match="sq_sum"):
        tx.update(stats.mean, tx.init(jnp.zeros(3)), grad_stats=stats)


def test_per_example_needs_a_shared_leading_axis():
    tx = scale_by_eve(per_example=True)
    with pytest.raises(ValueError, match="per-example"):
        tx.update({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}, tx.init({"a": jnp.zeros(3), "b": jnp.zeros(())}))


def test_bf16_per_example_updates_keep_dtype():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    tx = evew(LR, per_example=True)
    updates, state = jax.jit(tx.update)({"w": jnp.full((4, 3), 0.5, jnp.bfloat16)}, tx.init(params), params)
    assert updates["w"].dtype == jnp.bfloat16 and updates["w"].shape == (3,)
    assert state[0].mu["w"].dtype == jnp.float32
    assert scale_by_eve(state_dtype=jnp.bfloat16).init(params).nu["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(b1=1.0), "b1"),
        (dict(b1=-0.1), "b1"),
        (dict(b2=1.0), "b2"),
        (dict(eps=-1.0), "eps"),
        (dict(eps_root=-1e-8), "eps_root"),
        (dict(eps=float("nan")), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(per_example=1), "per_example"),
        (dict(state_dtype=jnp.int32), "state_dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        evew(**kwargs)


def test_zero_hyperparameters_accepted():
    eve(learning_rate=optax.constant_schedule(1e-3), b1=0.0, b2=0.0, eps=0.0)
