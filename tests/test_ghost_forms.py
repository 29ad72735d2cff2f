"""The per-layer forms of the ghost pass (gram, direct, segment) each equal brute force, in float32 and float64,
for dense layers with and without a sequence axis, 1-D/2-D/3-D convolutions with strides, padding, dilations and
feature groups, and embeddings with repeated ids, under a mask; forcing a form; the report; the cancellation-free
inner-product variance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adabatch import ghost
from adabatch.stats import (
    from_group_means,
    from_per_example,
    grad_stats,
    inner_product_variance,
    orthogonal_variance,
    per_example_grads,
)
from tests.test_ghost import _plain_problem

FORCED = {  # ghost_form -> whether that form gives S2 here (the Gram form has none at T > 1 positions)
    "direct": True,
    "gram": False,
    "segment": True,  # on the embedding; every other layer takes the cost model's choice
}


def _model(p, batch):
    x1, x2, x3, ids, y = batch
    h = ghost.dense(x1, p["seq"]["kernel"], p["seq"]["bias"])  # (b, 5, 6): a sequence axis
    c1 = ghost.conv(  # 1-D, stride, dilation, explicit padding, 2 feature groups
        h, p["c1"], strides=(2,), padding=((2, 1),), kernel_dilation=(2,), feature_group_count=2
    )
    c2 = ghost.conv(
        x2, p["c2"]["kernel"], p["c2"]["bias"], strides=(1, 2), padding=((1, 0), (1, 1)), input_dilation=(2, 1)
    )
    c3 = ghost.conv(x3, p["c3"], strides=(1, 2, 1), padding="VALID", kernel_dilation=(1, 1, 2), feature_group_count=2)
    e = ghost.embed(p["emb"], ids)  # ids repeat within an example (vocab 4, 7 tokens)
    pooled = jnp.concatenate(
        [jnp.mean(jnp.tanh(c1), 1), jnp.mean(jnp.tanh(c2), (1, 2)), jnp.mean(c3, (1, 2, 3)), jnp.mean(e, 1)], -1
    )
    logits = ghost.dense(pooled, p["head"])  # no sequence axis
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def _problem(dtype, b=5):
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(0.7 * rng.standard_normal(shape), dtype)

    params = {
        "seq": {"kernel": normal(3, 6), "bias": normal(6)},
        "c1": normal(2, 3, 4),  # (k, C_in / G, C_out), G = 2
        "c2": {"kernel": normal(2, 3, 2, 3), "bias": normal(3)},
        "c3": normal(2, 2, 2, 2, 4),  # G = 2 on 4 input channels
        "emb": normal(4, 3),
        "head": normal(4 + 3 + 4 + 3, 3),
    }
    batch = (
        normal(b, 5, 3),
        normal(b, 4, 5, 2),
        normal(b, 3, 6, 4, 4),
        jnp.asarray(rng.integers(0, 4, (b, 7)), jnp.int32),
        jnp.asarray(rng.integers(0, 3, b), jnp.int32),
    )
    return params, batch


def _reference(grads, mask):
    """q, mean, S2, Σ a_i² and Σ (a_i − ‖ḡ‖²)² from materialised per-example gradients, in NumPy float64."""
    rows = np.concatenate([np.asarray(g, np.float64).reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)], 1)
    w = np.asarray(mask, np.float64)
    rows = rows * w[:, None]
    mean = rows.sum(0) / w.sum()
    a = rows @ mean
    return {
        "q": (rows**2).sum(),
        "mean": mean,
        "s2": (rows**2).sum(0),
        "inner": (a**2).sum(),
        "dev": (w * (a - mean @ mean) ** 2).sum(),
    }


def _close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.max(np.abs(actual - expected)) <= rtol * max(np.max(np.abs(expected)), 1e-30), (actual, expected)


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_form_equals_brute_force(dtype):
    with jax.enable_x64(dtype == "float64"):
        params, batch = _problem(jnp.dtype(dtype))
        mask = jnp.array([1, 1, 0, 1, 1], jnp.float32)

        @jax.jit  # one compilation: brute force and every form
        def run(p, b):
            out = {}
            for name, s2 in FORCED.items():
                form = {"embed": "segment"} if name == "segment" else name
                out[name] = grad_stats(
                    _model, p, b, method="ghost", mask=mask, ghost_form=form, inner_sq_sum=True, sq_sum=s2
                )
            return per_example_grads(_model, p, b), out

        grads, results = run(params, batch)
        ref = _reference(grads, mask)
        for name, stats in results.items():
            assert stats.sq_norm_sum.dtype == jnp.dtype(dtype), name
            _close(stats.sq_norm_sum, ref["q"], 1e-5)
            _close(_flat(stats.mean), ref["mean"], 1e-5)
            _close(stats.inner_sq_sum, ref["inner"], 1e-5)
            _close(stats.inner_dev_sq_sum, ref["dev"], 1e-5)
            if FORCED[name]:
                _close(_flat(stats.sq_sum), ref["s2"], 1e-5)
            assert int(stats.count) == 4


@pytest.mark.parametrize("chunk", [1, 2, 64])  # one example per step, a padded tail, one step of all
def test_segment_form_in_chunks_of_examples_equals_brute_force(chunk, monkeypatch):
    """The segment form scans over chunks of examples when its per-example buffers would not fit in cache
    (``example_chunk``); every chunking gives the same statistics."""
    from adabatch.stats import _ghost_forms

    monkeypatch.setattr(_ghost_forms, "example_chunk", lambda b, per_example, accelerator=None: min(chunk, b))
    params, batch = _problem(jnp.float32)
    mask = jnp.array([1, 0, 1, 1, 1], jnp.float32)
    ref = _reference(per_example_grads(_model, params, batch), mask)
    run = jax.jit(lambda p, b: grad_stats(_model, p, b, method="ghost", mask=mask, ghost_form={"embed": "segment"},
                                          sq_sum=True, inner_sq_sum=True))  # fmt: skip
    stats = run(params, batch)
    _close(stats.sq_norm_sum, ref["q"], 1e-5)
    _close(_flat(stats.mean), ref["mean"], 1e-5)
    _close(_flat(stats.sq_sum), ref["s2"], 1e-5)
    _close(stats.inner_sq_sum, ref["inner"], 1e-5)
    _close(stats.inner_dev_sq_sum, ref["dev"], 1e-5)


def test_example_chunk_fits_the_working_set():
    from adabatch.stats._ghost_forms import WORKING_SET_BYTES, example_chunk

    per_example = WORKING_SET_BYTES // (4 * 20)  # 20 examples fit
    assert example_chunk(16, per_example) == 16  # the whole batch fits: one step
    assert example_chunk(1024, per_example) == 16  # the largest power of two that fits
    assert example_chunk(1024, 10 * WORKING_SET_BYTES) == 1  # not even one fits: one at a time


def test_report_forms_costs_and_forcing():
    params, batch = _problem(jnp.float32)
    report = ghost.ghost_report(_model, params, batch)
    assert set(report.values()) == {"ghost"}  # the route mapping of before: every leaf is covered
    names = [layer.name for layer in report.layers]
    assert names == ["dense", "conv", "conv#1", "conv#2", "embed", "dense#1"]
    for layer in report.layers:
        assert layer.form in layer.costs and layer.reason == "cheapest"
        assert layer.costs[layer.form].score == min(c.score for c in layer.costs.values())
    conv1 = report.layers[1]
    assert (conv1.geometry.groups, conv1.geometry.positions) == (2, 3)  # (5 + 2 + 1 − 3) // 2 + 1 positions
    assert report.forms["['seq']['bias']"] == "direct" and report.forms["['emb']"] == report.layers[4].form
    assert "segment" in report.layers[4].costs and "segment" not in report.layers[0].costs
    loss_fn, plain_params, plain_batch = _plain_problem(jax.random.key(0))  # has a layerwise scale-and-shift
    forms = ghost.ghost_report(loss_fn, plain_params, plain_batch).forms
    assert forms["['ln']['bias']"] == "layerwise" and forms["['d1']['bias']"] == "direct"

    forced = ghost.ghost_report(_model, params, batch, ghost_form={"conv#1": "direct", "embed": "gram"})
    assert [(layer.form, layer.reason) for layer in forced.layers[2:5:2]] == [("direct", "forced"), ("gram", "forced")]
    s2 = ghost.ghost_report(_model, params, batch, sq_sum=True)
    assert all(layer.form != "gram" or layer.geometry.positions == 1 for layer in s2.layers)

    with pytest.raises(ValueError, match="'dense'.*segment"):
        ghost.ghost_report(_model, params, batch, ghost_form="segment")
    with pytest.raises(ValueError, match="'dense'.*no S2"):
        grad_stats(_model, params, batch, method="ghost", sq_sum=True, ghost_form="gram")
    with pytest.raises(ValueError, match="does not have.*'conv#2'"):
        grad_stats(_model, params, batch, method="ghost", ghost_form={"conv#9": "gram"})
    with pytest.raises(ValueError, match="ghost_form must be"):
        grad_stats(_model, params, batch, method="ghost", ghost_form="fast")
    with pytest.raises(ValueError, match="ghost_form applies to method='ghost'"):
        grad_stats(_model, params, batch, method="vmap", ghost_form="gram")


def test_layer_whose_form_cannot_be_determined_falls_back():
    def loss_fn(p, x):
        def apply(q, z):
            return z @ q["kernel"]

        # a tag whose config contradicts the shapes (claims 5 inputs): no form can be trusted, so vmap
        layer = {"kernel": p["w"]}
        h = ghost.capture("dense", layer, x, call=lambda: apply(layer, x), apply=apply, config=((1,), 5, 2))
        return jnp.sum(jnp.sin(h), -1)

    params = {"w": jnp.arange(6.0).reshape(3, 2) / 6}
    x = jax.random.normal(jax.random.key(0), (4, 3))
    reports = []

    @jax.jit
    def run(p, xs):
        stats, report = grad_stats(loss_fn, p, xs, method="ghost", return_report=True)
        reports.append(report)
        return stats, per_example_grads(loss_fn, p, xs)

    stats, grads = run(params, x)
    assert reports[0] == {"['w']": "vmap"} and "form cannot be determined" in reports[0].reasons["['w']"]
    _close(stats.sq_norm_sum, _reference(grads, np.ones(4))["q"], 1e-5)


class _Grouped(nn.Module):
    padding: str = "SAME"
    mask: bool = False

    @nn.compact
    def __call__(self, x):
        kernel_mask = jnp.ones((3, 3, 2, 4)).at[0].set(0) if self.mask else None
        h = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2, padding=self.padding, mask=kernel_mask)(x))
        h = nn.Conv(6, (3,), strides=2, padding="CAUSAL", feature_group_count=2)(h.reshape(h.shape[0], -1, 4))
        return nn.Dense(3)(jnp.mean(h, 1))


def test_linen_grouped_conv_is_ghost_and_circular_or_masked_fall_back_with_a_reason():
    x = jax.random.normal(jax.random.key(1), (6, 5, 4, 4))
    y = jnp.arange(6) % 3
    reports = {}

    @jax.jit
    def run(params):
        out = {}
        for name, model in (("same", _Grouped()), ("circular", _Grouped("CIRCULAR")), ("masked", _Grouped(mask=True))):

            def loss_fn(p, b, model=model):
                logits = model.apply({"params": p}, b[0])
                return -jnp.take_along_axis(jax.nn.log_softmax(logits), b[1][:, None], 1)[:, 0]

            stats, reports[name] = grad_stats(loss_fn, params, (x, y), method="ghost", sq_sum=True, return_report=True)
            out[name] = (stats, per_example_grads(loss_fn, params, (x, y)))
        return out

    shapes = jax.eval_shape(_Grouped().init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), shapes)
    for stats, grads in run(params).values():
        ref = _reference(grads, np.ones(6))
        _close(stats.sq_norm_sum, ref["q"], 1e-5)
        _close(_flat(stats.sq_sum), ref["s2"], 1e-5)
    assert set(reports["same"].values()) == {"ghost"}
    assert [layer.geometry.groups for layer in reports["same"].layers[:2]] == [2, 2]
    assert reports["same"].forms["['Conv_0']['bias']"] == "direct"
    for name, word in (("circular", "CIRCULAR"), ("masked", "masked")):
        assert reports[name]["['Conv_0']['kernel']"] == "vmap" and reports[name]["['Conv_1']['kernel']"] == "ghost"
        assert word in reports[name].reasons["['Conv_0']['kernel']"]


def test_inner_product_variance_without_cancellation():
    """A large common mean: float32 Var̂(a) from squared deviations agrees with a float64 two-pass reference to
    1e-4, where the one-pass Σa² − n‖ḡ‖⁴ is off by far more."""
    rng = np.random.default_rng(3)
    x = (30.0 + rng.standard_normal((64, 16))).astype(np.float32)  # g_i = x_i for the loss ⟨w, x_i⟩
    g64 = x.astype(np.float64)
    a = g64 @ g64.mean(0)
    var_ref = ((a - a.mean()) ** 2).sum() / 63
    v_ref = ((g64 - np.outer(a / (g64.mean(0) @ g64.mean(0)), g64.mean(0))) ** 2).sum() / 63

    def loss_fn(w, xs):
        return ghost.dense(xs, w)[:, 0]

    w = jnp.zeros((16, 1))

    @jax.jit
    def run(w, xs):
        all_stats = {
            "ghost": grad_stats(loss_fn, w, xs, method="ghost", inner_sq_sum=True),
            "chunked": grad_stats(loss_fn, w, xs, method="vmap", chunk_size=24, inner_sq_sum=True),
            "per_example": from_per_example({"w": xs}, inner_sq_sum=True),
            "groups": from_group_means({"w": xs}, jnp.ones(64), inner_sq_sum=True),  # groups of one example
        }
        out = {name: (inner_product_variance(s), orthogonal_variance(s)) for name, s in all_stats.items()}
        one_pass = all_stats["ghost"]._replace(inner_dev_sq_sum=None)
        return out, inner_product_variance(one_pass)

    out, one_pass = run(w, jnp.asarray(x))
    for name, (var_a, v_orth) in out.items():
        assert abs(float(var_a) / var_ref - 1) < 1e-4, name
        assert abs(float(v_orth) / v_ref - 1) < 1e-3, name  # q − n‖ḡ‖² (trΣ̂'s numerator) still cancels
    assert abs(float(one_pass) / var_ref - 1) > 1e-3  # the test can see the cancellation
