"""Eager argument checks: real scalars of any float dtype (bf16 included) pass, bad values name the argument."""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest

import adabatch
from adabatch._validation import check_positive, check_unit_interval


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_scalars_of_every_numeric_dtype_are_read(dtype):
    check_positive("lr", jnp.asarray(0.5 if dtype != jnp.int32 else 1, dtype))
    check_unit_interval("b1", jnp.asarray(0.5 if dtype != jnp.int32 else 0, dtype))
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        check_positive("lr", jnp.asarray(-1, dtype))
    with pytest.raises(ValueError, match="b1 must lie in"):
        check_unit_interval("b1", jnp.asarray(2, dtype))


def test_inject_hyperparams_with_bf16_parameters():
    """inject_hyperparams casts numeric hyperparameters to the parameters' dtype: a bf16 learning rate is accepted;
    a β that bf16 rounds to 1 (0.999) is refused by name instead of silently freezing the second moment."""
    params = jnp.ones(3, jnp.bfloat16)
    for factory in (adabatch.adagrad, adabatch.adagrad_norm):
        tx = optax.inject_hyperparams(factory)(learning_rate=0.1)
        updates, _ = tx.update(params, tx.init(params), params)
        assert updates.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(updates)))
    tx = optax.inject_hyperparams(adabatch.adabelief)(learning_rate=0.1)
    with pytest.raises(ValueError, match="b2 must lie in"):
        tx.update(params, tx.init(params), params)
    tx = optax.inject_hyperparams(adabatch.adabelief, hyperparam_dtype=jnp.float32)(learning_rate=0.1)
    updates, _ = tx.update(params, tx.init(params), params)  # float32 hyperparameters: accepted
    assert updates.shape == (3,) and bool(jnp.all(jnp.isfinite(updates)))
