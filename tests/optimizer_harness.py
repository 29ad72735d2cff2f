"""Shared harness of the reference tests of Eve, Tom and MaxVA: a noisy quadratic run by JAX and by a NumPy reference.

The problem is ``0.5 * sum(a * theta**2)`` per leaf with per-step Gaussian gradient noise (one noise draw per example
for per-example optimizers). :func:`run_reference` runs a float64 reference step loop on inputs rounded to a given
dtype (so a float32 JAX run is compared with a reference that sees the same float32-rounded hyperparameters, initial
parameters and noise), :func:`run_jax` runs an optax transformation under ``jit`` + ``lax.scan``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEPS = 100
# One leaf: the per-leaf code is the same for every leaf, and each leaf adds compile time (the multi-leaf
# handling is tested separately and in the common suite).
SHAPES = {"w": (4, 5)}


@contextlib.contextmanager
def x64_enabled():
    """Turn on float64 in JAX for the duration, restoring the previous setting."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # older JAX
        from jax.experimental import enable_x64

        with enable_x64():
            yield


def make_problem(seed: int = 0, examples: int | None = None, noise: float = 0.1):
    """Initial params, curvatures and noise ``(STEPS, [examples,] *shape)`` for the quadratic."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    curv = {k: rng.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()}
    lead = (STEPS,) if examples is None else (STEPS, examples)
    noises = {k: noise * rng.normal(size=(*lead, *s)) for k, s in SHAPES.items()}
    return params, curv, noises


def schedule_fn(count):
    """A decreasing learning-rate schedule of the 0-based update count."""
    return 1e-2 - 9e-3 * jnp.minimum(count, STEPS) / STEPS


def schedule_value(t: int, cast) -> float:
    """``schedule_fn(t)`` with the rounding of dtype ``cast`` (as JAX evaluates it)."""
    return float(cast(1e-2) - cast(9e-3) * cast(min(t, STEPS)) / cast(STEPS))


def rounded(kwargs: dict, input_dtype: str) -> dict:
    """Float hyperparameters (also inside tuples) rounded to ``input_dtype`` and back to Python floats."""
    cast = np.dtype(input_dtype).type

    def r(v):
        if isinstance(v, float):
            return float(cast(v))
        if isinstance(v, tuple):
            return tuple(r(x) for x in v)
        return v

    return {k: r(v) for k, v in kwargs.items()}


def run_reference(
    make_ref: Callable, input_dtype: str = "float64", *, examples: int | None = None, use_schedule: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Trajectory of the reference ``make_ref(params) -> obj`` with ``obj.step(grads, lr=...)`` and ``obj.params``."""
    cast = np.dtype(input_dtype).type
    params, curv, noise = jax.tree.map(lambda x: x.astype(input_dtype).astype(np.float64), make_problem(seed, examples))
    ref = make_ref(params)
    traj = {k: np.empty((STEPS, *s)) for k, s in SHAPES.items()}
    for t in range(STEPS):
        if examples is None:
            grads = {k: curv[k] * ref.params[k] + noise[k][t] for k in SHAPES}
        else:
            grads = {k: (curv[k] * ref.params[k])[None] + noise[k][t] for k in SHAPES}
        ref.step(grads, lr=schedule_value(t, cast) if use_schedule else None)
        for k in SHAPES:
            traj[k][t] = ref.params[k]
    return traj


def run_jax(
    factory: Callable, dtype, *, static: dict | None = None, numeric: dict | None = None, examples: int | None = None,
    feed: Callable | None = None, seed: int = 0,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Trajectory of ``factory(**static, **numeric)`` in ``dtype`` under ``jit`` + ``scan``.

    The ``numeric`` hyperparameters enter the compiled program as traced arguments (as through
    ``optax.inject_hyperparams``), so modes that differ only in them share one compilation; ``static`` ones (flags,
    schedules) are Python values. ``feed(per_example_grads) -> (updates, extra_kwargs)`` turns the per-example
    gradients into what ``update`` receives (default: the gradients as they are, no extra arguments).
    """
    static, numeric = dict(static or {}), dict(numeric or {})
    run = _compiled(factory, tuple(sorted(static.items())), tuple(sorted(numeric)), examples, feed)
    params, curv, noise = jax.tree.map(lambda x: jnp.asarray(x, dtype), make_problem(seed, examples))
    hp = {k: jnp.asarray(v, dtype) for k, v in numeric.items()}
    return jax.tree.map(np.asarray, run(params, curv, noise, hp))


@functools.cache
def _compiled(factory, static_items, numeric_keys, examples, feed):
    static = dict(static_items)
    feed = feed or (lambda g: (g, {}))

    # LLVM optimisation level 0: a third less compile time for these tiny programs (the float semantics are the same;
    # only the code generation is less optimised).
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(p0, curv, noise, hp):
        opt = factory(**static, **hp)

        def body(carry, n):
            p, state = carry
            if examples is None:
                grads = jax.tree.map(lambda a, x, e: a * x + e, curv, p, n)
            else:
                grads = jax.tree.map(lambda a, x, e: (a * x)[None] + e, curv, p, n)
            updates, extra = feed(grads)
            updates, state = opt.update(updates, state, p, **extra)
            p = optax.apply_updates(p, updates)
            return (p, state), p

        _, traj = jax.lax.scan(body, (p0, opt.init(p0)), noise)
        return traj

    return run


def in_dtype(dtype: str, fn: Callable):
    """Call ``fn()`` with JAX's x64 mode on when ``dtype`` is float64."""
    with x64_enabled() if dtype == "float64" else contextlib.nullcontext():
        return fn()


def assert_close(actual, expected, rtol, atol=0.0):
    for k in SHAPES:
        assert actual[k].shape == expected[k].shape
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


def max_rel_error(actual, expected, floor: float = 1e-3) -> float:
    """Largest ``|a - e| / max(|e|, floor)`` over every leaf and step (for reporting achieved tolerances)."""
    return max(float(np.max(np.abs(actual[k] - expected[k]) / np.maximum(np.abs(expected[k]), floor))) for k in SHAPES)


def split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """``(static, numeric)``: flags, strings, schedules and None stay Python values, numbers get traced."""
    static = {k: v for k, v in kwargs.items() if v is None or isinstance(v, bool | str) or callable(v)}
    return static, {k: v for k, v in kwargs.items() if k not in static}
