"""Flax NNX capture for ghost statistics (see :mod:`adabatch.ghost`).

While a ghost capture is active, the ``__call__`` of these NNX layers is routed to :func:`adabatch.ghost.capture`,
like their linen counterparts (``adabatch.flax._ghost``):

=============================  ==========  ====================================================================
NNX module                     ghost kind  conditions (otherwise the layer's parameters fall back to vmap)
=============================  ==========  ====================================================================
``Linear``                     dense       stock ``dot_general`` and ``promote_dtype``, no
                                           ``preferred_element_type``
``LinearGeneral``              dense       the same, and no ``batch_axis``
``Conv``                       conv        the same (stock ``conv_general_dilated``), no ``mask``, one batch
                                           axis, padding not CIRCULAR / REFLECT (CAUSAL: 1-D without input
                                           dilation); feature groups are captured
``Embed``                      embed       ``__call__`` only (a table also used by ``attend`` falls back),
                                           ``num_embeddings > 1``, stock ``promote_dtype``
``LayerNorm``, ``RMSNorm``,    layerwise   called on the input alone (no ``mask``), no ``axis_name``
``GroupNorm``
``Einsum``                     layerwise   called on the input (and optionally ``einsum_str``)
=============================  ==========  ====================================================================

Only these exact classes are captured (a subclass may change what ``__call__`` computes: it falls back), each
called with the input alone (``out_sharding`` and the other call arguments ``None``), and only when the module's
variables are exactly its parameters (``kernel``/``bias``, ``embedding``, ``scale``/``bias``). The input of a dense
or conv layer is recorded after the layer's own dtype promotion (``dtype=``), i.e. as the matrix product sees it,
so a mixed-precision layer is exact up to the rounding of its gradient in the lower precision.

**Mechanism.** NNX has no ``intercept_methods``: :func:`nnx_capture` temporarily replaces the ``__call__`` of the
classes above by a wrapper and restores the original on exit (also on error). The replacement is process-wide but
reference-counted under a lock (the first capture to enter installs it, the last to leave restores it), and the
wrapper calls the original method unchanged unless a capture is active *in the calling thread* (a thread-local
depth), so concurrent threads that do not compute ghost statistics see no difference. ``apply(params, x)``
rebuilds the layer from its graph definition (``nnx.split``: static attributes only, no traced values) and the
given parameter values (``nnx.merge``) and runs the original ``__call__`` on it: exactly the layer's own
computation, for any parameter values.

**Parameter identity.** The ghost planner attributes a parameter leaf to a layer by the identity of the array:
``nnx.merge(graphdef, params)`` (what :func:`adabatch.flax.per_example_loss` does) stores the very arrays of
``params`` in the module's variables, and the wrapper reads them back without copying, so a leaf of the
:func:`adabatch.flax.nnx_params` pytree reaches its layer unchanged. A leaf read anywhere else (``Embed.attend``,
arithmetic on ``layer.kernel[...]``) is seen by the planner and falls back to vmap.

Importing this module registers the backend ``"flax.nnx"``; :mod:`adabatch.ghost` imports it by itself whenever
``flax.nnx`` is already imported, so users never need to.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn.linear import canonicalize_padding

from adabatch.stats import ghost as ghost_api
from adabatch.stats.ghost import capture, register_capture_backend

__all__ = ["nnx_capture"]

_DENSE = (nnx.Linear, nnx.LinearGeneral)
_NORMS = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)
_CAPTURED: tuple[type, ...] = (*_DENSE, nnx.Conv, nnx.Embed, *_NORMS, nnx.Einsum)
_ROLES: dict[type, frozenset[str]] = {
    nnx.Linear: frozenset({"kernel", "bias"}),
    nnx.LinearGeneral: frozenset({"kernel", "bias"}),
    nnx.Conv: frozenset({"kernel", "bias"}),
    nnx.Einsum: frozenset({"kernel", "bias"}),
    nnx.Embed: frozenset({"embedding"}),
    nnx.LayerNorm: frozenset({"scale", "bias"}),
    nnx.RMSNorm: frozenset({"scale"}),
    nnx.GroupNorm: frozenset({"scale", "bias"}),
}

_LOCK = threading.Lock()
_ORIGINALS: dict[type, Callable] = {}  # class -> its own __call__, while the wrappers are installed
_USERS = 0  # captures active in any thread
_LOCAL = threading.local()  # .depth: captures active in this thread


def _as_tuple(value: Any, rank: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def _compute_dtype(module: Any, x: jax.Array, values: Mapping[str, jax.Array]) -> Any:
    """The dtype the layer computes in (``promote_dtype`` of its input and parameters, or its ``dtype``)."""
    if module.dtype is not None:
        return jnp.dtype(module.dtype)
    return jnp.result_type(x, *values.values())


def _describe(module: Any, x: Any, values: Mapping[str, jax.Array]) -> tuple[str, tuple] | str | None:
    """(kind, config) for a supported layer called on ``x`` with parameter ``values``, a reason string for a
    configuration that falls back to vmap, or None when the call is not one the backend looks at."""
    kind = type(module)
    if not isinstance(x, jax.Array | np.ndarray):
        return None
    if kind in _NORMS:
        return ("layerwise", ()) if module.axis_name is None else "normalisation across devices (axis_name)"
    if kind is nnx.Einsum:
        return "layerwise", ()
    if module.promote_dtype is not nnx_dtypes.promote_dtype:
        return "a custom promote_dtype"
    if kind is nnx.Embed:
        if not jnp.issubdtype(x.dtype, jnp.integer):
            return None  # the layer itself raises
        return ("embed", ()) if module.num_embeddings > 1 else "num_embeddings == 1 (the row is broadcast)"
    if "kernel" not in values:
        return None
    if module.preferred_element_type is not None:
        return "preferred_element_type"
    ndim = x.ndim
    if kind is nnx.Linear:
        if module.dot_general is not jax.lax.dot_general:
            return "a custom dot_general"
        return ("dense", ((ndim - 1,), int(x.shape[-1]), int(module.out_features))) if ndim >= 1 else None
    if kind is nnx.LinearGeneral:
        if module.batch_axis:
            return "batch_axis (one kernel per index of a batch axis) has no ghost form"
        if module.dot_general is not None or module.dot_general_cls is not None:
            return "a custom dot_general"
        if not all(-ndim <= a < ndim for a in module.axis):
            return None
        axes = tuple(int(a) % ndim for a in module.axis)
        k_in = int(np.prod([x.shape[a] for a in axes]))
        return "dense", (axes, k_in, int(np.prod(module.out_features)))
    if kind is nnx.Conv:
        return _describe_conv(module, x)
    return None


def _describe_conv(module: Any, x: Any) -> tuple[str, tuple] | str | None:
    kernel_size = tuple(module.kernel_size)
    rank = len(kernel_size)
    try:
        padding = canonicalize_padding(module.padding, rank)
    except ValueError:  # the layer itself raises it
        return None
    input_dilation = _as_tuple(module.input_dilation, rank)
    kernel_dilation = _as_tuple(module.kernel_dilation, rank)
    if module.conv_general_dilated is not jax.lax.conv_general_dilated:
        return "a custom conv_general_dilated"
    if module.mask is not None:
        return "masked convolution (its kernel is multiplied by a mask)"
    if x.ndim != rank + 2:
        return "not exactly one batch axis"
    if padding == "CAUSAL" and rank == 1 and input_dilation == (1,):  # NNX pads before dilating the input
        padding = (((kernel_size[0] - 1) * kernel_dilation[0], 0),)
    elif isinstance(padding, str) and padding not in ("SAME", "VALID"):
        return f"{padding} padding"
    padding = padding if isinstance(padding, str) else tuple((int(lo), int(hi)) for lo, hi in padding)
    return "conv", (
        kernel_size,
        _as_tuple(module.strides, rank),
        padding,
        input_dilation,
        kernel_dilation,
        int(module.feature_group_count),
    )


@contextlib.contextmanager
def module_names(root: Any) -> Iterator[None]:
    """While a ghost capture is active in this thread, name the captured layers of ``root`` in reports by their
    attribute path (``blocks/0/attention/query``) instead of their class; :func:`adabatch.flax.per_example_loss`
    does this around the model call. A no-op otherwise."""
    if getattr(_LOCAL, "depth", 0) == 0:
        yield
        return
    previous = getattr(_LOCAL, "names", None)
    _LOCAL.names = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(root) if type(m) in _ROLES}
    try:
        yield
    finally:
        _LOCAL.names = previous


def _name(module: Any) -> str:
    names = getattr(_LOCAL, "names", None)
    if names and id(module) in names:
        return names[id(module)]
    kind = type(module)
    if kind is nnx.Linear or kind is nnx.LinearGeneral or kind is nnx.Conv:
        return f"nnx.{kind.__name__}({module.in_features}->{module.out_features})"
    if kind is nnx.Embed:
        return f"nnx.Embed({module.num_embeddings}, {module.features})"
    return f"nnx.{kind.__name__}"


def _call_arguments(module: Any, args: tuple, kwargs: dict) -> dict | None:
    """The call arguments besides the input that the layer can be replayed with (all None, or an Einsum's
    ``einsum_str``), or None when it cannot."""
    if len(args) != 1:
        return None
    extra = {key: value for key, value in kwargs.items() if value is not None}
    if type(module) is nnx.Einsum and set(extra) <= {"einsum_str"} and all(isinstance(v, str) for v in extra.values()):
        return extra
    return None if extra else {}


def _captured(original: Callable, module: Any, args: tuple, kwargs: dict) -> Any:
    extra = _call_arguments(module, args, kwargs)
    if extra is None:
        return original(module, *args, **kwargs)
    graphdef, state = nnx.split(module)
    values = nnx.to_pure_dict(state)
    if (
        not values
        or not set(values) <= _ROLES[type(module)]
        or not all(isinstance(v, jax.Array) for v in values.values())
    ):
        return original(module, *args, **kwargs)
    x = args[0]
    described = _describe(module, x, values)
    if isinstance(described, str):
        decline = getattr(ghost_api, "decline", None)  # an engine that reports why
        if decline is not None:
            decline(values, described, _name(module))
    if described is None or isinstance(described, str):
        return original(module, *args, **kwargs)
    kind, config = described
    inputs = x
    if kind in ("dense", "conv"):  # record the input as the product sees it, after the layer's promotion
        dtype = _compute_dtype(module, x, values)
        if jnp.result_type(x) != dtype:
            inputs = jnp.asarray(x, dtype)

    def apply(p: Mapping[str, jax.Array], z: jax.Array) -> jax.Array:
        return original(nnx.merge(graphdef, dict(p)), z, **extra)

    return capture(
        kind,
        dict(values),
        inputs,
        call=lambda: original(module, *args, **kwargs),
        apply=apply,
        config=config,
        name=_name(module),
    )


def _wrapper(cls: type, original: Callable) -> Callable:
    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        if getattr(_LOCAL, "depth", 0) == 0 or type(self) is not cls:
            return original(self, *args, **kwargs)
        return _captured(original, self, args, kwargs)

    __call__.__adabatch_original__ = original  # type: ignore[attr-defined]
    return __call__


def _install() -> None:
    for cls in _CAPTURED:
        original = cls.__dict__["__call__"]
        _ORIGINALS[cls] = original
        cls.__call__ = _wrapper(cls, original)  # type: ignore[method-assign]


def _restore() -> None:
    for cls, original in _ORIGINALS.items():
        current = cls.__dict__.get("__call__")
        if getattr(current, "__adabatch_original__", None) is original:  # unless someone wrapped it since
            cls.__call__ = original  # type: ignore[method-assign]
    _ORIGINALS.clear()


@contextlib.contextmanager
def nnx_capture() -> Iterator[None]:
    """Route supported NNX layers to :func:`adabatch.ghost.capture` while active (a no-op unless a ghost capture
    is recording in this thread).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from adabatch.flax import nnx_capture
      >>> layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> with nnx_capture():  # outside a ghost pass, the layer computes as usual
      ...     layer(jnp.ones((1, 2))).shape
      (1, 3)
    """
    global _USERS
    with _LOCK:
        if _USERS == 0:
            _install()
        _USERS += 1
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1
        with _LOCK:
            _USERS -= 1
            if _USERS == 0:
                _restore()


register_capture_backend("flax.nnx", nnx_capture)
