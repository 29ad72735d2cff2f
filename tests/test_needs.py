"""Transformations declare the optional statistics they read; the training step computes exactly those."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from adabatch.stats import GradStatsNeeds, declared_needs
from adabatch.training import init_train_state, make_train_step, required_statistics

PARAMS = {"w": jnp.zeros(3)}

CASES = [
    (adabatch.norm_test(), GradStatsNeeds()),
    (adabatch.coordinate_norm_test(), GradStatsNeeds(sq_sum=True)),
    (adabatch.inner_product_test(), GradStatsNeeds(inner_sq_sum=True)),
    (adabatch.orthogonality_test(), GradStatsNeeds(inner_sq_sum=True)),
    (adabatch.augmented_inner_product_test(), GradStatsNeeds(inner_sq_sum=True)),
    (adabatch.noise_scale_rule(), GradStatsNeeds()),
    (adabatch.noise_scale_rule(preconditioner="adam"), GradStatsNeeds(sq_sum=True)),
    (adabatch.stats.noise_scale(preconditioner="adam"), GradStatsNeeds(sq_sum=True)),
    (adabatch.adadagrad(0.1), GradStatsNeeds(sq_sum=True)),
    (optax.sgd(0.1), GradStatsNeeds()),
]


@pytest.mark.parametrize(("tx", "expected"), CASES)
def test_each_transformation_declares_what_it_reads(tx, expected):
    assert declared_needs(tx.init(PARAMS)) == expected


def test_declarations_survive_nesting_jit_sharding_and_combine():
    tx = optax.chain(adabatch.coordinate_norm_test(), adabatch.inner_product_test(), optax.sgd(0.1))
    both = GradStatsNeeds(sq_sum=True, inner_sq_sum=True)
    state = tx.init(PARAMS)
    assert declared_needs(state) == both
    assert declared_needs(jax.jit(lambda s: s)(state)) == both
    assert declared_needs(jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))) == both
    jax.jit(lambda s: np.testing.assert_equal(declared_needs(s), both))(state)  # traced: still static
    wrapped = optax.MultiSteps(optax.inject_hyperparams(adabatch.coordinate_norm_test)(eta=0.2), every_k_schedule=2)
    assert declared_needs(wrapped.init(PARAMS)) == GradStatsNeeds(sq_sum=True)
    assert required_statistics(tx, PARAMS, state) == (True, True)
    assert required_statistics(tx, PARAMS, state, sq_sum=False) == (False, True)  # explicit choice wins


class _SquaresState(NamedTuple):
    seen: jax.Array  # float32[]: Σ_j S2_j of the last batch
    grad_stats_needs: GradStatsNeeds  # static: the optional statistics read


def _sum_of_squares() -> optax.GradientTransformationExtraArgs:
    """A user-written transformation that reads grad_stats.sq_sum and says so in its state."""

    def init(params):
        del params
        return _SquaresState(jnp.zeros(()), GradStatsNeeds(sq_sum=True))

    def update(updates, state, params=None, *, grad_stats=None, **extra):
        del params, extra
        total = sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(grad_stats.sq_sum))
        return updates, state._replace(seen=total)

    return optax.GradientTransformationExtraArgs(init, update)


def test_the_step_computes_a_declared_field_for_a_user_transformation():
    def loss(p, xy):
        return 0.5 * (xy[0] @ p["w"] - xy[1]) ** 2

    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)
    y = x @ jnp.ones(3)
    tx = optax.chain(_sum_of_squares(), optax.sgd(0.1))
    state, _ = make_train_step(loss, tx)(init_train_state(PARAMS, tx), (x, y))
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(PARAMS, (x, y))["w"]
    np.testing.assert_allclose(float(state.opt_state[0].seen), float(jnp.sum(per_example**2)), rtol=1e-5)
