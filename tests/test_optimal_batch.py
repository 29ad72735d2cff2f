"""The learned optimal SGD batch size (Alfarra et al. 2020) against a float64 NumPy transcription of its equations
(``docs/rules/optimal_batch_rule.md``) over 100 steps of SGD with the rule's own step size on a noisy quadratic: the
decisions, the step sizes, the noise estimate and the parameters, under per-example gradients, ``grad_stats=``,
merged micro-batches and masked batches of 1 to 16 examples."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from adabatch.rules import (
    OptimalBatchRuleState,
    next_batch_size,
    optimal_batch_rule,
    optimal_batch_size,
    sgd_step_size,
)
from adabatch.stats import GradStatsNeeds, declared_needs, from_per_example, merge

try:
    from tests.optimizer_harness import x64_enabled
except ImportError:  # tests/ is not a package: pytest puts the directory itself on sys.path
    from optimizer_harness import x64_enabled

pytestmark = pytest.mark.xdist_group("optimal_batch")

STEPS = 100
ROWS = 16
SHAPES = {"w": (4, 5), "b": (3,)}
# n, L, L_max, μ, ε: τ* lands inside (1, n) for the noise of this problem (about 60 to 120).
CONSTANTS = dict(num_examples=256, smoothness=2.0, max_smoothness=8.0, strong_convexity=0.5, accuracy=0.05)
NUMERIC_DEFAULTS = dict(decay=0.9)
# name -> kwargs of optimal_batch_rule beyond CONSTANTS (floats traced, the rest static)
MODES = {
    "default": dict(),
    "no_memory": dict(decay=0.0),
    "variance": dict(estimator="variance"),
    "capped_monotone": dict(max_batch_size=48, granularity=4, monotone=True, test_interval=3, init_batch_size=8),
}
RECORDED = ("next_batch_size", "step_size", "noise", "optimal_batch", "nonfinite_count")


class ReferenceOptimalBatch:
    """The rule with ``apply_step_size=True`` and SGD (``optax.scale(-1)``), written out in NumPy float64."""

    def __init__(self, params, *, num_examples, smoothness, max_smoothness, strong_convexity, accuracy,
                 estimator="second_moment", decay=0.9, monotone=False, max_batch_size=50_000, init_batch_size=16,
                 granularity=1, test_interval=1):  # fmt: skip
        self.params = {k: np.array(v, np.float64) for k, v in params.items()}
        self.n, self.L, self.L_max = float(num_examples), smoothness, max_smoothness
        self.mu, self.eps = strong_convexity, accuracy
        self.estimator, self.decay, self.monotone = estimator, decay, monotone
        self.max_bs, self.granularity, self.test_interval = max_batch_size, granularity, test_interval
        self.count, self.num_estimates, self.ema, self.nonfinite = 0, 0, 0.0, 0
        self.next_batch_size, self.optimal_batch = init_batch_size, 1.0
        self.step_size = self.gamma(init_batch_size, 0.0)
        self.noise = 0.0

    def expected_smoothness(self, tau):  # L(τ) of τ-nice sampling
        n = self.n
        return n * (tau - 1) / (tau * (n - 1)) * self.L + (n - tau) / (tau * (n - 1)) * self.L_max

    def sigma(self, tau, h):  # σ(τ) = (n - τ) / (τ (n - 1)) h
        return (self.n - tau) / (tau * (self.n - 1)) * h

    def gamma(self, tau, h):  # min{1 / (2 L(τ)), ε μ / (4 σ(τ))}
        tau = min(max(tau, 1), self.n)
        s = self.sigma(tau, h)
        return min(1 / (2 * self.expected_smoothness(tau)), self.eps * self.mu / (4 * s) if s > 0 else math.inf)

    def tau_star(self, h):  # where 2 L(τ)/μ = 4 σ(τ)/(ε μ²), clipped to [1, n]
        n, em = self.n, self.eps * self.mu
        den = 2 * h + em * (n * self.L - self.L_max)
        return min(max(n * (2 * h + em * (self.L - self.L_max)) / den, 1.0), n) if den > 0 else 1.0

    def step(self, per_example):
        rows = np.concatenate([np.asarray(g, np.float64).reshape(len(g), -1) for g in per_example.values()], 1)
        b = len(rows)
        mean = rows.mean(0)
        q = float(np.sum(rows**2))
        if self.estimator == "second_moment":
            batch = q / b
        else:
            batch = max(q - b * float(np.sum(mean**2)), 0.0) / (b - 1) if b > 1 else math.nan
        finite = math.isfinite(batch)
        if finite:
            self.ema = self.decay * self.ema + (1 - self.decay) * batch
            self.num_estimates += 1
        else:
            self.nonfinite += 1
        self.noise = self.ema / (1 - self.decay**self.num_estimates) if self.num_estimates else 0.0
        self.step_size = self.gamma(b, self.noise)
        tau = self.tau_star(self.noise)
        proposed = math.ceil(min(tau, self.max_bs))
        if self.monotone:
            proposed = max(proposed, self.next_batch_size)
        proposed = min(-(-max(proposed, 1) // self.granularity) * self.granularity, self.max_bs)
        if self.count % self.test_interval == 0 and finite:
            self.next_batch_size, self.optimal_batch = proposed, tau
        self.count += 1
        for k, g in per_example.items():
            self.params[k] -= self.step_size * np.asarray(g, np.float64).mean(0)


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    curv = {k: rng.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()}
    noise = {k: 0.3 * rng.normal(size=(STEPS, ROWS, *s)) for k, s in SHAPES.items()}
    masks = rng.random((STEPS, ROWS)) < rng.uniform(0.1, 1.0, (STEPS, 1))
    masks[np.arange(STEPS), rng.integers(0, ROWS, STEPS)] = True
    masks[:2] = [[True] + [False] * (ROWS - 1)] * 2  # batches of one example (a NaN variance) at the start
    return params, curv, noise, masks


def kwargs_of(name):
    return {**CONSTANTS, **NUMERIC_DEFAULTS, **MODES[name]}


@functools.cache
def reference(name, input_dtype="float64", masked=True):
    cast = lambda x: np.asarray(x, input_dtype).astype(np.float64)  # noqa: E731
    params, curv, noise, masks = make_problem()
    params, curv, noise = (jax.tree.map(cast, t) for t in (params, curv, noise))
    kw = {k: float(np.dtype(input_dtype).type(v)) if isinstance(v, float) else v for k, v in kwargs_of(name).items()}
    ref = ReferenceOptimalBatch(params, **kw)
    out = {k: np.empty((STEPS, *s)) for k, s in SHAPES.items()} | {k: np.empty(STEPS) for k in RECORDED}
    for t in range(STEPS):
        g = {k: (curv[k] * ref.params[k])[None] + noise[k][t] for k in SHAPES}
        ref.step({k: v[masks[t]] for k, v in g.items()} if masked else g)
        for k in SHAPES:
            out[k][t] = ref.params[k]
        out["next_batch_size"][t], out["step_size"][t] = ref.next_batch_size, ref.step_size
        out["noise"][t], out["optimal_batch"][t], out["nonfinite_count"][t] = (
            ref.noise,
            ref.optimal_batch,
            ref.nonfinite,
        )
    return out


def feed_stats(per_example, mask):
    stats = from_per_example(per_example, mask=mask)
    return stats.mean, {"grad_stats": stats}


def feed_merged(per_example, mask):
    parts = [(jax.tree.map(lambda x, sl=sl: x[sl], per_example), mask[sl]) for sl in (slice(0, 5), slice(5, None))]
    stats = merge(*(from_per_example(p, mask=m) for p, m in parts))
    return stats.mean, {"grad_stats": stats}


FEEDS = {"per_example": None, "grad_stats": feed_stats, "merged": feed_merged}


@functools.cache
def _compiled(static_items, feed_name):
    static = dict(static_items)
    feed = FEEDS[feed_name]

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(p0, curv, noise, masks, hp):
        rule = optimal_batch_rule(**static, **hp, apply_step_size=True, per_example=feed is None)
        tx = optax.chain(rule, optax.scale(-1.0))

        def body(carry, inputs):
            p, state = carry
            n, mask = inputs
            g = jax.tree.map(lambda a, x, e: (a * x)[None] + e, curv, p, n)
            updates, extra = (g, {}) if feed is None else feed(g, mask)
            updates, state = tx.update(updates, state, p, **extra)
            p = optax.apply_updates(p, updates)
            return (p, state), (p, {k: getattr(state[0], k) for k in RECORDED})

        _, (traj, recorded) = jax.lax.scan(body, (p0, tx.init(p0)), (noise, masks))
        return traj | recorded

    return run


@functools.cache
def trajectory(name, dtype, feed="grad_stats", masked=True):
    kwargs = kwargs_of(name)
    static = tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, float)))
    numeric = {k: v for k, v in kwargs.items() if isinstance(v, float)}

    def go():
        params, curv, noise, masks = make_problem()
        params, curv, noise = (jax.tree.map(lambda x: jnp.asarray(x, dtype), t) for t in (params, curv, noise))
        masks = masks if masked else np.ones_like(masks)
        hp = {k: jnp.asarray(v, dtype) for k, v in numeric.items()}
        out = _compiled(static, feed)(params, curv, noise, jnp.asarray(masks), hp)
        return jax.tree.map(np.asarray, out)

    if dtype == "float64":
        with x64_enabled():
            return go()
    return go()


def assert_close(actual, expected, rtol, atol, decisions_atol=0):
    for k in SHAPES:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=k)
    for k in ("step_size", "noise", "optimal_batch"):
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=k)
    for k in ("next_batch_size", "nonfinite_count"):
        np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=decisions_atol, err_msg=k)


@pytest.mark.parametrize("name", list(MODES))
def test_matches_reference_float64(name):
    assert_close(trajectory(name, "float64"), reference(name), rtol=1e-10, atol=1e-12)


def test_the_run_exercises_the_formulas():
    """The decisions move inside (1, n), the noise term of the step size binds, the cap binds, and the variance
    estimator skips the batches of one example."""
    ref = reference("default")
    assert 1 < ref["optimal_batch"].min() and ref["optimal_batch"].max() < CONSTANTS["num_examples"]
    assert len(set(ref["next_batch_size"])) > 5
    assert int(reference("variance")["nonfinite_count"][-1]) >= 2
    capped = reference("capped_monotone")
    assert capped["next_batch_size"].max() == 48 and np.all(np.diff(capped["next_batch_size"]) >= 0)
    n = CONSTANTS["num_examples"]
    assert np.any(ref["step_size"] < 1 / (2 * CONSTANTS["max_smoothness"]) * (n - 1) / n)  # εμ/(4σ) < 1/(2L(b))


@pytest.mark.parametrize("feed", ["per_example", "grad_stats", "merged"])
def test_per_example_grad_stats_and_merged_agree_float64(feed):
    """Unmasked batches of 16: the three inputs give one run, and it is the reference."""
    traj = trajectory("default", "float64", feed, masked=False)
    assert_close(traj, reference("default", masked=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["default", "variance"])
def test_matches_reference_float32(name):
    traj = trajectory(name, "float32")
    assert traj["w"].dtype == np.float32 and traj["step_size"].dtype == np.float32
    # A ceil of a float32 τ* may land one above or below the float64 one at a boundary.
    assert_close(traj, reference(name, "float32"), rtol=1e-4, atol=1e-6, decisions_atol=1)


def test_formulas_by_hand():
    kw = dict(num_examples=100, smoothness=1.0, max_smoothness=10.0, strong_convexity=0.1, accuracy=0.01)
    assert float(optimal_batch_size(0.0, **kw)) == 1.0  # no noise: batches of one
    assert float(optimal_batch_size(1e9, **kw)) == pytest.approx(100.0)  # noise only: the whole data
    h = 1.0
    tau = 100 * (2 + 0.001 * (1 - 10)) / (2 + 0.001 * (100 - 10))
    np.testing.assert_allclose(float(optimal_batch_size(h, **kw)), tau, rtol=1e-6)
    # At τ* the two terms of the step size are equal.
    ref = ReferenceOptimalBatch({}, **kw)
    np.testing.assert_allclose(1 / (2 * ref.expected_smoothness(tau)), 0.001 / (4 * ref.sigma(tau, h)), rtol=1e-12)
    np.testing.assert_allclose(float(sgd_step_size(tau, h, **kw)), ref.gamma(tau, h), rtol=1e-6)
    assert float(sgd_step_size(100, h, **kw)) == pytest.approx(0.5)  # τ = n: full gradient, 1/(2L)


def test_returns_the_mean_and_keeps_the_step_size_in_the_state():
    tx = optimal_batch_rule(**CONSTANTS, decay=0.0, per_example=True)
    g = {"w": jnp.array([[1.0, 2.0], [3.0, -2.0], [0.0, 1.0]])}
    mean, state = jax.jit(tx.update)(g, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_allclose(mean["w"], np.asarray(g["w"]).mean(0), rtol=1e-6)
    assert isinstance(state, OptimalBatchRuleState)
    np.testing.assert_allclose(float(state.noise), float(np.sum(np.asarray(g["w"]) ** 2) / 3), rtol=1e-6)
    np.testing.assert_allclose(float(state.step_size), float(sgd_step_size(3, state.noise, **CONSTANTS)), rtol=1e-6)
    assert int(next_batch_size(state)) == math.ceil(float(optimal_batch_size(state.noise, **CONSTANTS)) - 1e-4)
    assert declared_needs(state) == GradStatsNeeds()


def test_zero_gradients_give_no_nan():
    tx = optimal_batch_rule(**CONSTANTS, estimator="variance")
    stats = from_per_example({"w": jnp.zeros((4, 3))})
    _, state = jax.jit(tx.update)(stats.mean, tx.init({"w": jnp.zeros(3)}), grad_stats=stats)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in state[:-1])
    assert int(next_batch_size(state)) == 1 and float(state.step_size) == pytest.approx(
        float(sgd_step_size(4, 0.0, **CONSTANTS))
    )


def test_make_train_step_feeds_the_decided_size():
    """End to end in the training step (no per-leaf statistics needed): the decision reaches the next batch."""
    x = np.linspace(-1.0, 1.0, 64).reshape(32, 2).astype(np.float32)
    y = np.sin(np.arange(32.0)).astype(np.float32)

    def losses(p, batch):
        xb, yb = batch
        return 0.5 * (xb @ p["w"] - yb) ** 2

    tx = optax.chain(
        optimal_batch_rule(32, 1.0, 2.0, 0.1, 0.1, max_batch_size=32, init_batch_size=4, decay=0.0),
        optax.sgd(0.1),
    )
    step = adabatch.make_train_step(losses, tx)
    state = adabatch.init_train_state({"w": jnp.zeros(2)}, tx)
    state, metrics = step(state, (jnp.asarray(x[:4]), jnp.asarray(y[:4])))
    expected = optimal_batch_size(float(np.mean(np.sum((x[:4] * (-y[:4, None])) ** 2, 1))), num_examples=32,
                                  smoothness=1.0, max_smoothness=2.0, strong_convexity=0.1, accuracy=0.1)  # fmt: skip
    assert int(adabatch.next_batch_size(state.opt_state)) == math.ceil(float(expected))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_examples=0), "num_examples"),
        (dict(num_examples=1), "num_examples"),
        (dict(num_examples=2.5), "num_examples"),
        (dict(smoothness=-1.0), "smoothness"),
        (dict(smoothness=0.0), "smoothness"),
        (dict(max_smoothness=1.0), "max_smoothness"),  # below L = 2
        (dict(max_smoothness=1e6), "max_smoothness"),  # above n L
        (dict(strong_convexity=0.0), "strong_convexity"),
        (dict(strong_convexity=3.0), "strong_convexity"),  # above L
        (dict(accuracy=-0.1), "accuracy"),
        (dict(accuracy=float("inf")), "accuracy"),
        (dict(estimator="table"), "estimator"),
        (dict(decay=1.0), "decay"),
        (dict(decay=-0.5), "decay"),
        (dict(apply_step_size=1), "apply_step_size"),
        (dict(monotone="no"), "monotone"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(init_batch_size=1), "init_batch_size"),
        (dict(init_batch_size=300, max_batch_size=400), "init_batch_size"),  # above n = 256
        (dict(granularity=0), "granularity"),
        (dict(test_interval=-1), "test_interval"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        optimal_batch_rule(**{**CONSTANTS, **kwargs})


def test_flat_names():
    assert adabatch.optimal_batch_rule is optimal_batch_rule
    assert adabatch.OptimalBatchRuleState is OptimalBatchRuleState
