"""Eager argument checks shared by every factory (``ValueError`` naming the argument and its value).

Values that are JAX tracers (for example hyperparameters passed through ``optax.inject_hyperparams``) cannot be
inspected in Python; the checks skip them, and the traced code never branches on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(value: Any) -> bool:
    """Whether ``value`` can be read in Python (not a tracer inside ``jit``/``inject_hyperparams``)."""
    return not isinstance(value, jax.core.Tracer)


def _as_float(name: str, value: Any) -> float | None:
    if not is_concrete(value):
        return None
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be a real number, got {value!r}") from exc
    # jnp.issubdtype: bfloat16 (which optax.inject_hyperparams gives bf16 parameters) is not a NumPy floating type
    if arr.shape != () or not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real scalar, got {value!r}")
    return float(arr)


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite real number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    x = _as_float(name, value)
    if x is None:
        return
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_unit_interval(name: str, value: Any, *, closed_left: bool = True) -> None:
    """Raise unless ``value`` lies in ``[0, 1)`` (or ``(0, 1)`` when ``closed_left`` is false)."""
    x = _as_float(name, value)
    if x is None:
        return
    low_ok = x >= 0 if closed_left else x > 0
    if not (math.isfinite(x) and low_ok and x < 1):
        interval = "[0, 1)" if closed_left else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an integer ``>= 1`` (Python or NumPy/JAX integer scalar)."""
    if value is None and allow_none:
        return
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if isinstance(value, bool) or arr.shape != () or not np.issubdtype(arr.dtype, np.integer) or int(arr) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Raise unless ``value`` is one of ``choices``, listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_floating_tree(name: str, tree: Any) -> None:
    """Raise unless every leaf of ``tree`` has a floating dtype."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            where = jax.tree_util.keystr(path) or "<root>"
            raise ValueError(f"{name}{where} must have a floating dtype, got {dtype}")


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are accumulated in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def tree_accumulation_dtype(tree: Any) -> jnp.dtype:
    """:func:`accumulation_dtype` of the result type of ``tree``'s leaves (float32 for an empty tree)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return accumulation_dtype(jnp.result_type(*leaves)) if leaves else jnp.dtype(jnp.float32)


def check_flag(name: str, value: Any) -> None:
    """Raise unless ``value`` is a Python (or NumPy) bool: a flag that selects the program's structure."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be a Python bool (it selects the program structure), got {value!r}")


def check_state_dtype(state_dtype: Any) -> None:
    """Raise unless ``state_dtype`` is None or a floating dtype."""
    if state_dtype is None:
        return
    try:
        dtype = jnp.dtype(state_dtype)
    except TypeError as exc:
        raise ValueError(f"state_dtype must be a floating dtype or None, got {state_dtype!r}") from exc
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"state_dtype must be a floating dtype or None, got {state_dtype!r}")


def one_minus_pow(beta: Any, t: Any) -> jax.Array:
    """``1 - beta**t`` without the cancellation of the naive form in low precision (beta = 0 gives 1 for t >= 1)."""
    return -jnp.expm1(t * jnp.log(beta))


def state_leaf_dtype(param: Any, state_dtype: Any = None) -> jnp.dtype:
    """The dtype of an optimizer-state leaf for ``param``: ``state_dtype`` when given, else
    :func:`accumulation_dtype` of the parameter's dtype."""
    return jnp.dtype(state_dtype) if state_dtype is not None else accumulation_dtype(jnp.result_type(param))
