"""Flax linen capture for ghost statistics (see :mod:`adabatch.ghost`).

While a ghost capture is active, ``flax.linen.intercept_methods`` routes the ``__call__`` of these linen layers to
:func:`adabatch.ghost.capture`:

=============================  ==========  ====================================================================
linen module                   ghost kind  conditions (otherwise the layer's parameters fall back to vmap)
=============================  ==========  ====================================================================
``Dense``                      dense       —
``DenseGeneral``               dense       ``batch_dims == ()``
``Conv``                       conv        no ``mask``, padding not CIRCULAR / REFLECT (any rank, strides,
                                           dilations, feature groups; CAUSAL for 1-D)
``Embed``                      embed       ``__call__`` only (a table also used by ``attend`` falls back)
``LayerNorm``, ``RMSNorm``,    layerwise   called on the input alone (no ``mask``)
``GroupNorm``, ``Einsum``
=============================  ==========  ====================================================================

A recognised layer that cannot be captured (a masked or circularly padded convolution, ``DenseGeneral`` with
``batch_dims``) is declined with its reason (:func:`adabatch.ghost.decline`), which the report shows.

Importing this module registers the backend; :mod:`adabatch.ghost` imports it by itself whenever ``flax.linen`` is
already imported, so users never need to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from adabatch.stats.ghost import capture, decline, register_capture_backend

__all__ = ["linen_capture"]

_LAYERWISE = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.Einsum)


def _as_tuple(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


def _describe(module: nn.Module, x: Any) -> tuple[str, tuple] | str | None:
    """(kind, config) for a supported layer called on ``x``, a reason string for a recognised layer that cannot
    be captured, or None for any other module."""
    kind = type(module)
    ndim = jnp.ndim(x)
    if kind is nn.Dense:
        return "dense", ((ndim - 1,), int(jnp.shape(x)[-1]), int(module.features))
    if kind is nn.DenseGeneral:
        if tuple(module.batch_dims):
            return "DenseGeneral with batch_dims (weights shared across a batch axis) has no ghost form"
        axes = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
        axes = tuple(a % ndim for a in axes)
        features = module.features if isinstance(module.features, tuple | list) else (module.features,)
        k_in = 1
        for a in axes:
            k_in *= int(jnp.shape(x)[a])
        k_out = 1
        for f in features:
            k_out *= int(f)
        return "dense", (axes, k_in, k_out)
    if kind is nn.Conv:
        kernel_size = _as_tuple(module.kernel_size, 1)
        rank = len(kernel_size)
        padding = canonicalize_padding(module.padding, rank)
        kernel_dilation = _as_tuple(module.kernel_dilation, rank)
        if module.mask is not None:
            return "masked convolution (its kernel is multiplied by a mask) falls back to vmap"
        if padding in ("CIRCULAR", "REFLECT"):
            return f"{padding} padding (the input is wrapped or mirrored before the convolution) falls back to vmap"
        if padding == "CAUSAL":
            if rank != 1 or _as_tuple(module.input_dilation, rank) != (1,):
                return "CAUSAL padding with input dilation (padded before dilating) falls back to vmap"
            padding = (((kernel_size[0] - 1) * kernel_dilation[0], 0),)
        padding = padding if isinstance(padding, str) else tuple((int(lo), int(hi)) for lo, hi in padding)
        return "conv", (
            kernel_size,
            _as_tuple(module.strides, rank),
            padding,
            _as_tuple(module.input_dilation, rank),
            kernel_dilation,
            int(module.feature_group_count),
        )
    if kind is nn.Embed:
        return "embed", ()
    if kind in _LAYERWISE:
        return "layerwise", ()
    return None


def _interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or len(args) != 1 or any(v is not None for v in kwargs.values()):
        return next_fun(*args, **kwargs)
    module = context.module
    described = _describe(module, args[0])
    if described is None:
        return next_fun(*args, **kwargs)
    params = module.variables.get("params", {})
    if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
        return next_fun(*args, **kwargs)
    name = "/".join(str(part) for part in module.path) or type(module).__name__
    if isinstance(described, str):
        decline(params, described, name)
        return next_fun(*args, **kwargs)
    kind, config = described
    unbound = module.clone(parent=None)

    def apply(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
        return unbound.apply({"params": dict(p)}, x)

    return capture(
        kind,
        dict(params),
        args[0],
        call=lambda: next_fun(*args, **kwargs),
        apply=apply,
        config=config,
        name=name,
    )


@contextlib.contextmanager
def linen_capture() -> Iterator[None]:
    """Route supported linen layers to :func:`adabatch.ghost.capture` while active (a no-op unless a ghost
    capture is recording)."""
    with nn.intercept_methods(_interceptor):
        yield


register_capture_backend("flax.linen", linen_capture)
