"""AdaGrad and AdaGrad-Norm against the paper's equations transcribed in NumPy (tests/reference.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from tests import reference as ref

STEPS = 50


def _gradient_stream(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(7).astype(dtype) * (1 + 0.1 * k) for k in range(STEPS)]


def _run(tx, grads, dtype):
    params = jnp.zeros(7, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(jnp.asarray(g), state, params)
        out.append(np.asarray(u, np.float64))
    return out


@pytest.mark.parametrize(
    "make,reference",
    [
        (lambda: adabatch.adagrad(0.05), lambda g: ref.adagrad(g, 0.05)),
        (lambda: adabatch.adagrad(0.05, 0.3, 1e-6), lambda g: ref.adagrad(g, 0.05, 0.3, 1e-6)),
        (lambda: adabatch.adagrad_norm(0.05), lambda g: ref.adagrad_norm(g, 0.05)),
        (lambda: adabatch.adagrad_norm(0.05, 0.0, 1e-8), lambda g: ref.adagrad_norm(g, 0.05, 0.0, 1e-8)),
    ],
)
def test_matches_paper_equations(dtype, make, reference):
    grads = _gradient_stream(dtype)
    actual, expected = _run(make(), grads, dtype), reference(grads)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=0)


def test_adagrad_norm_is_one_scalar_over_all_leaves():
    tx = adabatch.adagrad_norm(1.0, 0.0)
    g = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}
    u, state = tx.update(g, tx.init(g))
    assert float(state[0].sum_of_squares) == 25.0
    np.testing.assert_allclose([float(u["a"][0]), float(u["b"][0, 0])], [-0.6, -0.8], rtol=1e-6)


def test_adagrad_norm_per_leaf():
    tx = adabatch.adagrad_norm(1.0, 0.0, per="leaf")
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([2.0])}
    u, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["a"], [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(u["b"], [-1.0], rtol=1e-6)
    assert float(state[0].sum_of_squares["a"]) == 25.0


def test_differs_from_optax_adagrad_as_documented():
    g = jnp.array([3.0, -4.0])
    ours = adabatch.adagrad(1.0)
    theirs = optax.adagrad(1.0)
    u_ours = ours.update(g, ours.init(g))[0]
    u_theirs = theirs.update(g, theirs.init(g))[0]
    np.testing.assert_allclose(u_ours, [-1.0, 1.0], rtol=1e-6)  # torch: v0 = 0, eps outside
    np.testing.assert_allclose(u_theirs, -g / np.sqrt(0.1 + g**2 + 1e-7), rtol=1e-6)  # optax: v0 = 0.1


def test_bf16_updates_keep_dtype_and_float32_accumulators():
    g = jnp.ones(4, jnp.bfloat16)
    for tx in (adabatch.scale_by_adagrad(), adabatch.scale_by_adagrad_norm()):
        u, state = tx.update(g, tx.init(g))
        assert u.dtype == jnp.bfloat16
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: adabatch.adagrad(-0.1), "learning_rate"),
        (lambda: adabatch.adagrad(0.1, initial_accumulator_value=-1.0), "initial_accumulator_value"),
        (lambda: adabatch.adagrad_norm(0.1, eps=float("nan")), "eps"),
        (lambda: adabatch.adagrad_norm(0.1, per="row"), "per"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_integer_updates_rejected():
    tx = adabatch.scale_by_adagrad()
    with pytest.raises(ValueError, match="updates"):
        tx.update(jnp.ones(3, jnp.int32), tx.init(jnp.zeros(3)))
