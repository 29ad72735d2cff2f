"""The training step against a NumPy transcription, growth without recompiling, faults, the data stream."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch import rules
from adabatch.optimizers import adagrad_norm
from adabatch.training import (
    DataStream,
    bucket_size,
    epoch_permutation,
    fit,
    init_train_state,
    make_train_step,
    physical_order,
    required_statistics,
)
from tests import reference as ref


def linear_loss(params, batch):
    x, y = batch
    return 0.5 * (x @ params["w"] + params["b"] - y) ** 2


def regression_data(n=512, d=3, noise=1.0, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    y = (x @ np.arange(1.0, d + 1) + 0.5 + noise * rng.standard_normal(n)).astype(dtype)
    return x, y


def zeros_params(d=3, dtype=np.float32):
    return {"b": jnp.zeros((), dtype), "w": jnp.zeros((d,), dtype)}


@pytest.mark.parametrize("micro", [None, 4])
def test_step_matches_numpy_transcription_over_several_steps(dtype, micro):
    """Norm test + AdaGrad-Norm: loss, next batch size and parameters equal a float64 NumPy loop, with padding."""
    eta, lr, cap = 0.5, 0.3, 64
    tx = optax.chain(rules.norm_test(eta, max_batch_size=cap, init_batch_size=2), adagrad_norm(lr))
    step = make_train_step(linear_loss, tx, micro_batch_size=micro)
    x, y = regression_data(n=16, dtype=dtype)
    state = init_train_state(zeros_params(dtype=dtype), tx)
    w, b, decision, v = np.zeros(3), 0.0, 2, 1e-2
    for size in (5, 9, 12, 16, 7):
        rows = np.roll(np.arange(16), size)  # a different batch each step, padded to 16 rows
        state, metrics = step(state, (x[rows], y[rows]), size)
        xs, ys = x[rows][:size].astype(np.float64), y[rows][:size].astype(np.float64)
        residual = xs @ w + b - ys
        grads = np.concatenate([residual[:, None] * xs, residual[:, None]], axis=1)  # (b, d+1): w then b
        required = ref.required_batch("norm", grads, eta=eta)
        decision = ref.next_batch_size(required, decision, size, cap)
        (update,) = ref.adagrad_norm([grads.mean(0)], lr, v0=v)
        v += float(np.sum(grads.mean(0) ** 2))
        loss = float(np.mean(0.5 * residual**2))
        w, b = w + update[:3], b + update[3]
        tol = 1e-10 if dtype == np.float64 else 2e-5
        np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=tol)
        assert int(metrics["batch_size"]) == size and int(metrics["next_batch_size"]) == decision
        np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=tol, atol=tol)
        np.testing.assert_allclose(float(state.params["b"]), b, rtol=tol, atol=tol)
        np.testing.assert_allclose(float(metrics["trace_cov"]), ref.estimators(grads)["trace_covariance"], rtol=1e-4)
        # AdaGrad-Norm's applied step size is α/(√v+ε), reported as the learning rate.
        np.testing.assert_allclose(float(metrics["learning_rate"]), lr / (math.sqrt(v) + 1e-10), rtol=1e-4)
    assert int(state.step) == 5 and int(state.samples) == 5 + 9 + 12 + 16 + 7 and int(state.skipped) == 0


@pytest.mark.parametrize("test", ["inner_product", "orthogonality", "coordinate_norm"])
def test_micro_batches_give_the_statistics_of_the_whole_batch(test):
    """Micro-batch accumulation (merge + second JVP pass for Σ⟨g_i,ḡ⟩²) equals one pass over the batch."""
    factory = {
        "inner_product": rules.inner_product_test,
        "orthogonality": rules.orthogonality_test,
        "coordinate_norm": rules.coordinate_norm_test,
    }[test]
    tx = optax.chain(factory(0.3, max_batch_size=256), optax.sgd(0.05))
    x, y = regression_data(n=24)
    expected_needs = (test == "coordinate_norm", test != "coordinate_norm")
    assert required_statistics(tx, zeros_params(), tx.init(zeros_params())) == expected_needs
    g = -y[:10, None] * np.concatenate([x[:10], np.ones((10, 1), np.float32)], axis=1)  # gradients at zero
    expected = ref.required_batch(test, g.astype(np.float64), eta=0.3, theta=0.3, nu=0.3) / 10
    results = []
    for micro in (None, 4):
        step = make_train_step(linear_loss, tx, micro_batch_size=micro)
        state, metrics = step(init_train_state(zeros_params(), tx), (x, y), 10)
        np.testing.assert_allclose(float(metrics["rule_statistic"]), expected, rtol=2e-4)
        state, metrics = step(state, (x, y), 21)
        results.append((state, metrics))
    (s1, m1), (s2, m2) = results
    assert int(m1["next_batch_size"]) == int(m2["next_batch_size"])
    np.testing.assert_allclose(float(m1["rule_statistic"]), float(m2["rule_statistic"]), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(s1.params["w"]), np.asarray(s2.params["w"]), rtol=1e-5)


def test_growing_run_compiles_at_most_log2_ratio_plus_two_times():
    tx = optax.chain(rules.norm_test(0.2, max_batch_size=1024, init_batch_size=8), adagrad_norm(0.5))
    step = make_train_step(linear_loss, tx, micro_batch_size=8)
    data = regression_data(n=3000, noise=3.0)
    result = fit(step, init_train_state(zeros_params(), tx), data, num_steps=25, init_batch_size=8)
    sizes = [h["batch_size"] for h in result.history]
    assert sizes == sorted(sizes) and sizes[0] == 8
    assert max(sizes) >= 128, sizes  # the run really grew
    assert len(set(sizes)) > result.compilations  # many sizes, few compilations
    assert result.compilations <= math.ceil(math.log2(max(sizes) / min(sizes))) + 2
    assert result.compilations == step.compilations
    # Continuing the run in the same buckets compiles nothing new.
    more = fit(step, result.state, data, num_steps=30, init_batch_size=8)
    assert more.compilations <= 1 and int(more.state.step) == 30
    assert more.history[0]["samples"] == sum(sizes) + more.history[0]["batch_size"]


def test_nonfinite_loss_skips_the_update_and_training_goes_on():
    tx = optax.chain(rules.norm_test(0.5, max_batch_size=64), adagrad_norm(0.1))
    step = make_train_step(linear_loss, tx)
    x, y = regression_data(n=8)
    state, _ = step(init_train_state(zeros_params(), tx), (x, y))
    bad_x = x.copy()
    bad_x[3, 1] = np.nan
    new, metrics = step(state, (bad_x, y))
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1 and int(new.skipped) == 1
    for a, b in zip(
        jax.tree_util.tree_leaves((new.params, new.opt_state)),
        jax.tree_util.tree_leaves((state.params, state.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new.step) == 2 and int(new.samples) == 16  # the data position still advances
    after, metrics = step(new, (x, y))
    assert bool(metrics["finite"]) and int(after.skipped) == 1
    assert not np.array_equal(np.asarray(after.params["w"]), np.asarray(new.params["w"]))


def test_batch_size_above_the_data_set_is_capped_with_a_warning():
    tx = optax.chain(rules.norm_test(0.05, max_batch_size=512), optax.sgd(0.01))
    step = make_train_step(linear_loss, tx)
    with pytest.warns(UserWarning, match="capped"):
        result = fit(
            step, init_train_state(zeros_params(), tx), regression_data(n=24, noise=5.0), num_steps=4, init_batch_size=4
        )
    sizes = [h["batch_size"] for h in result.history]
    assert max(sizes) == 24 and result.history[-1]["next_batch_size"] > 24


def test_learning_rate_is_read_from_inject_hyperparams():
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10))
    step = make_train_step(linear_loss, tx)
    state = init_train_state(zeros_params(), tx)
    for k in range(3):
        state, metrics = step(state, regression_data(n=8, seed=k))
        np.testing.assert_allclose(float(metrics["learning_rate"]), 0.1 * (1 - k / 10), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["effective_learning_rate"]), 0.1 * (1 - k / 10), rtol=1e-5)
    assert int(metrics["next_batch_size"]) == 8  # no rule: the batch size stays


def test_per_example_keys_do_not_depend_on_micro_batching():
    def noisy_loss(params, batch, keys):
        x, y = batch
        noise = jax.vmap(lambda k: jax.random.normal(k))(keys)
        return 0.5 * (x @ params["w"] + params["b"] - y + noise) ** 2

    tx = optax.chain(rules.norm_test(0.5, max_batch_size=64), optax.sgd(0.1))
    out = []
    for micro in (None, 2):
        step = make_train_step(noisy_loss, tx, micro_batch_size=micro, per_example_keys=True)
        state = init_train_state(zeros_params(), tx, seed=3)
        for _ in range(2):
            state, metrics = step(state, regression_data(n=8), 6)
        out.append((float(metrics["loss"]), np.asarray(state.params["w"])))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6)


def test_bad_arguments_are_rejected():
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        make_train_step(linear_loss, tx, method="nope")
    with pytest.raises(ValueError, match="micro_batch_size"):
        make_train_step(linear_loss, tx, micro_batch_size=0)
    with pytest.raises(ValueError, match="do not merge"):
        make_train_step(linear_loss, tx, method="microbatch", micro_batch_size=4)
    with pytest.raises(ValueError, match="sq_sum"):
        make_train_step(linear_loss, tx, sq_sum="yes")
    step = make_train_step(linear_loss, tx)
    with pytest.raises(ValueError, match="size must lie"):
        step(init_train_state(zeros_params(), tx), regression_data(n=4), 5)


def test_data_stream_is_a_concatenation_of_seeded_epoch_permutations():
    stream = DataStream({"x": np.arange(10)}, seed=7)
    expected = np.concatenate([epoch_permutation(10, 7, e) for e in range(3)])
    np.testing.assert_array_equal(stream.indices(0, 30), expected)
    np.testing.assert_array_equal(np.concatenate([stream.indices(0, 13), stream.indices(13, 9)]), expected[:22])
    assert not np.array_equal(epoch_permutation(10, 7, 0), epoch_permutation(10, 7, 1))
    batch = stream.batch(8, 5, physical_size=8, micro_batch_size=4, num_shards=2)
    logical = np.asarray(expected[8:13])[np.arange(8) % 5]
    np.testing.assert_array_equal(batch["x"], logical[physical_order(8, 4, 2)])
    # Micro-batch i, read as the step reads it (reshape (shards, k, m/shards)), is logical rows i*m .. i*m+m-1.
    np.testing.assert_array_equal(batch["x"].reshape(2, 2, 2)[:, 1].reshape(4), logical[4:8])
    with pytest.raises(ValueError, match="leading"):
        DataStream({"x": np.zeros(3), "y": np.zeros(4)})


def test_buckets_bound_the_number_of_shapes():
    for low, high in ((1, 1000), (8, 4096), (24, 1437), (33, 100)):
        shapes = {bucket_size(b, low) for b in range(low, high + 1)}
        assert len(shapes) <= math.ceil(math.log2(high / low)) + 1
        assert all(bucket_size(b, low) >= b for b in range(low, high + 1))


def test_fit_counts_samples_and_compiles_once_for_a_fixed_batch():
    seen = []

    def record_loss(params, batch):
        return 0.5 * (batch[0] @ params["w"] + params["b"] - batch[1]) ** 2

    tx = optax.sgd(0.0)
    step = make_train_step(record_loss, tx)
    x, y = regression_data(n=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fit(
            step,
            init_train_state(zeros_params(), tx),
            (x, y),
            num_steps=4,
            init_batch_size=5,
            seed=2,
            callback=lambda state, m: seen.append(m["samples"]),
        )
    assert seen == [5, 10, 15, 20] and int(result.state.samples) == 20 and result.compilations == 1


def test_fit_follows_any_batch_size_rule():
    """The step and fit read the decision of every rule with a ``batch_size`` state (here the noise-scale rule),
    exactly as ``adabatch.next_batch_size`` does, not only the tests' ``BatchSizeTestState``."""
    from adabatch.rules import noise_scale_rule

    tx = optax.chain(noise_scale_rule(decay=0.0, init_batch_size=8, max_batch_size=512), optax.sgd(0.05))
    step = make_train_step(linear_loss, tx)
    data = regression_data(n=2000, noise=3.0)
    seen = []
    result = fit(
        step,
        init_train_state(zeros_params(), tx),
        data,
        num_steps=8,
        init_batch_size=8,
        callback=lambda state, record: seen.append(
            (record["next_batch_size"], int(rules.next_batch_size(state.opt_state)))
        ),
    )
    assert all(metric == decision for metric, decision in seen)
    sizes = [h["batch_size"] for h in result.history]
    assert sizes[0] == 8 and max(sizes) > 8 and sizes[1:] == [decision for decision, _ in seen[:-1]]
