"""Searching nested optimizer states (base layer: imports nothing of adabatch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["find_state", "unwrap"]


def find_state(opt_state: Any, match: Callable[[Any], bool]) -> Any:
    """The first node of any nesting of states (depth-first, in chain order) for which ``match(node)`` holds, else
    None. Looks through tuples, lists, dicts, named tuples and objects' attributes (an ``nnx.Optimizer``, which is
    not a pytree of arrays, included)."""
    return _find(opt_state, match, set())


def _find(node: Any, match: Callable[[Any], bool], seen: set[int]) -> Any:
    if id(node) in seen:
        return None
    seen.add(id(node))
    if match(node):
        return node
    if isinstance(node, dict):
        children = list(node.values())
    elif isinstance(node, (tuple, list)):
        children = list(node)
    elif hasattr(node, "__dict__") and not isinstance(node, jax.Array):
        children = list(vars(node).values())
    else:
        return None
    for child in children:
        found = _find(child, match, seen)
        if found is not None:
            return found
    return None


def unwrap(value: Any) -> Any:
    """The array inside a variable wrapper (an ``nnx.Optimizer`` keeps its state in ``OptArray`` variables)."""
    return value if isinstance(value, jax.Array) or not hasattr(value, "value") else value.value
