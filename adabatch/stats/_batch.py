"""Batches of examples: their size, and the loss of one example."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp

__all__ = ["example_loss", "leading_size"]


def leading_size(batch: Any) -> int:
    """The shared leading (example) axis of every leaf of ``batch``; a ``ValueError`` if they differ."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch must have at least one array leaf with a leading batch axis")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [tuple(jnp.shape(x)) for x in leaves]
        raise ValueError(f"batch leaves must share one leading batch axis; got shapes {shapes}")
    return cast(int, sizes.pop())  # not None: checked above


def example_loss(loss_fn: Callable) -> Callable:
    """The loss of one example (an unbatched pytree) as a scalar function of params."""

    def single(params, example):
        one = jax.tree_util.tree_map(lambda x: jnp.expand_dims(x, 0), example)
        return loss_fn(params, one)[0]

    return single
