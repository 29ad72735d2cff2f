"""Flax integration: per-example losses, NNX with a stock nnx.Optimizer, the linen TrainState, the examples."""

from __future__ import annotations

import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adabatch import rules
from adabatch.flax import LinenTrainState, linen_update, nnx_params, nnx_update, per_example_loss
from adabatch.flax.models import MLP
from adabatch.optimizers import adagrad_norm
from adabatch.stats import grad_stats, per_example_grads
from adabatch.training import init_train_state, make_train_step

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def batch(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(np.float32), (np.arange(n) % 3).astype(np.int32)


def make_tx():
    return optax.chain(rules.norm_test(0.4, max_batch_size=256), adagrad_norm(0.2))


def test_nnx_per_example_loss_matches_the_module_and_its_gradients():
    model = Tiny(nnx.Rngs(0))
    loss_fn = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    x, y = batch()
    expected = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
    np.testing.assert_allclose(np.asarray(loss_fn(nnx_params(model), (x, y))), np.asarray(expected), rtol=1e-6)
    # Per-example gradients against one-example nnx.grad calls (brute force).
    grads = jax.jit(per_example_grads, static_argnums=0)(loss_fn, nnx_params(model), (x, y))
    i = 7
    single = nnx.jit(
        nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x[i : i + 1]), y[i : i + 1])[0])
    )
    reference = nnx.as_pure(single(model))
    for layer in ("hidden", "out"):
        np.testing.assert_allclose(
            np.asarray(grads[layer]["kernel"][i]), np.asarray(reference[layer]["kernel"]), rtol=1e-5, atol=1e-6
        )


def test_nnx_stock_optimizer_matches_make_train_step():
    x, y = batch()
    model = Tiny(nnx.Rngs(1))
    loss_fn = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    step = make_train_step(loss_fn, make_tx())
    state = init_train_state(nnx_params(model), make_tx())
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    update = nnx.jit(nnx_update, static_argnums=2)
    for k, size in enumerate((12, 9, 12)):
        mask = np.arange(12) < size
        metrics = update(model, optimizer, loss_fn, (x, y), mask=mask)
        state, reference = step(state, (x, y), size)
        np.testing.assert_allclose(float(metrics["loss"]), float(reference["loss"]), rtol=1e-6)
        assert int(metrics["batch_size"]) == size
        assert int(rules.next_batch_size(nnx.as_pure(optimizer.opt_state))) == int(reference["next_batch_size"])
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
            nnx_params(model),
            state.params,
        )
        assert int(optimizer.step[...]) == k + 1


def test_linen_train_state_forwards_extra_arguments():
    x, y = batch()
    model = MLP(features=(6,), num_classes=3)
    params = model.init(jax.random.key(0), x[:1])["params"]
    loss_fn = per_example_loss(model.apply, optax.softmax_cross_entropy_with_integer_labels)
    state = LinenTrainState.create(apply_fn=model.apply, params=params, tx=make_tx())
    stats = jax.jit(grad_stats, static_argnums=0)(loss_fn, params, (x, y))
    # A rule reads grad_stats; a field name is replaced as flax does; a plain optimizer ignores the extra args.
    apply = jax.jit(lambda s, g: s.apply_gradients(grads=g.mean, grad_stats=g, batch_size=g.count, apply_fn=None))
    new = apply(state, stats)
    assert int(new.step) == 1 and new.apply_fn is None
    decided = jax.jit(lambda g, r: rules.decide("norm", g, r, max_batch_size=256, eta=0.4))(stats, state.opt_state[0])
    assert int(new.next_batch_size) == int(decided.next_batch_size)
    with pytest.raises(ValueError, match="grad_stats"):  # the rule without statistics of a mean gradient
        state.apply_gradients(grads=stats.mean)
    plain = LinenTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    moved = jax.jit(lambda s, g: s.apply_gradients(grads=g.mean, grad_stats=g, value=1.0))(plain, stats)
    np.testing.assert_allclose(
        np.asarray(moved.params["Dense_0"]["bias"]),
        np.asarray(params["Dense_0"]["bias"] - 0.1 * stats.mean["Dense_0"]["bias"]),
        rtol=1e-6,
    )


def test_linen_update_matches_make_train_step():
    x, y = batch()
    model = MLP(features=(6,), num_classes=3)
    params = model.init(jax.random.key(2), x[:1])["params"]
    loss_fn = per_example_loss(model.apply, optax.softmax_cross_entropy_with_integer_labels)
    state = LinenTrainState.create(apply_fn=model.apply, params=params, tx=make_tx())
    reference_state = init_train_state(params, make_tx())
    step = make_train_step(loss_fn, make_tx())
    update = jax.jit(lambda s, b, m: linen_update(s, loss_fn, b, mask=m))
    for size in (12, 10):
        state, metrics = update(state, (x, y), np.arange(12) < size)
        reference_state, reference = step(reference_state, (x, y), size)
        np.testing.assert_allclose(float(metrics["loss"]), float(reference["loss"]), rtol=1e-6)
        assert int(state.next_batch_size) == int(reference["next_batch_size"])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.params, reference_state.params
    )


def test_per_example_loss_rejects_non_models_and_averages_trailing_axes():
    with pytest.raises(ValueError, match="nnx.Module or a linen apply"):
        per_example_loss(3, optax.l2_loss)
    loss_fn = per_example_loss(lambda variables, x: x * variables["params"], lambda out, t: (out - t) ** 2)
    out = loss_fn(2.0, (jnp.ones((4, 3)), jnp.zeros((4, 3))))
    assert out.shape == (4,) and np.allclose(out, 4.0)


@pytest.mark.parametrize("name", ["flax_nnx.py", "flax_linen.py"])
def test_examples_run(name, capsys):
    module = runpy.run_path(os.path.join(EXAMPLES, name))
    result = module["main"](["--steps", "3", "--max-batch-size", "16"])  # one bucket: one compilation
    assert len(result["batch_sizes"]) == 3 and 0 <= result["accuracy"] <= 1
    assert result["batch_sizes"] == sorted(result["batch_sizes"])
    assert "test accuracy" in capsys.readouterr().out
