"""The common suite, run over every public transformation (registry-driven, design.md §6).

The registry holds every public factory that returns an ``optax.GradientTransformation`` (checked against the
public names by :func:`test_registry_covers_every_public_transformation`), each with the arguments of one instance and
the inputs its ``update`` needs: per-example gradients on the leading axis (built with ``per_example=True``), or
the mean gradient plus the ``grad_stats=`` extra argument, and/or the ``batch_size=`` extra argument, and/or the
gradient at an extrapolated point as ``extrapolated_grads=`` (EXTRAP-SGD).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
import adabatch.flax
from adabatch import curvature, optimizers, rules, scaling, stats, training


class Entry:
    def __init__(
        self,
        factory,
        kwargs,
        stats=None,
        batch_size=False,
        step=None,
        static_args=(),
        extrapolated=False,
        curvature=False,
    ):
        """``stats``: how ``update`` reads per-example statistics: None (it does not), ``"per_example"``
        (per-example gradients as ``updates``) or ``"grad_stats"`` (the mean as ``updates`` and
        ``grad_stats=``). ``batch_size``: ``update`` needs the ``batch_size=`` extra argument. ``step``: for a
        transformation that does not descend by itself (a ``scale_by_*``, a rule, a scaling law), the learning rate of
        the ``optax.scale(-step)`` chained after it in the convergence test. ``static_args``: the non-numeric
        arguments ``optax.inject_hyperparams`` must leave alone. ``extrapolated``: ``update`` needs the gradient at the
        extrapolated point as ``extrapolated_grads=`` (the convergence test computes it at
        ``optimizers.extrapolate``; the other tests pass half the mean gradient as a stand-in). ``curvature``:
        ``update`` reads a Hessian spectrum as ``curvature=`` (the SLQ learner; the tests pass the exact extremal
        eigenvalues of the convergence problem's Hessian)."""
        self.factory, self.kwargs, self.stats, self.batch_size = factory, kwargs, stats, batch_size
        self.step, self.static_args, self.extrapolated = step, static_args, extrapolated
        self.curvature = curvature

    def make(self):
        return self.factory(**self.kwargs)


RULE_KW = dict(max_batch_size=1024, init_batch_size=8)
PE_KW = dict(RULE_KW, per_example=True)  # per-example gradients on the leading axis of updates
PE, GS = "per_example", "grad_stats"
SCHEDULE = optax.linear_schedule(1.0, 0.5, transition_steps=10_000)  # in examples seen
SLQ_STATIC = ("interval", "num_steps", "num_probes", "matrix", "rule")  # the spectrum request and the map's choice
REGISTRY = {
    # rules (adabatch.rules)
    "norm_test": Entry(rules.norm_test, dict(eta=0.5, **PE_KW), stats=PE, step=0.05),
    "inner_product_test": Entry(rules.inner_product_test, dict(theta=0.5, **PE_KW), stats=PE, step=0.05),
    "orthogonality_test": Entry(rules.orthogonality_test, dict(nu=0.5, **PE_KW), stats=PE, step=0.05),
    "augmented_inner_product_test": Entry(
        rules.augmented_inner_product_test, dict(theta=0.5, nu=0.5, **PE_KW), stats=PE, step=0.05
    ),
    "coordinate_norm_test": Entry(rules.coordinate_norm_test, dict(eta=0.5, **PE_KW), stats=PE, step=0.05),
    "noise_scale_rule": Entry(rules.noise_scale_rule, dict(decay=0.9, **RULE_KW), stats=GS, step=0.05),
    "optimal_batch_rule": Entry(
        rules.optimal_batch_rule,
        dict(num_examples=64, smoothness=4.0, max_smoothness=16.0, strong_convexity=0.5, accuracy=0.01, **PE_KW),
        stats=PE,
        step=0.05,
    ),
    # statistics (adabatch.stats)
    "noise_scale": Entry(stats.noise_scale, dict(decay=0.9), stats=GS, step=0.05),
    # optimizers (adabatch.optimizers)
    "scale_by_adagrad": Entry(optimizers.scale_by_adagrad, dict(), step=0.5),
    "scale_by_adagrad_norm": Entry(optimizers.scale_by_adagrad_norm, dict(), step=0.5),
    "scale_by_belief": Entry(optimizers.scale_by_belief, dict(), step=0.05),
    "adagrad": Entry(optimizers.adagrad, dict(learning_rate=0.5)),
    "adagrad_norm": Entry(optimizers.adagrad_norm, dict(learning_rate=0.5)),
    "adabelief": Entry(optimizers.adabelief, dict(learning_rate=0.05)),
    "adadagrad": Entry(optimizers.adadagrad, dict(learning_rate=0.5, eta=0.5, **PE_KW), stats=PE),
    "adadagrad_norm": Entry(optimizers.adadagrad_norm, dict(learning_rate=0.5, eta=0.5, **PE_KW), stats=PE),
    "scale_by_eve": Entry(optimizers.scale_by_eve, dict(), stats=GS, step=0.05),
    "eve": Entry(optimizers.eve, dict(learning_rate=0.05), stats=GS),
    "evew": Entry(optimizers.evew, dict(learning_rate=0.05), stats=GS),
    "scale_by_clars": Entry(optimizers.scale_by_clars, dict(), stats=GS, step=0.005),
    "clars": Entry(optimizers.clars, dict(learning_rate=0.005), stats=GS),
    "scale_by_tom": Entry(optimizers.scale_by_tom, dict(), step=0.05),
    "tom": Entry(optimizers.tom, dict(learning_rate=0.05)),
    "scale_by_maxva": Entry(optimizers.scale_by_maxva, dict(), step=0.05),
    "maxva": Entry(optimizers.maxva, dict(learning_rate=0.05)),
    "scale_by_adalomo": Entry(optimizers.scale_by_adalomo, dict(), step=0.05),
    "adalomo": Entry(optimizers.adalomo, dict(learning_rate=0.05)),
    "scale_by_extrap_sgd": Entry(
        optimizers.scale_by_extrap_sgd, dict(extrapolation_rate=0.05), step=0.05, extrapolated=True
    ),
    "extrap_sgd": Entry(optimizers.extrap_sgd, dict(learning_rate=0.05), extrapolated=True),
    # curvature learner (adabatch.curvature)
    "scale_by_slq_learner": Entry(
        curvature.scale_by_slq_learner,
        dict(init_learning_rate=0.05, smoothing=0.5),
        step=1.0,
        static_args=SLQ_STATIC,
        curvature=True,
    ),
    "slq_learner": Entry(
        curvature.slq_learner, dict(smoothing=0.5, safety=0.9), static_args=SLQ_STATIC, curvature=True
    ),
    "active_lr": Entry(optimizers.active_lr, dict(inner=optax.sgd(0.05), period=4), static_args=("inner",)),
    "active_adam": Entry(optimizers.active_adam, dict(learning_rate=0.05, period=4)),
    "active_adabelief": Entry(optimizers.active_adabelief, dict(learning_rate=0.05, period=4)),
    # learning rate as a function of batch size (adabatch.scaling)
    "scale_by_batch_size_linear": Entry(
        scaling.scale_by_batch_size, dict(rule="linear", base_batch_size=8), batch_size=True, step=0.05
    ),
    "scale_by_batch_size_sqrt": Entry(
        scaling.scale_by_batch_size, dict(rule="sqrt", base_batch_size=8), batch_size=True, step=0.05
    ),
    "scale_by_batch_size_surge": Entry(  # B_noise estimated online from grad_stats
        scaling.scale_by_batch_size, dict(rule="surge", base_batch_size=8), stats=GS, batch_size=True, step=0.05
    ),
    "adascale": Entry(scaling.adascale, dict(base_batch_size=8), stats=GS, step=0.05),
    "scale_by_sample_schedule": Entry(
        scaling.scale_by_sample_schedule,
        dict(schedule=SCHEDULE),
        batch_size=True,
        step=0.05,
        static_args=("schedule",),
    ),
}
NAMES = [pytest.param(n, marks=pytest.mark.xdist_group(f"common-{n}")) for n in sorted(REGISTRY)]
B = 8
SUBPACKAGES = (adabatch, stats, rules, optimizers, curvature, scaling, training, adabatch.flax)


def _is_transformation_factory(fn):
    """A public function whose annotated return type is an optax transformation, or (unannotated, no required
    argument) whose call with its defaults returns one."""
    annotation = inspect.signature(fn).return_annotation
    if annotation is not inspect.Signature.empty:
        return "GradientTransformation" in str(annotation)
    required = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return not required and isinstance(fn(), optax.GradientTransformation)


def test_registry_covers_every_public_transformation():
    """A new public transformation cannot be forgotten: every one of adabatch.__all__ and of the subpackages'
    __all__ is in the registry, and the registry holds public factories only."""
    public = {}
    for module in SUBPACKAGES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and _is_transformation_factory(obj):
                public.setdefault(obj, f"{module.__name__}.{name}")
    registered = {entry.factory for entry in REGISTRY.values()}
    missing = sorted(name for fn, name in public.items() if fn not in registered)
    assert not missing, f"add these public transformations to tests/test_common.py REGISTRY: {missing}"
    assert registered <= set(public), sorted(fn.__name__ for fn in registered - set(public))
    for module in (stats, rules, optimizers, scaling):  # spot check that the enumeration works at all
        assert any(fn.__module__.startswith(module.__name__) for fn in public)


def _per_example(params, seed=0):
    """Per-example gradients of a least-squares loss (leading axis B), in the dtype of the params."""
    key = jax.random.key(seed)
    x = jax.random.normal(key, (B, 3))
    y = jax.random.normal(jax.random.fold_in(key, 1), (B, 2))

    def loss(p, xi, yi):
        return 0.5 * jnp.sum((xi @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32) - yi) ** 2)

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    return jax.tree_util.tree_map(lambda a, p: a.astype(p.dtype), g, params)


def _inputs(entry, per_example, via=None):
    """``(updates, extra_args)`` of ``entry.update`` from per-example gradients: per-example ``updates`` or their
    mean, plus ``grad_stats=`` and/or ``batch_size=`` as the entry needs (``via`` overrides ``entry.stats``)."""
    via = via or entry.stats
    extra = {"batch_size": jnp.int32(B)} if entry.batch_size else {}
    if entry.extrapolated:  # a stand-in for the gradient at the extrapolated point
        extra["extrapolated_grads"] = jax.tree_util.tree_map(lambda a: 0.5 * jnp.mean(a, 0), per_example)
    if entry.curvature:
        extra["curvature"] = CONVERGENCE_SPECTRUM
    if via == PE:
        return per_example, extra
    mean = jax.tree_util.tree_map(lambda a: jnp.mean(a, 0), per_example)
    if via == GS:
        extra["grad_stats"] = stats.from_per_example(per_example, sq_sum=True, inner_sq_sum=True, leaf_sq_norm_sum=True)
    return mean, extra


def _gradients(entry, params, seed=0, via=None):
    return _inputs(entry, _per_example(params, seed), via)


def _params(dtype=jnp.float32):
    return {"w": jnp.full((3, 2), 0.5, dtype), "b": jnp.full((2,), -0.5, dtype)}


def _float_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]


def _dtypes(tree):
    return jax.tree_util.tree_structure(tree), [jnp.result_type(x) for x in jax.tree_util.tree_leaves(tree)]


SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])
DTYPES = (jnp.float32, jnp.bfloat16)


@functools.cache
def _cached_inputs(via, batch_size, dtype, seed, extrapolated=False, curvature=False):
    """``_gradients`` of an entry with these ``stats``/``batch_size``/``extrapolated`` needs, computed once and
    shared by all entries."""
    entry = Entry(None, {}, stats=via, batch_size=batch_size, extrapolated=extrapolated, curvature=curvature)
    return _inputs(entry, _per_example(_params(dtype), seed))


def _entry_inputs(entry, dtype, seed, via=None):
    return _cached_inputs(via or entry.stats, entry.batch_size, dtype, seed, entry.extrapolated, entry.curvature)


def _placed_init(tx, params):
    """The initial state put on the first device with an explicit sharding (as a sharded checkpoint restores it)."""
    state = jax.device_put(tx.init(params), SHARDING)
    assert all(x.sharding == SHARDING for x in jax.tree_util.tree_leaves(state))
    return state


@functools.cache
def _jitted_updates(name):
    """Three jitted updates of one instance of the entry from states put on a device with an explicit sharding, for
    float32 and bfloat16 params at once (one jitted function: one compilation per entry instead of one per dtype and
    test), with the number of traces after the first call and at the end. Shared by the tests of one entry, which
    run on one worker (``xdist_group``)."""
    entry = REGISTRY[name]
    tx, traces = entry.make(), []

    @jax.jit
    def update(per_dtype):
        traces.append(1)
        return {d: tx.update(u, s, p, **extra) for d, (u, s, p, extra) in per_dtype.items()}

    params = {str(jnp.dtype(d)): _params(d) for d in DTYPES}
    states = {d: _placed_init(tx, p) for d, p in params.items()}
    initial, steps = dict(states), []
    for seed in range(3):
        inputs = {d: _entry_inputs(entry, jnp.dtype(d), seed) for d in params}
        out = update({d: (inputs[d][0], states[d], params[d], inputs[d][1]) for d in params})
        states = {d: s for d, (_, s) in out.items()}
        steps.append(out)
        if seed == 0:
            after_first = len(traces)
    return tx, params, initial, steps, after_first, len(traces)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_finite_state_placed_with_a_sharding(name):
    """Three updates under ``jit`` from a state put on a device with an explicit sharding (``jax.device_put``, as
    a sharded checkpoint restores it): the state stays finite and keeps its sharding."""
    *_, steps, _, _ = _jitted_updates(name)
    updates, state = steps[-1]["float32"]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in _float_leaves(state) + _float_leaves(updates))
    assert all(x.sharding == SHARDING for x in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_kept(name, dtype):
    """The updates have the params' dtype, and the state's leaf dtypes do not drift over three jitted updates."""
    _, params, initial, steps, _, _ = _jitted_updates(name)
    key = str(jnp.dtype(dtype))
    for out in steps:
        updates, state = out[key]
        for u, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params[key]), strict=True):
            assert u.dtype == dtype and u.shape == p.shape
        assert _dtypes(state) == _dtypes(initial[key])


@pytest.mark.parametrize("name", NAMES)
def test_no_recompilation_on_second_call(name):
    *_, after_first, after_all = _jitted_updates(name)
    assert after_all == after_first


CONVERGENCE_X = jax.random.normal(jax.random.key(0), (64, 3))
CONVERGENCE_Y = CONVERGENCE_X @ jnp.array([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]]) + 0.3
_EIGENVALUES = np.linalg.eigvalsh(  # of the Hessian of the per-example loss's mean: [x, 1]ᵀ[x, 1]/64 (per output)
    np.c_[np.asarray(CONVERGENCE_X, np.float64), np.ones(64)].T
    @ np.c_[np.asarray(CONVERGENCE_X, np.float64), np.ones(64)]
    / 64
)
CONVERGENCE_SPECTRUM = curvature.Spectrum(
    jnp.asarray([[_EIGENVALUES[0], _EIGENVALUES[-1]]], jnp.float32), jnp.full((1, 2), 0.5), jnp.asarray(8, jnp.int32)
)


def _convergence_losses(p, idx):
    return 0.5 * jnp.sum((CONVERGENCE_X[idx] @ p["w"] + p["b"] - CONVERGENCE_Y[idx]) ** 2, axis=-1)


@functools.cache
def _compositions(name):
    """One jitted program per entry that runs every composition check from the same inputs: the plain update with
    and without unknown extra arguments, inside ``optax.chain``, under ``optax.inject_hyperparams``, four steps of
    ``optax.MultiSteps`` (k = 2, a ``lax.scan``) and 300 steps on a small least-squares problem (a ``lax.scan``).
    One compilation per entry instead of one per check; the tests below read its outputs."""
    entry = REGISTRY[name]
    plain = entry.make()
    params = _params()
    per_example = entry.stats == PE  # the mean comes out: only a transformation after it sees the same updates
    chained = optax.chain(plain, optax.scale(2.0)) if per_example else optax.chain(optax.identity(), plain)
    injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(**entry.kwargs)
    multi = optax.MultiSteps(entry.make(), every_k_schedule=2)
    descending = entry.make()
    if entry.step is not None:
        descending = optax.chain(descending, optax.scale(-entry.step))

    def descent_step(carry, k):
        p, s = carry
        idx = (jnp.arange(B) + B * k) % 64
        per_ex = jax.vmap(jax.grad(lambda q, i: _convergence_losses(q, i[None])[0]), in_axes=(None, 0))(p, idx)
        g, extra = _inputs(entry, per_ex)
        if entry.extrapolated:  # the mean gradient of the same examples at the extrapolated point
            tilde = optimizers.extrapolate(p, s, g)
            extra["extrapolated_grads"] = jax.grad(lambda q: jnp.mean(_convergence_losses(q, idx)))(tilde)
        u, s = descending.update(g, s, p, **extra)
        return (optax.apply_updates(p, u), s), None

    @jax.jit
    def run(grads, extra, plain_state, unknown, multi_inputs, params):
        out = {}
        out["expected"], out["plain_state"] = plain.update(grads, plain_state, params, **extra)
        out["with_unknown"], _ = plain.update(grads, plain_state, params, **unknown, **extra)
        out["chained"], _ = chained.update(grads, chained.init(params), params, **extra)
        out["injected"], out["injected_state"] = injected.update(grads, injected.init(params), params, **extra)

        def multi_step(state, inputs):
            updates, state = multi.update(inputs[0], state, params, **inputs[1])
            return state, updates

        out["multi_state"], out["multi_updates"] = jax.lax.scan(multi_step, multi.init(params), multi_inputs)
        (out["descended"], _), _ = jax.lax.scan(descent_step, (params, descending.init(params)), jnp.arange(300))
        return out

    grads, extra = _entry_inputs(entry, jnp.float32, 0)
    via = GS if entry.stats else None
    multi_inputs = jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *[_entry_inputs(entry, jnp.float32, seed, via) for seed in range(4)]
    )
    unknown = {"some_unknown": 1.0, "value": jnp.ones(())}
    return plain, run(grads, extra, _placed_init(plain, params), unknown, multi_inputs, params)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_extra_arguments_accepted(name):
    tx, out = _compositions(name)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    for a, e in zip(
        jax.tree_util.tree_leaves(out["with_unknown"]), jax.tree_util.tree_leaves(out["expected"]), strict=True
    ):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("name", NAMES)
def test_inside_chain_and_inject_hyperparams(name):
    entry = REGISTRY[name]
    _, out = _compositions(name)
    expected = out["expected"]
    factor = 2.0 if entry.stats == PE else 1.0
    for a, e in zip(jax.tree_util.tree_leaves(out["chained"]), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, factor * e, rtol=1e-6)
    for a, e in zip(jax.tree_util.tree_leaves(out["injected"]), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
    if rules.has_decision(out["plain_state"]):
        assert int(rules.next_batch_size(out["injected_state"])) == int(rules.next_batch_size(out["plain_state"]))


@pytest.mark.parametrize("name", NAMES)
def test_inside_multi_steps(name):
    """Gradient accumulation with ``optax.MultiSteps`` (k = 2): zero updates while accumulating, the inner
    transformation's update every second step, a finite state. Statistics come as ``grad_stats=`` (the
    accumulator has the shape of the params)."""
    _, out = _compositions(name)
    state = out["multi_state"]
    for seed in range(4):
        leaves = [np.asarray(u)[seed] for u in jax.tree_util.tree_leaves(out["multi_updates"])]
        if seed % 2 == 0:
            assert all(not np.any(u) for u in leaves), "updates while accumulating"
        else:
            assert any(np.any(u) for u in leaves), "no update at the end of the accumulation"
    assert int(state.gradient_step) == 2
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in _float_leaves(state))


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_a_small_problem(name):
    _, out = _compositions(name)
    start = float(jnp.mean(_convergence_losses(_params(), jnp.arange(64))))
    assert float(jnp.mean(_convergence_losses(out["descended"], jnp.arange(64)))) < 0.05 * start


def _takes_per_example(entry):
    return "per_example" in inspect.signature(entry.factory).parameters


TWO_ENTRY_POINTS = sorted(name for name, entry in REGISTRY.items() if _takes_per_example(entry))
GRAD_STATS_ONLY = sorted(name for name, entry in REGISTRY.items() if entry.stats and not _takes_per_example(entry))


def test_statistics_readers_declare_per_example_input():
    """Every transformation that reads per-example statistics takes them as ``grad_stats=`` by default (the optax
    convention: ``updates`` is the mean gradient) and per-example ``updates`` only when built with
    ``per_example=True``; the only exceptions have ``grad_stats=`` as their single entry point."""
    assert GRAD_STATS_ONLY == ["adascale", "scale_by_batch_size_surge"]
    for name in TWO_ENTRY_POINTS:
        entry = REGISTRY[name]
        assert entry.stats, name
        parameter = inspect.signature(entry.factory).parameters["per_example"]
        assert parameter.default is False and parameter.kind == parameter.KEYWORD_ONLY, name


@pytest.mark.parametrize("name", TWO_ENTRY_POINTS)
def test_mean_gradient_without_grad_stats_is_refused(name):
    """The mean gradient (or per-example gradients) without ``grad_stats=`` and without ``per_example=True`` is
    refused with a ``ValueError`` that names both ways out, never misread as per-example gradients."""
    entry = REGISTRY[name]
    tx = entry.factory(**{k: v for k, v in entry.kwargs.items() if k != "per_example"})
    params = _params()
    per_example = _per_example(params)
    mean, extra = _inputs(entry, per_example, via="mean")  # neither per-example nor grad_stats=
    for updates in (mean, per_example):
        with pytest.raises(ValueError, match=r"(?s)without grad_stats=.*per_example=True"):
            tx.update(updates, tx.init(params), params, **extra)
    with pytest.raises(ValueError, match="per_example"):
        entry.factory(**{**entry.kwargs, "per_example": "yes"})


@pytest.mark.parametrize("name", TWO_ENTRY_POINTS)
def test_per_example_equals_grad_stats(name):
    """``per_example=True`` on per-example gradients gives exactly the updates and states of the default
    (``grad_stats=`` of the same gradients, with their mean as ``updates``), over two updates."""
    entry = REGISTRY[name]
    params = _params()
    pe = entry.factory(**{**entry.kwargs, "per_example": True})
    gs = entry.factory(**{**entry.kwargs, "per_example": False})
    pe_state, gs_state = pe.init(params), gs.init(params)
    needs = stats.declared_needs(gs_state)
    extra = {"batch_size": jnp.int32(B)} if entry.batch_size else {}
    for seed in range(2):
        g = _per_example(params, seed)
        s = stats.from_per_example(
            g, sq_sum=needs.sq_sum, inner_sq_sum=needs.inner_sq_sum, leaf_sq_norm_sum=needs.leaf_sq_norm_sum
        )
        pe_updates, pe_state = pe.update(g, pe_state, params, **extra)
        gs_updates, gs_state = gs.update(s.mean, gs_state, params, grad_stats=s, **extra)
        assert _dtypes(pe_updates) == _dtypes(gs_updates) and _dtypes(pe_state) == _dtypes(gs_state)
        for a, b in zip(
            jax.tree_util.tree_leaves((pe_updates, pe_state)),
            jax.tree_util.tree_leaves((gs_updates, gs_state)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("name", GRAD_STATS_ONLY)
def test_grad_stats_only_transformations_refuse_a_missing_grad_stats(name):
    entry = REGISTRY[name]
    tx, params = entry.make(), _params()
    mean, extra = _inputs(entry, _per_example(params), via="mean")
    with pytest.raises(ValueError, match="grad_stats"):
        tx.update(mean, tx.init(params), params, **extra)
