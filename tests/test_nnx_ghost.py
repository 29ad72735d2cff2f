"""Ghost statistics of Flax NNX models equal brute-force per-example gradients, with every supported layer reported
as "ghost" and the unsupported configurations falling back to vmap (reported)."""

from __future__ import annotations

import functools
import inspect
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adabatch.benchmarks._nnx_problem import NNXTransformerLM
from adabatch.flax import _nnx_ghost, _training, linen_update, nnx_capture, nnx_params, nnx_update, per_example_loss
from adabatch.stats import _ghost as ghost_engine
from adabatch.stats import grad_stats, per_example_grads
from tests.test_ghost import _brute_force, _close, _flat, check_ghost


def _build(make, seed):
    """An NNX model with N(0, 0.5²) parameters from NumPy, built without running its initialisers op by op (each
    op would compile): the shapes from ``nnx.eval_shape``. The statistics are checked for any parameter values."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def check_all_statistics(loss_fn, params, batch):
    """One compilation: ghost with every statistic equals brute force (the lighter twin of ``check_ghost``, which
    also compiles the variant without S2 and traces the report separately); returns the report. Compiled without
    XLA's backend optimisations (a third less compile time; the same numbers to rounding)."""
    reports = []

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(p, b):
        stats, report = grad_stats(loss_fn, p, b, method="ghost", sq_sum=True, inner_sq_sum=True, return_report=True)
        reports.append(report)
        return per_example_grads(loss_fn, p, b), stats

    grads, stats = run(params, batch)
    ref = _brute_force(grads)
    _close(stats.sq_norm_sum, ref["q"])
    _close(_flat(stats.mean), ref["mean"])
    _close(_flat(stats.sq_sum), ref["s2"])
    _close(stats.inner_sq_sum, ref["inner"])
    assert int(stats.count) == ref["count"]
    return reports[0]


class _Layers(nnx.Module):
    """Every supported NNX layer, each in a configuration that the ghost pass covers."""

    def __init__(self, dtype, *, rngs):
        kw = {"param_dtype": dtype, "rngs": rngs}
        self.linear = nnx.Linear(4, 5, **kw)  # on a sequence axis
        self.shared = nnx.Linear(5, 5, use_bias=False, **kw)  # called twice: its calls are concatenated
        self.general = nnx.LinearGeneral((6, 5), (2, 3), axis=(-2, -1), **kw)  # contracts two axes
        self.einsum = nnx.Einsum("nij,jk->nik", (3, 4), (4,), **kw)
        self.layer_norm = nnx.LayerNorm(4, **kw)
        self.rms_norm = nnx.RMSNorm(4, **kw)
        self.group_norm = nnx.GroupNorm(4, num_groups=2, **kw)
        self.conv1d = nnx.Conv(4, 3, (2,), padding=((1, 0),), input_dilation=2, **kw)
        self.causal = nnx.Conv(3, 3, (2,), padding="CAUSAL", kernel_dilation=2, use_bias=False, **kw)
        self.conv2d = nnx.Conv(2, 3, (3, 3), strides=(2, 1), kernel_dilation=(1, 2), **kw)  # SAME padding
        self.embed = nnx.Embed(7, 4, **kw)
        self.mixed = nnx.Linear(3, 4, dtype=jnp.float32, **kw)  # computes in float32 whatever the parameters
        self.head = nnx.Linear(4, 3, **kw)  # T = 1

    def __call__(self, inputs):
        x, image, ids = inputs  # (b, 6, 4), (b, 5, 5, 2), (b, 6)
        h = jnp.tanh(self.linear(x))
        h = self.shared(h) + self.shared(jnp.cos(h))
        h = self.einsum(self.general(h))  # (b, 2, 4)
        h = self.group_norm(self.rms_norm(self.layer_norm(h)))
        h = jnp.mean(self.causal(jnp.tanh(self.conv1d(h))), axis=1)  # (b, 3)
        h = h + jnp.mean(self.conv2d(image), axis=(1, 2))
        e = jnp.mean(self.embed(ids), axis=1)  # (b, 4)
        return self.head(self.mixed(jnp.sin(h)) + e)


def _layers_problem(dtype, seed, b=5):
    model = _build(lambda: _Layers(dtype, rngs=nnx.Rngs(0)), seed)
    rng = np.random.default_rng(seed + 1)
    inputs = (
        jnp.asarray(rng.standard_normal((b, 6, 4)), dtype),
        jnp.asarray(rng.standard_normal((b, 5, 5, 2)), dtype),
        jnp.asarray(rng.integers(0, 7, (b, 6)), jnp.int32),
    )
    loss_fn = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    return loss_fn, nnx_params(model), (inputs, jnp.arange(b) % 3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_nnx_layer_is_captured_and_matches_vmap(dtype):
    with jax.enable_x64(dtype == "float64"):
        loss_fn, params, batch = _layers_problem(jnp.dtype(dtype), seed=0)
        assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
        check = check_ghost if dtype == "float32" else check_all_statistics  # float64: the same paths
        report = check(loss_fn, params, batch)
    assert set(report.values()) == {"ghost"}, report
    layers = {path.split("]")[0] + "]" for path in report}
    assert len(layers) == 13  # every layer's leaves are in the report


def test_nnx_transformer_is_all_ghost():
    model = _build(
        lambda: NNXTransformerLM(vocab_size=11, d_model=8, num_heads=2, num_layers=1, max_len=6, rngs=nnx.Rngs(0)), 1
    )
    tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, 11)
    loss_fn = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    report = check_all_statistics(loss_fn, nnx_params(model), (tokens, jnp.roll(tokens, -1, axis=1)))
    assert set(report.values()) == {"ghost"}, report  # embeddings, attention projections, MLP, LayerNorms, head
    assert len(report) == 22


class _Subclassed(nnx.Linear):  # may change what __call__ computes: not captured
    pass


class _Fallbacks(nnx.Module):
    """Configurations the ghost pass does not cover; each layer's parameters must be reported "vmap" (but the grouped
    convolution, captured, whose statistics are checked against brute force with the rest)."""

    def __init__(self, *, rngs):
        self.grouped = nnx.Conv(4, 4, (2,), feature_group_count=2, rngs=rngs)  # captured (exact, checked here)
        self.circular = nnx.Conv(4, 4, (3,), padding="CIRCULAR", rngs=rngs)
        self.masked = nnx.Conv(4, 4, (2,), mask=np.tril(np.ones((2, 4, 4), np.float32)), rngs=rngs)
        self.batched = nnx.LinearGeneral(4, 4, batch_axis={0: 3}, rngs=rngs)  # per-position weights
        self.custom = nnx.Linear(4, 4, dot_general=functools.partial(jax.lax.dot_general), rngs=rngs)
        self.subclassed = _Subclassed(4, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)  # called with a mask
        self.tied = nnx.Embed(5, 4, rngs=rngs)  # also used by attend
        self.read = nnx.Linear(4, 4, rngs=rngs)  # its kernel is also read outside the layer
        self.covered = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, inputs):
        x, ids = inputs  # (b, 3, 4), (b, 3)
        h = self.masked(self.circular(self.grouped(x)))
        h = jnp.swapaxes(self.batched(jnp.swapaxes(h, 0, 1)), 0, 1)  # batch_axis over the positions
        h = self.subclassed(self.custom(h))
        h = self.norm(h, mask=jnp.ones(h.shape, bool))
        h = self.read(h) + 0.1 * jnp.sum(self.read.kernel[...])
        logits = self.tied.attend(h)  # (b, 3, 5)
        h = h + self.tied(ids) + jnp.mean(logits, -1, keepdims=True)
        return self.covered(jnp.mean(h, axis=1))


def test_unsupported_configurations_fall_back_and_are_reported():
    model = _build(lambda: _Fallbacks(rngs=nnx.Rngs(0)), 3)
    rng = np.random.default_rng(4)
    batch = (jnp.asarray(rng.standard_normal((5, 3, 4)), jnp.float32), jnp.asarray(rng.integers(0, 5, (5, 3))))
    loss_fn = per_example_loss(model, lambda out, y: jnp.sum(jnp.square(out), -1))
    report = check_all_statistics(loss_fn, nnx_params(model), (batch, jnp.zeros(5)))
    ghost = {path for path, route in report.items() if route == "ghost"}
    captured = {"['covered']['bias']", "['covered']['kernel']", "['read']['bias']", "['grouped']['bias']",
                "['grouped']['kernel']"}  # fmt: skip
    assert ghost == captured, report
    assert set(report.values()) == {"ghost", "vmap"}


def test_capture_is_installed_only_while_active_and_per_thread(monkeypatch):
    original = nnx.Linear.__dict__["__call__"]
    assert "flax.nnx" in ghost_engine._PROVIDERS and ghost_engine._BACKENDS["flax.nnx"] is nnx_capture
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 2))

    def loss_fn(params, batch):  # fails inside the ghost pass: the classes must still be restored
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        grad_stats(loss_fn, {"w": jnp.ones(2)}, jnp.ones((3, 2)), method="ghost")
    assert nnx.Linear.__dict__["__call__"] is original
    seen = []
    monkeypatch.setattr(_nnx_ghost, "_captured", lambda *args: seen.append(threading.current_thread().name))
    with nnx_capture(), nnx_capture():  # nested: installed once, removed by the last exit
        assert nnx.Linear.__dict__["__call__"] is not original
        worker = threading.Thread(target=layer, args=(x,), name="other")  # no capture active in that thread
        worker.start()
        worker.join()
        layer(x)
    assert seen == [threading.current_thread().name]
    model = nnx.Sequential(layer, nnx.Linear(2, 1, rngs=nnx.Rngs(1)))
    with nnx_capture(), _nnx_ghost.module_names(model):  # what per_example_loss does around the model call
        assert [_nnx_ghost._name(m) for m in model.layers] == ["layers/0", "layers/1"]  # paths in reports
    assert _nnx_ghost._name(layer) == "nnx.Linear(2->2)"
    assert nnx.Linear.__dict__["__call__"] is original and not _nnx_ghost._ORIGINALS


def test_nnx_update_takes_ghost_statistics_by_default(monkeypatch):
    """Under nnx.jit the parameters of nnx_params reach their layers unchanged (identity through nnx.split /
    nnx.merge), so the default method covers every leaf."""
    seen = []

    def spy(*args, **kwargs):
        out = grad_stats(*args, **kwargs, return_report=True)
        seen.append((kwargs["method"], out[-1]))
        return out[:-1]

    monkeypatch.setattr(_training.st, "grad_stats", spy)
    model = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(5, 3, rngs=nnx.Rngs(1)))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    loss_fn = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    batch = (jnp.ones((6, 4)), jnp.arange(6) % 3)
    metrics = nnx.jit(nnx_update, static_argnums=2)(model, optimizer, loss_fn, batch)
    assert int(metrics["batch_size"]) == 6
    (method, report), *_ = seen
    assert method == "ghost" and len(report) == 4 and set(report.values()) == {"ghost"}, report
    assert inspect.signature(linen_update).parameters["method"].default == "ghost"  # the linen helper alike
