"""The common suite, run over every public transformation (registry-driven, design.md §6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch


class Entry:
    def __init__(self, factory, kwargs, per_example=False, step=None):
        """``step``: for a transformation that does not descend by itself (a ``scale_by_*`` or a rule), the
        learning rate of the ``optax.scale(-step)`` chained after it in the convergence test."""
        self.factory, self.kwargs, self.per_example, self.step = factory, kwargs, per_example, step

    def make(self):
        return self.factory(**self.kwargs)


RULE_KW = dict(max_batch_size=1024, init_batch_size=8)
REGISTRY = {
    "norm_test": Entry(adabatch.norm_test, dict(eta=0.5, **RULE_KW), per_example=True, step=0.05),
    "inner_product_test": Entry(adabatch.inner_product_test, dict(theta=0.5, **RULE_KW), per_example=True, step=0.05),
    "orthogonality_test": Entry(adabatch.orthogonality_test, dict(nu=0.5, **RULE_KW), per_example=True, step=0.05),
    "augmented_inner_product_test": Entry(
        adabatch.augmented_inner_product_test, dict(theta=0.5, nu=0.5, **RULE_KW), per_example=True, step=0.05
    ),
    "coordinate_norm_test": Entry(adabatch.coordinate_norm_test, dict(eta=0.5, **RULE_KW), per_example=True, step=0.05),
    "scale_by_adagrad": Entry(adabatch.scale_by_adagrad, dict(), step=0.5),
    "scale_by_adagrad_norm": Entry(adabatch.scale_by_adagrad_norm, dict(), step=0.5),
    "scale_by_belief": Entry(adabatch.scale_by_belief, dict(), step=0.05),
    "adagrad": Entry(adabatch.adagrad, dict(learning_rate=0.5)),
    "adagrad_norm": Entry(adabatch.adagrad_norm, dict(learning_rate=0.5)),
    "adabelief": Entry(adabatch.adabelief, dict(learning_rate=0.05)),
    "adadagrad": Entry(adabatch.adadagrad, dict(learning_rate=0.5, eta=0.5, **RULE_KW), per_example=True),
    "adadagrad_norm": Entry(adabatch.adadagrad_norm, dict(learning_rate=0.5, eta=0.5, **RULE_KW), per_example=True),
}
NAMES = sorted(REGISTRY)
B = 8


def _params(dtype=jnp.float32):
    return {"w": jnp.full((3, 2), 0.5, dtype), "b": jnp.full((2,), -0.5, dtype)}


def _gradients(entry, params, seed=0):
    """Per-example gradients of a least-squares loss (leading axis B), or their mean."""
    key = jax.random.key(seed)
    x = jax.random.normal(key, (B, 3))
    y = jax.random.normal(jax.random.fold_in(key, 1), (B, 2))

    def loss(p, xi, yi):
        return 0.5 * jnp.sum((xi @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32) - yi) ** 2)

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    g = jax.tree_util.tree_map(lambda a, p: a.astype(p.dtype), g, params)
    return g if entry.per_example else jax.tree_util.tree_map(lambda a: jnp.mean(a, 0), g)


def _float_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_finite_state(name):
    entry = REGISTRY[name]
    tx, params = entry.make(), _params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for seed in range(3):
        updates, state = update(_gradients(entry, params, seed), state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in _float_leaves(state) + _float_leaves(updates))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_kept(name, dtype):
    entry = REGISTRY[name]
    tx, params = entry.make(), _params(dtype)
    updates, _ = tx.update(_gradients(entry, params), tx.init(params), params)
    for u, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params), strict=True):
        assert u.dtype == dtype and u.shape == p.shape


@pytest.mark.parametrize("name", NAMES)
def test_unknown_extra_arguments_accepted(name):
    entry = REGISTRY[name]
    tx, params = entry.make(), _params()
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    expected, _ = tx.update(_gradients(entry, params), tx.init(params), params)
    actual, _ = tx.update(_gradients(entry, params), tx.init(params), params, some_unknown=1.0, value=jnp.ones(()))
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("name", NAMES)
def test_no_recompilation_on_second_call(name):
    entry = REGISTRY[name]
    tx, params = entry.make(), _params()
    traces = []

    @jax.jit
    def update(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    state = tx.init(params)
    for seed in range(3):
        _, state = update(_gradients(entry, params, seed), state, params)
    assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_inside_chain_and_inject_hyperparams(name):
    entry = REGISTRY[name]
    params = _params()
    grads = _gradients(entry, params)
    plain = entry.make()
    expected, _ = plain.update(grads, plain.init(params), params)
    chained = optax.chain(plain, optax.scale(2.0)) if entry.per_example else optax.chain(optax.identity(), plain)
    actual, _ = chained.update(grads, chained.init(params), params)
    factor = 2.0 if entry.per_example else 1.0
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, factor * e, rtol=1e-6)
    injected = optax.inject_hyperparams(entry.factory)(**entry.kwargs)
    state = injected.init(params)
    actual, state = jax.jit(injected.update)(grads, state, params)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
    if entry.per_example:
        assert int(adabatch.next_batch_size(state)) == int(
            adabatch.next_batch_size(plain.update(grads, plain.init(params))[1])
        )


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_a_small_problem(name):
    entry = REGISTRY[name]
    tx = entry.make()
    if entry.step is not None:
        tx = optax.chain(tx, optax.scale(-entry.step))
    params = _params()
    state = tx.init(params)
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = x @ jnp.array([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]]) + 0.3

    def losses(p, idx):
        return 0.5 * jnp.sum((x[idx] @ p["w"] + p["b"] - y[idx]) ** 2, axis=-1)

    @jax.jit
    def step(p, s, idx):
        per_example = jax.vmap(jax.grad(lambda q, i: losses(q, i[None])[0]), in_axes=(None, 0))(p, idx)
        g = per_example if entry.per_example else jax.tree_util.tree_map(lambda a: jnp.mean(a, 0), per_example)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    start = float(jnp.mean(losses(params, jnp.arange(64))))
    for k in range(300):
        params, state = step(params, state, (jnp.arange(B) + B * k) % 64)
    assert float(jnp.mean(losses(params, jnp.arange(64)))) < 0.05 * start
