"""Cutting a batch into equal chunks (micro-batches, groups) with a padded, masked tail."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def split_batch(batch: Any, num_chunks: int, chunk_size: int, mask: jax.Array | None = None) -> tuple[Any, jax.Array]:
    """Reshape the ``b`` examples of ``batch`` into ``(num_chunks, chunk_size, ...)``, padding with copies of the last
    example, and return the ``(num_chunks, chunk_size)`` float32 weights: 1 for real examples (times ``mask`` when
    given), 0 for padding. ``num_chunks * chunk_size`` must be at least ``b``."""
    b = jnp.shape(jax.tree_util.tree_leaves(batch)[0])[0]
    padded = num_chunks * chunk_size
    index = jnp.minimum(jnp.arange(padded), b - 1)
    weights = (jnp.arange(padded) < b).astype(jnp.float32)
    if mask is not None:
        weights = weights * jnp.take(jnp.asarray(mask).astype(jnp.float32), index)
    chunks = jax.tree_util.tree_map(
        lambda x: jnp.take(x, index, axis=0).reshape((num_chunks, chunk_size) + jnp.shape(x)[1:]), batch
    )
    return chunks, weights.reshape(num_chunks, chunk_size)
