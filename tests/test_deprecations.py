"""Names of the previous release keep working for one release, each with a DeprecationWarning naming its successor."""

from __future__ import annotations

import importlib
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from adabatch import optimizers, rules, scaling, training

PARAMS = {"w": jnp.zeros(3)}


@pytest.mark.parametrize(
    ("owner", "old", "new"),
    [
        (adabatch, "batch_size", adabatch.next_batch_size),
        (rules, "batch_size", rules.next_batch_size),
        (adabatch, "AdaBeliefState", optimizers.ScaleByBeliefState),
        (optimizers, "AdaBeliefState", optimizers.ScaleByBeliefState),
        (adabatch, "AdaScaleState", scaling.ScaleByAdaScaleState),
        (scaling, "AdaScaleState", scaling.ScaleByAdaScaleState),
    ],
)
def test_renamed_attributes_warn_and_resolve_to_the_new_object(owner, old, new):
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use .*{new.__name__}"):
        assert getattr(owner, old) is new


def test_flax_train_state_alias():
    flax = pytest.importorskip("adabatch.flax")
    with pytest.warns(DeprecationWarning, match="LinenTrainState"):
        assert flax.TrainState is flax.LinenTrainState


@pytest.mark.parametrize(
    ("old", "name", "new_home"),
    [
        ("adabatch.train", "make_train_step", training),
        ("adabatch.data", "DataStream", training),
        ("adabatch.per_example", "grad_stats", adabatch.stats),
        ("adabatch.microbatch", "from_group_means", adabatch.stats),
        ("adabatch.noise_scale", "two_batch_estimate", adabatch.stats),
        ("adabatch.noise_scale", "noise_scale_rule", rules),
    ],
)
def test_old_module_paths_import_with_a_warning(old, name, new_home):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"module {old} is deprecated"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(new_home, name)
    with pytest.raises(AttributeError, match="no attribute"):
        module.not_a_name  # noqa: B018


def test_unknown_attributes_still_raise():
    for owner in (adabatch, rules, optimizers, scaling, training):
        with pytest.raises(AttributeError):
            owner.surely_not_a_name  # noqa: B018


def test_deprecated_keyword_arguments_behave_like_the_new_ones():
    # Two steps at batch size 4: one compilation per run (a third step would grow the batch and compile again).
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(16, 2)
    data = (x, x.sum(1))
    loss = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2  # noqa: E731
    tx = optax.chain(adabatch.norm_test(0.5, max_batch_size=16, init_batch_size=4), optax.sgd(0.1))
    new = training.fit(
        training.make_train_step(loss, tx, method="vmap"),
        training.init_train_state(jnp.zeros(2), tx),
        data,
        num_steps=2,
        init_batch_size=4,
    )
    with pytest.warns(DeprecationWarning, match=r"make_train_step\(stats=...\)"):
        step = training.make_train_step(loss, tx, stats="vmap")
    with pytest.warns(DeprecationWarning, match=r"fit\(batch_size=...\)"):
        old = training.fit(step, training.init_train_state(jnp.zeros(2), tx), data, num_steps=2, batch_size=4)
    np.testing.assert_array_equal(np.asarray(old.state.params), np.asarray(new.state.params))
    assert [r["batch_size"] for r in old.history] == [r["batch_size"] for r in new.history]
    with pytest.raises(ValueError, match="init_batch_size"):
        training.fit(step, training.init_train_state(jnp.zeros(2), tx), data, num_steps=3)


def test_linen_train_state_old_property():
    flax = pytest.importorskip("adabatch.flax")
    tx = optax.chain(adabatch.norm_test(0.5, init_batch_size=8, max_batch_size=64), optax.sgd(0.1))
    state = flax.LinenTrainState.create(apply_fn=None, params=jnp.zeros(2), tx=tx)
    with pytest.warns(DeprecationWarning, match="next_batch_size"):
        assert int(state.batch_size) == int(state.next_batch_size) == 8


def test_flax_update_helpers_old_stats_keyword():
    flax = pytest.importorskip("adabatch.flax")
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    loss_fn = flax.per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    batch = (jnp.ones((4, 3)), jnp.arange(4) % 2)
    with pytest.warns(DeprecationWarning, match=r"nnx_update\(stats=...\).*nnx_update\(method=...\)"):
        old = flax.nnx_update(model, optimizer, loss_fn, batch, stats="vmap")
    new = flax.nnx_update(model, optimizer, loss_fn, batch, method="vmap")
    assert int(old["batch_size"]) == int(new["batch_size"]) == 4
