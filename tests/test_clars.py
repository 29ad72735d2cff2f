"""CLARS against a float64 NumPy transcription of its equations (``docs/optimizers/clars.md``) over 100 steps of a noisy
quadratic with several leaves, under per-example gradients, ``grad_stats=``, merged micro-batches and masked batches
of 1 to 6 examples; the per-leaf statistics ``leaf_sq_norm_sum`` it reads are exact under vmap, ghost, chunks and
``merge``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from adabatch import ghost
from adabatch.optimizers import ScaleByClarsState, clars, scale_by_clars
from adabatch.stats import (
    GradStatsNeeds,
    declared_needs,
    from_per_example,
    grad_stats,
    leaf_norm_ratio,
    merge,
    per_example_grads,
)

try:
    from tests.optimizer_harness import x64_enabled
except ImportError:  # tests/ is not a package: pytest puts the directory itself on sys.path
    from optimizer_harness import x64_enabled

pytestmark = pytest.mark.xdist_group("clars")

STEPS = 100
EXAMPLES = 6
# Leaves with different signal-to-noise ratios, and "z" whose gradient is always exactly zero (q_l = 0).
SHAPES = {"w": (4, 5), "b": (5,), "s": (), "z": (3,)}
NOISE = {"w": 0.3, "b": 2.0, "s": 0.05, "z": 0.0}
LR = 0.02
NUMERIC_DEFAULTS = dict(momentum=0.9, weight_decay=0.0)
# name -> kwargs of adabatch.clars (numbers traced, flags static)
MODES = {
    "default": dict(),
    "no_momentum": dict(momentum=0.0),
    "no_linear_scaling": dict(linear_scaling=False),
    "debias": dict(debias=True),
    "nesterov_decay": dict(nesterov=True, weight_decay=1e-2),
}


class ReferenceClars:
    """The step of ``clars`` written out per leaf in NumPy float64 (docs/optimizers/clars.md, "Update equations")."""

    def __init__(self, params, lr, momentum=0.9, nesterov=False, weight_decay=0.0, linear_scaling=True, debias=False):
        self.params = {k: np.array(v, np.float64) for k, v in params.items()}
        self.lr, self.momentum, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
        self.linear_scaling, self.debias = linear_scaling, debias
        self.trace = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.scale: dict[str, float] = {}

    def step(self, per_example):
        for k, p in self.params.items():
            g = np.asarray(per_example[k], np.float64)
            b = g.shape[0]
            mean = g.mean(axis=0)
            q = float(np.sum(g**2))  # Σ_i ‖g_{i,l}‖²
            rho = min(float(np.sum(mean**2)) / (q / b), 1.0) if q > 0 else 1.0  # ‖ḡ_l‖² / ((1/b) Σ_i ‖g_{i,l}‖²)
            if self.debias and b > 1:
                rho = min(max((b * rho - 1) / (b - 1), 0.0), 1.0)
            s = b * rho if self.linear_scaling else rho
            self.scale[k] = s
            u = -self.lr * (s * mean + self.wd * p)
            self.trace[k] = u + self.momentum * self.trace[k]
            p += u + self.momentum * self.trace[k] if self.nesterov else self.trace[k]


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    curv = {k: rng.uniform(0.5, 2.0, size=s) * (k != "z") for k, s in SHAPES.items()}
    noise = {k: NOISE[k] * rng.normal(size=(STEPS, EXAMPLES, *s)) for k, s in SHAPES.items()}
    masks = rng.random((STEPS, EXAMPLES)) < 0.5
    masks[np.arange(STEPS), rng.integers(0, EXAMPLES, STEPS)] = True  # at least one example; b = 1 happens
    masks[:3] = [[True] + [False] * (EXAMPLES - 1)] * 3  # and surely at the start
    return params, curv, noise, masks


def per_example_grads_of(curv, params, noise):
    return {k: (curv[k] * params[k])[None] + noise[k] for k in SHAPES}


def run_reference(kwargs, input_dtype="float64", masked=False):
    cast = lambda x: np.asarray(x, input_dtype).astype(np.float64)  # noqa: E731
    params, curv, noise, masks = make_problem()
    params, curv, noise = (jax.tree.map(cast, t) for t in (params, curv, noise))
    hp = {**NUMERIC_DEFAULTS, **kwargs}
    hp = {k: float(np.dtype(input_dtype).type(v)) if isinstance(v, float) else v for k, v in hp.items()}
    ref = ReferenceClars(params, float(np.dtype(input_dtype).type(LR)), **hp)
    traj = {k: np.empty((STEPS, *s)) for k, s in SHAPES.items()}
    for t in range(STEPS):
        g = per_example_grads_of(curv, ref.params, {k: noise[k][t] for k in SHAPES})
        if masked:
            g = {k: v[masks[t]] for k, v in g.items()}
        ref.step(g)
        for k in SHAPES:
            traj[k][t] = ref.params[k]
    return traj


def feed_stats(per_example, mask):
    del mask
    stats = from_per_example(per_example, leaf_sq_norm_sum=True)
    return stats.mean, {"grad_stats": stats}


def feed_merged(per_example, mask):
    """Micro-batches of 2 and 4 examples merged: the statistics of the whole batch."""
    del mask
    parts = [jax.tree.map(lambda x, sl=sl: x[sl], per_example) for sl in (slice(0, 2), slice(2, None))]
    stats = merge(*(from_per_example(p, leaf_sq_norm_sum=True) for p in parts))
    return stats.mean, {"grad_stats": stats}


def feed_masked(per_example, mask):
    """Only the examples of ``mask`` count (1 to 6 of them): b = the number of real examples."""
    stats = from_per_example(per_example, mask=mask, leaf_sq_norm_sum=True)
    return stats.mean, {"grad_stats": stats}


FEEDS = {"per_example": None, "grad_stats": feed_stats, "merged": feed_merged, "masked": feed_masked}


@functools.cache
def _compiled(static_items, feed_name):
    static = dict(static_items)
    feed = FEEDS[feed_name]

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(p0, curv, noise, masks, hp):
        opt = clars(**static, **hp, per_example=feed is None)

        def body(carry, inputs):
            p, state = carry
            n, mask = inputs
            g = jax.tree.map(lambda a, x, e: (a * x)[None] + e, curv, p, n)
            updates, extra = (g, {}) if feed is None else feed(g, mask)
            updates, state = opt.update(updates, state, p, **extra)
            p = optax.apply_updates(p, updates)
            return (p, state), p

        _, traj = jax.lax.scan(body, (p0, opt.init(p0)), (noise, masks))
        return traj

    return run


@functools.cache
def trajectory(name, dtype, feed="per_example"):
    kwargs = {**NUMERIC_DEFAULTS, **MODES[name]}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, bool)))
    numeric = {k: v for k, v in kwargs.items() if not isinstance(v, bool)}

    def go():
        params, curv, noise, masks = make_problem()
        params, curv, noise = (jax.tree.map(lambda x: jnp.asarray(x, dtype), t) for t in (params, curv, noise))
        hp = {k: jnp.asarray(v, dtype) for k, v in {**numeric, "learning_rate": LR}.items()}
        out = _compiled(static, feed)(params, curv, noise, jnp.asarray(masks), hp)
        return jax.tree.map(np.asarray, out)

    if dtype == "float64":
        with x64_enabled():
            return go()
    return go()


@functools.cache
def reference(name, input_dtype="float64", masked=False):
    return run_reference(MODES[name], input_dtype, masked)


def assert_close(actual, expected, rtol, atol):
    for k in SHAPES:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float64(name):
    assert_close(trajectory(name, "float64"), reference(name), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("feed", ["grad_stats", "merged"])
def test_grad_stats_and_merged_equal_per_example_float64(feed):
    traj = trajectory("default", "float64", feed)
    assert_close(traj, trajectory("default", "float64"), rtol=1e-12, atol=1e-14)
    assert_close(traj, reference("default"), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["default", "debias"])
def test_masked_batches_of_one_to_six_examples_float64(name):
    """b = the number of real examples, 1 included (no division by b - 1 = 0, no NaN)."""
    traj = trajectory(name, "float64", "masked")
    assert all(np.all(np.isfinite(v)) for v in traj.values())
    assert_close(traj, reference(name, masked=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("feed", ["per_example", "grad_stats"])
def test_matches_reference_float32(feed):
    traj = trajectory("default", "float32", feed)
    assert all(v.dtype == np.float32 for v in traj.values())
    assert_close(traj, reference("default", "float32"), rtol=1e-4, atol=1e-6)


def test_modes_actually_differ():
    finals = {name: np.concatenate([reference(name)[k][-1].ravel() for k in SHAPES]) for name in MODES}
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-6, atol=0), (a, b)


def test_zero_gradients_and_single_example_give_no_nan():
    tx = scale_by_clars(debias=True)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(())}
    update = jax.jit(tx.update)
    for g in ({"a": jnp.zeros((4, 3)), "b": jnp.zeros((4,))}, {"a": jnp.ones((1, 3)), "b": jnp.zeros((1,))}):
        stats = from_per_example(g, leaf_sq_norm_sum=True)
        d, state = update(stats.mean, tx.init(params), grad_stats=stats)
        for x in jax.tree.leaves((d, state.ratio, state.scale)):
            assert bool(jnp.all(jnp.isfinite(x)))
        assert float(state.ratio["b"]) == 1.0  # q_l = 0: the noise-free limit
    assert float(state.ratio["a"]) == 1.0 and float(state.scale["a"]) == 1.0  # b = 1: ratio 1, times b = 1
    np.testing.assert_allclose(d["a"], np.ones(3))


def test_ratio_and_scale_by_hand():
    g = {"w": jnp.array([[1.0, 2.0], [3.0, 2.0], [-1.0, 0.0]])}
    stats = from_per_example(g, leaf_sq_norm_sum=True)
    rows = np.asarray(g["w"], np.float64)
    rho = np.sum(rows.mean(0) ** 2) / (np.sum(rows**2) / 3)
    np.testing.assert_allclose(leaf_norm_ratio(stats)["w"], rho, rtol=1e-6)
    np.testing.assert_allclose(leaf_norm_ratio(stats, debias=True)["w"], (3 * rho - 1) / 2, rtol=1e-6)
    tx = scale_by_clars(linear_scaling=False)
    d, state = jax.jit(tx.update)(stats.mean, tx.init({"w": jnp.zeros(2)}), grad_stats=stats)
    np.testing.assert_allclose(d["w"], rho * rows.mean(0), rtol=1e-6)
    assert isinstance(state, ScaleByClarsState) and int(state.count) == 1
    # The scale multiplies the incoming updates (e.g. from a transformation chained before), not the stats' mean.
    d2, _ = jax.jit(tx.update)({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}), grad_stats=stats)
    np.testing.assert_allclose(d2["w"], [rho, rho], rtol=1e-6)


def test_declares_leaf_sq_norm_sum():
    params = {"w": jnp.zeros(3)}
    assert declared_needs(clars(0.1).init(params)) == GradStatsNeeds(leaf_sq_norm_sum=True)


def test_mean_gradient_alone_raises_and_says_what_is_needed():
    tx = clars(0.1)
    state = tx.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="grad_stats") as info:
        tx.update(jnp.ones(3), state, jnp.zeros(3))
    assert "per_example=True" in str(info.value) and "leaf_sq_norm_sum" in str(info.value)


def test_grad_stats_without_leaf_sums_raises():
    stats = from_per_example(jnp.ones((2, 3)), sq_sum=True)
    tx = scale_by_clars()
    with pytest.raises(ValueError, match="leaf_sq_norm_sum"):
        tx.update(stats.mean, tx.init(jnp.zeros(3)), grad_stats=stats)


def test_bf16_per_example_updates_keep_dtype():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    tx = clars(LR, per_example=True)
    updates, state = jax.jit(tx.update)({"w": jnp.full((4, 3), 0.5, jnp.bfloat16)}, tx.init(params), params)
    assert updates["w"].dtype == jnp.bfloat16 and updates["w"].shape == (3,)
    assert state[0].scale["w"].dtype == jnp.float32
    assert scale_by_clars(state_dtype=jnp.bfloat16).init(params).ratio["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(nesterov=1), "nesterov"),
        (dict(linear_scaling="yes"), "linear_scaling"),
        (dict(debias=1), "debias"),
        (dict(per_example=1), "per_example"),
        (dict(state_dtype=jnp.int32), "state_dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        clars(**{"learning_rate": 0.1, **kwargs})


def test_zero_hyperparameters_and_schedules_accepted():
    clars(learning_rate=optax.constant_schedule(1e-3), momentum=0.0, weight_decay=0.0)
    clars(0.0)


# ---------------------------------------------------------------------------------------------------------------
# The per-leaf statistics it reads: exact for every producer, additive under merge.


def _ghost_problem(key, b=6, t=5):
    k = jax.random.split(key, 7)
    params = {
        "d1": {"kernel": jax.random.normal(k[0], (4, 6)), "bias": jax.random.normal(k[1], (6,))},
        "ln": {"scale": jax.random.normal(k[2], (6,))},
        "emb": jax.random.normal(k[3], (7, 6)),
        "d2": {"kernel": jax.random.normal(k[4], (6, 3))},
        "raw": jnp.ones((3,)),  # used outside any captured layer: vmap fallback
        "unused": jnp.ones((2,)),
    }

    def loss_fn(p, batch):
        x, ids = batch
        h = ghost.dense(x, p["d1"]["kernel"], p["d1"]["bias"])  # sequence axis: direct or Gram form
        h = ghost.layer(lambda q, z: z * q["scale"], p["ln"], jnp.tanh(h)) + ghost.embed(p["emb"], ids)
        out = ghost.dense(jnp.mean(h, axis=1), p["d2"]["kernel"])  # no sequence axis
        return jnp.sum(jnp.sin(out) * p["raw"], axis=-1)

    batch = (jax.random.normal(k[5], (b, t, 4)), jax.random.randint(k[6], (b, t), 0, 7))
    return loss_fn, params, batch


@pytest.mark.parametrize("form", [None, "direct", "gram"])  # the cost model's choice, or one form everywhere
def test_leaf_sums_exact_for_vmap_ghost_chunks_and_merge(form):
    loss_fn, params, batch = _ghost_problem(jax.random.key(0))
    mask = jnp.array([1, 1, 0, 1, 1, 1], jnp.float32)

    @jax.jit
    def run(p, b):
        grads = per_example_grads(loss_fn, p, b)
        out = {
            f"{method}{chunk}": grad_stats(
                loss_fn, p, b, method=method, mask=mask, chunk_size=chunk, leaf_sq_norm_sum=True, **forced
            )
            for method, forced in (("vmap", {}), ("ghost", {"ghost_form": form}))
            for chunk in (None, 4)
        }
        halves = [jax.tree.map(lambda x, sl=sl: x[sl], b) for sl in (slice(0, 2), slice(2, None))]
        masks = (mask[:2], mask[2:])
        parts = [
            grad_stats(loss_fn, p, h, method="ghost", mask=m, leaf_sq_norm_sum=True, ghost_form=form)
            for h, m in zip(halves, masks, strict=True)
        ]
        out["merged"] = merge(*parts)
        out["lean"] = grad_stats(loss_fn, p, b, method="ghost", mask=mask)
        return grads, out

    grads, out = run(params, batch)
    w = np.asarray(mask, np.float64)
    expected = jax.tree.map(
        lambda g: np.sum(np.asarray(g, np.float64) ** 2 * w.reshape(-1, *[1] * (g.ndim - 1))), grads
    )
    assert out.pop("lean").leaf_sq_norm_sum is None  # only computed when asked
    for name, stats in out.items():
        assert jax.tree.structure(stats.leaf_sq_norm_sum) == jax.tree.structure(params), name
        for got, want in zip(jax.tree.leaves(stats.leaf_sq_norm_sum), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(stats.sq_norm_sum, sum(jax.tree.leaves(expected)), rtol=2e-5, err_msg=name)
    assert float(out["vmapNone"].leaf_sq_norm_sum["unused"]) == 0.0


def test_leaf_sums_not_available_from_group_means():
    loss_fn = lambda w, x: x @ w  # noqa: E731
    with pytest.raises(ValueError, match="microbatch"):
        grad_stats(loss_fn, jnp.zeros(2), jnp.ones((4, 2)), method="microbatch", leaf_sq_norm_sum=True)


def test_flat_names():
    assert adabatch.clars is clars and adabatch.scale_by_clars is scale_by_clars
    assert adabatch.ScaleByClarsState is ScaleByClarsState
