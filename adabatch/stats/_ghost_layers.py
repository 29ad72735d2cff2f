"""Plain-JAX layers that register themselves with the ghost capture (:mod:`adabatch.stats.ghost`): write a model
with :func:`dense`, :func:`conv`, :func:`embed` and :func:`layer` and ``grad_stats(..., method="ghost")`` covers
their parameters; outside a capture they compute the layer normally."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adabatch.stats._ghost import capture

__all__ = ["conv", "dense", "embed", "layer"]


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel + bias`` over the last axis of ``x`` (any leading axes), captured for ghost statistics.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import ghost
      >>> ghost.dense(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.zeros(4)).shape
      (2, 4)
    """
    params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}

    def apply(p, inputs):
        out = jnp.matmul(inputs, p["kernel"])
        return out + p["bias"] if "bias" in p else out

    config = ((jnp.ndim(x) - 1,), int(kernel.shape[0]), int(kernel.shape[1]))
    return capture("dense", params, x, call=lambda: apply(params, x), apply=apply, config=config, name="dense")


def conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    input_dilation: Sequence[int] | None = None,
    kernel_dilation: Sequence[int] | None = None,
    feature_group_count: int = 1,
) -> jax.Array:
    """A channels-last convolution ``x[N, *spatial, C_in]`` with an ``HWIO`` kernel (plus ``bias``), captured;
    ``feature_group_count`` :math:`G` splits the channels into :math:`G` groups (kernel
    ``(*kernel_size, C_in/G, C_out)``).

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import ghost
      >>> ghost.conv(jnp.ones((2, 8, 8, 1)), jnp.ones((3, 3, 1, 4)), strides=(2, 2)).shape
      (2, 4, 4, 4)
    """
    rank = kernel.ndim - 2
    ones = (1,) * rank
    pad = padding if isinstance(padding, str) else tuple((lo, hi) for lo, hi in padding)
    config = (
        tuple(kernel.shape[:rank]),
        tuple(strides or ones),
        pad,
        tuple(input_dilation or ones),
        tuple(kernel_dilation or ones),
        int(feature_group_count),
    )
    params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}

    def apply(p, inputs):
        spatial = "".join("HWDXYZ"[i] for i in range(rank))
        numbers = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
        out = jax.lax.conv_general_dilated(
            inputs,
            p["kernel"],
            config[1],
            pad,
            config[3],
            config[4],
            dimension_numbers=numbers,
            feature_group_count=config[5],
        )
        return out + p["bias"] if "bias" in p else out

    return capture("conv", params, x, call=lambda: apply(params, x), apply=apply, config=config, name="conv")


def embed(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows ``table[ids]`` (an embedding lookup), captured for ghost statistics.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import ghost
      >>> ghost.embed(jnp.eye(3), jnp.array([[2, 0]])).tolist()
      [[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]
    """
    params = {"embedding": table}

    def apply(p, inputs):
        return jnp.take(p["embedding"], inputs, axis=0)

    return capture("embed", params, ids, call=lambda: apply(params, ids), apply=apply, name="embed")


def layer(fn: Callable[[Any, jax.Array], jax.Array], params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """``fn(params, x)`` for a small layer that treats examples independently (a LayerNorm scale and bias, a
    per-channel scale), captured: its per-example gradients are formed for this layer alone (``b`` × its
    parameters) by a per-example VJP.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import ghost
      >>> scale_shift = lambda p, x: x * p["scale"] + p["bias"]
      >>> ghost.layer(scale_shift, {"scale": jnp.full(2, 2.0), "bias": jnp.ones(2)}, jnp.ones((1, 2))).tolist()
      [[3.0, 3.0]]
    """
    return capture("layerwise", dict(params), x, call=lambda: fn(params, x), apply=fn, name="layer")
