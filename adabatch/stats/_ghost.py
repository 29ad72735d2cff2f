r"""Ghost statistics: exact per-example gradient statistics without materialising per-example gradients.

A layer :math:`y = f(x; W)` that is linear in its weights has per-example weight gradient
:math:`g_i = \sum_t a_{it}\,\delta_{it}^\top = A_i^\top\Delta_i` where :math:`a_{it}` are the rows of the layer
input of example :math:`i` (one row per position :math:`t` of a sequence axis, or per patch of a convolution) and
:math:`\delta_{it} = \partial\ell_i/\partial y_{it}` the gradient of the example's loss at the layer output. The
statistics need only :math:`A_i` and :math:`\Delta_i` (both of activation size):

* without a sequence axis (:math:`T=1`): :math:`\lVert g_i\rVert^2 = \lVert a_i\rVert^2\lVert\delta_i\rVert^2`,
  :math:`\sum_i g_i\odot g_i = (a\odot a)^\top(\delta\odot\delta)` and
  :math:`\langle g_i, D\rangle = a_i^\top D\,\delta_i`;
* with a sequence axis, the layer's own per-example gradients :math:`A_i^\top\Delta_i` ("direct": the
  weight-gradient product of a plain backward pass, kept per example; its sum over :math:`i` is that product, so
  it costs no extra flops) while :math:`d_\text{in}d_\text{out}\le 4T(d_\text{in}+d_\text{out})`, i.e. while
  a per-example layer gradient is at most 4× the layer's per-example activations; otherwise the Gram form
  :math:`\lVert g_i\rVert^2 = \langle A_iA_i^\top, \Delta_i\Delta_i^\top\rangle_F` (memory :math:`T^2`
  per example, :math:`2T^2(d_\text{in}+d_\text{out})` extra flops). :math:`S_2` with a sequence axis always
  takes the direct form: it has no Gram identity.

Convolutions become dense layers on their input patches (:math:`T` = output positions), embeddings use the one-hot
form (:math:`\lVert g_i\rVert^2=\sum_{t,s}[x_{it}=x_{is}]\,\delta_{it}\cdot\delta_{is}`), and small
element-wise layers (LayerNorm/RMSNorm scale and bias, einsums) get their per-example gradients by a per-example
VJP of the layer alone (``"layerwise"``: :math:`b\times` that layer's parameters only).

How :math:`A_i` and :math:`\Delta_i` are obtained: the batch is run *per example* under ``jax.vmap`` (exactly the
semantics of ``method="vmap"``), the layer inputs are recorded, and a zero perturbation is added at every captured
layer output; the gradient with respect to the perturbation is :math:`\Delta`. Parameters are not differentiated
at all, except the ones no captured layer covers: their per-example gradients come out of the same ``vmap``
(``"vmap"`` fallback, :math:`b\times` those parameters only). One forward and one backward pass in all.

Layers are found by *capture backends* while ``loss_fn`` is traced: :func:`adabatch.flax.linen_capture`
intercepts Flax linen ``Dense``, ``DenseGeneral``, ``Conv``, ``Embed``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``
and ``Einsum`` (loaded automatically when flax is imported); in plain JAX write layers with
:func:`~adabatch.stats.ghost.dense`, :func:`~adabatch.stats.ghost.conv`, :func:`~adabatch.stats.ghost.embed` and
:func:`~adabatch.stats.ghost.layer`, which compute the layer normally and register it when a capture is active. A
parameter leaf is attributed to a layer by identity (the array passed in ``params`` reaches the layer unchanged);
a leaf that is also used outside its captured layers, or by two different layers, falls back to vmap. The report
(:func:`ghost_report`, or ``grad_stats(..., return_report=True)``) says which path each leaf took.

The model must treat examples independently (no batch statistics, e.g. BatchNorm in training mode), as for vmap.

References:
  Goodfellow, "Efficient Per-Example Gradient Computations", 2015, https://arxiv.org/abs/1510.01799.
  Li, Tramèr, Liang, Hashimoto, "Large Language Models Can Be Strong Differentially Private Learners", 2021,
  https://arxiv.org/abs/2110.05679 (ghost clipping, Gram form).
  Bu, Mao, Xu, "Scalable and Efficient Training of Large Convolutional Neural Networks with Differential Privacy",
  2022, https://arxiv.org/abs/2205.10683 (choosing the Gram or the direct form per layer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adabatch._validation import accumulation_dtype
from adabatch.stats._batch import example_loss
from adabatch.stats._grad_stats import GradStats, _leaf_sums

__all__ = [
    "GhostPlan",
    "capture",
    "conv",
    "dense",
    "embed",
    "ghost_report",
    "layer",
    "plan_ghost",
    "register_backend_provider",
    "register_capture_backend",
]

KINDS = ("dense", "conv", "embed", "layerwise")
# A dense layer with a sequence axis keeps its per-example weight gradients (fewest flops: the weight-gradient
# product itself) when they are at most this many times its per-example activations, else uses the Gram form.
DIRECT_FACTOR = 4
_BACKENDS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}
_PROVIDERS: dict[str, str] = {}  # framework module -> module that registers its backend when imported
_LOCAL = threading.local()


def register_capture_backend(name: str, factory: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Register a context-manager factory that, while active, routes a framework's layer calls to :func:`capture`
    (``adabatch.flax`` registers ``"flax.linen"`` this way)."""
    _BACKENDS[name] = factory


def register_backend_provider(framework: str, provider: str) -> None:
    """Import module ``provider`` (which calls :func:`register_capture_backend`) the first time statistics are
    computed after module ``framework`` was imported by the user's code. The statistics layer never imports a
    framework itself; the package root wires ``"flax.linen"`` to ``adabatch.flax`` this way."""
    _PROVIDERS[framework] = provider


def _load_backends() -> None:
    for framework, provider in _PROVIDERS.items():
        if framework in sys.modules:  # only when the user's model already imported the framework
            importlib.import_module(provider)


@dataclasses.dataclass
class _Call:
    """One captured layer call as seen while planning (static: shapes, roles, attribution)."""

    kind: str
    config: tuple
    name: str
    roles: tuple[tuple[str, int], ...]  # (parameter role, index of the params leaf)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    apply: Callable[[Mapping[str, jax.Array], jax.Array], jax.Array]
    active: bool = True


class _Recorder:
    def __init__(self, mode: str, calls: list | None = None, perturbations: Sequence[jax.Array] = ()):
        self.mode = mode  # "plan" or "run"
        self.calls: list[_Call | None] = [] if calls is None else calls
        self.perturbations = list(perturbations)
        self.leaf_index: dict[int, int] = {}
        self.inputs: list[jax.Array] = []
        self.position = 0
        self.busy = False

    def run_layer(self, call: Callable[[], jax.Array]) -> jax.Array:
        self.busy = True
        try:
            return call()
        finally:
            self.busy = False


def _current() -> _Recorder | None:
    stack = getattr(_LOCAL, "stack", [])
    return stack[-1] if stack else None


@contextlib.contextmanager
def _recording(recorder: _Recorder) -> Iterator[_Recorder]:
    _load_backends()
    stack = _LOCAL.__dict__.setdefault("stack", [])
    with contextlib.ExitStack() as backends:
        for factory in _BACKENDS.values():
            backends.enter_context(factory())
        stack.append(recorder)
        try:
            yield recorder
        finally:
            stack.pop()


def capture(
    kind: str,
    params: Mapping[str, Any],
    inputs: jax.Array,
    *,
    call: Callable[[], jax.Array],
    apply: Callable[[Mapping[str, jax.Array], jax.Array], jax.Array],
    config: tuple = (),
    name: str = "",
) -> jax.Array:
    """Run one layer call, recording it when a ghost capture is active (the hook every backend calls).

    Args:
      kind: ``"dense"`` (config ``(contracted_axes, k_in, k_out)``; roles ``kernel``, ``bias``), ``"conv"``
        (config ``(kernel_size, strides, padding, input_dilation, kernel_dilation)``, channels last, HWIO
        kernel), ``"embed"`` (role ``embedding``, ``inputs`` the integer ids) or ``"layerwise"`` (any per-example
        layer; exact per-example gradients of this layer by a per-example VJP of ``apply``).
      params: the layer's parameters by role, each the very array found in the params pytree.
      inputs: the layer input (per-example under the capture).
      call: computes the layer output as the model normally would.
      apply: ``apply(params, inputs)`` recomputes the output for other parameter values.
      config: static description of the layer (see ``kind``).
      name: a readable name for reports.

    Returns:
      The layer output (plus a zero perturbation while capturing).
    """
    recorder = _current()
    if recorder is None or recorder.busy:
        return call()
    if recorder.mode == "plan":
        roles = tuple(sorted((role, recorder.leaf_index.get(id(leaf), -1)) for role, leaf in params.items()))
        if kind not in KINDS or not roles or any(index < 0 for _, index in roles):
            recorder.calls.append(None)
            return recorder.run_layer(call)
        stand_ins = {role: jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf)) for role, leaf in params.items()}
        out = recorder.run_layer(lambda: apply(stand_ins, inputs))
        recorder.calls.append(
            _Call(kind, tuple(config), name, roles, tuple(jnp.shape(inputs)), tuple(jnp.shape(out)), out.dtype, apply)
        )
        return out
    position = recorder.position
    recorder.position += 1
    if position >= len(recorder.calls):
        raise RuntimeError("ghost capture: the model made more layer calls than when it was planned")
    spec = recorder.calls[position]
    out = recorder.run_layer(call)
    if spec is None or not spec.active:
        return out
    if spec.kind != kind or spec.out_shape != tuple(jnp.shape(out)):
        raise RuntimeError(f"ghost capture: layer call {position} ({spec.name}) changed between planning and run")
    recorder.inputs.append(inputs)
    return out + recorder.perturbations[len(recorder.inputs) - 1]


# ----------------------------------------------------------------------------------------------------------------
# Plain-JAX layers that register themselves when a capture is active.


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
) -> jax.Array:
    """A channels-last convolution ``x[N, *spatial, C_in]`` with an ``HWIO`` kernel (plus ``bias``), captured.

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
    )
    params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}

    def apply(p, inputs):
        spatial = "".join("HWDXYZ"[i] for i in range(rank))
        numbers = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
        out = jax.lax.conv_general_dilated(
            inputs, p["kernel"], config[1], pad, config[3], config[4], dimension_numbers=numbers
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


# ----------------------------------------------------------------------------------------------------------------
# Planning: which leaves the captured layers cover.


@dataclasses.dataclass
class GhostPlan:
    """What a ghost pass computes for each parameter leaf (from tracing ``loss_fn`` on one example).

    Attributes:
      calls: the captured layer calls in trace order (``None`` for a call that could not be attributed).
      paths: ``jax.tree_util.keystr`` path of every params leaf, in flattening order.
      route: per leaf, ``"ghost"`` (captured layers only), ``"vmap"`` (per-example gradients of this leaf) or
        ``"unused"`` (the loss does not depend on it: zero gradient).
    """

    calls: list
    paths: list[str]
    route: list[str]

    def report(self) -> dict[str, str]:
        """Params path → ``"ghost"``, ``"vmap"`` or ``"unused"``."""
        return dict(zip(self.paths, self.route, strict=True))

    @property
    def covers_any(self) -> bool:
        return "ghost" in self.route


def _group_key(call: _Call) -> tuple:
    return (call.kind, call.config, call.roles)


def plan_ghost(example_loss: Callable, params: Any, example: Any) -> GhostPlan:
    """Trace ``example_loss(params, example) -> scalar`` once (abstractly) and decide each leaf's route.

    A leaf goes the ghost way when captured calls of one layer (same kind, configuration and leaves) are its only
    uses; the trace's jaxpr shows any other use, since captured layers run on stand-in parameters while planning.
    """
    path_leaves = jax.tree_util.tree_leaves_with_path(params)
    paths = [jax.tree_util.keystr(path) for path, _ in path_leaves]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    recorder = _Recorder("plan")

    def traced(leaves_, example_):
        recorder.leaf_index = {id(leaf): i for i, leaf in enumerate(leaves_)}
        with _recording(recorder):
            return example_loss(jax.tree_util.tree_unflatten(treedef, leaves_), example_)

    structs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
    example_structs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), example)
    closed = jax.make_jaxpr(traced)(structs, example_structs)
    used = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars} | {id(v) for v in closed.jaxpr.outvars}
    groups: dict[int, set] = {}
    for call in recorder.calls:
        if call is not None:
            for _, index in call.roles:
                groups.setdefault(index, set()).add(_group_key(call))
    route = []
    for i, var in enumerate(closed.jaxpr.invars[: len(leaves)]):
        if id(var) not in used and len(groups.get(i, ())) == 1:
            route.append("ghost")
        else:
            route.append("vmap" if id(var) in used or i in groups else "unused")
    for call in recorder.calls:
        if call is not None:
            call.active = any(route[index] == "ghost" for _, index in call.roles)
    return GhostPlan(recorder.calls, paths, route)


def ghost_report(loss_fn: Callable, params: Any, batch: Any) -> dict[str, str]:
    """Which path each parameter leaf takes under ``grad_stats(..., method="ghost")``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import ghost
      >>> def loss_fn(p, x):
      ...     return jnp.sum(ghost.dense(x, p["w"]) * p["v"], axis=-1)
      >>> ghost.ghost_report(loss_fn, {"w": jnp.ones((3, 2)), "v": jnp.ones(2)}, jnp.ones((4, 3)))
      {"['v']": 'vmap', "['w']": 'ghost'}
    """
    example = jax.tree_util.tree_map(lambda x: x[0], batch)
    return plan_ghost(example_loss(loss_fn), params, example).report()


# ----------------------------------------------------------------------------------------------------------------
# The pass and the per-layer identities.


@dataclasses.dataclass
class _LeafStats:
    s1: jax.Array  # leaf-shaped Σ_i w_i g_i
    sq: jax.Array  # (b,) w_i ‖g_i‖²
    s2: jax.Array | None  # leaf-shaped Σ_i w_i g_i ⊙ g_i
    per_example: jax.Array | None = None  # (b, *leaf) when materialised (layerwise / fallback / direct)
    rows: tuple | None = None  # (A, Δ) for the T == 1 or Gram inner products


def _rows(x: jax.Array, delta: jax.Array, axes: tuple[int, ...], k_in: int, k_out: int, dtype) -> tuple:
    b = x.shape[0]
    moved = jnp.moveaxis(x, [a + 1 for a in axes], list(range(x.ndim - len(axes), x.ndim)))
    return moved.reshape(b, -1, k_in).astype(dtype), delta.reshape(b, -1, k_out).astype(dtype)


def _patches(x: jax.Array, config: tuple, dtype) -> jax.Array:
    kernel_size, strides, padding, input_dilation, kernel_dilation = config
    rank = len(kernel_size)
    b, channels = x.shape[0], x.shape[-1]
    flat = x.reshape((-1,) + x.shape[x.ndim - rank - 1 :]).astype(dtype)
    spatial = "".join("HWDXYZ"[i] for i in range(rank))
    patches = jax.lax.conv_general_dilated_patches(
        flat,
        kernel_size,
        strides,
        padding,
        input_dilation,
        kernel_dilation,
        dimension_numbers=("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"),
    )
    # features come out as (C_in, *kernel_size); HWIO kernels flatten as (*kernel_size, C_in)
    patches = patches.reshape(patches.shape[:-1] + (channels, int(np.prod(kernel_size))))
    patches = jnp.swapaxes(patches, -1, -2)
    return patches.reshape(b, -1, int(np.prod(kernel_size)) * channels)


def _linear_stats(a: jax.Array, d: jax.Array, shape: tuple, sq_sum: bool) -> _LeafStats:
    """Statistics of the kernel gradients g_i = A_iᵀΔ_i (A: (b, T, k_in), Δ: (b, T, k_out))."""
    t, k_in, k_out = a.shape[1], a.shape[2], d.shape[2]
    if t == 1:
        a1, d1 = a[:, 0], d[:, 0]
        s1 = a1.T @ d1
        sq = jnp.sum(jnp.square(a1), 1) * jnp.sum(jnp.square(d1), 1)
        s2 = jnp.square(a1).T @ jnp.square(d1) if sq_sum else None
        return _LeafStats(s1.reshape(shape), sq, None if s2 is None else s2.reshape(shape), rows=(a, d))
    if sq_sum or k_in * k_out <= DIRECT_FACTOR * t * (k_in + k_out) or t * t >= k_in * k_out:
        # direct: the weight-gradient product, kept per example (its sum over examples is the mean's numerator)
        g = jnp.einsum("bti,bto->bio", a, d)
        s2 = jnp.sum(jnp.square(g), 0).reshape(shape) if sq_sum else None
        return _LeafStats(jnp.sum(g, 0).reshape(shape), jnp.sum(jnp.square(g), (1, 2)), s2, per_example=g)
    gram = jnp.einsum("bti,bsi->bts", a, a) * jnp.einsum("bto,bso->bts", d, d)
    return _LeafStats(jnp.einsum("bti,bto->io", a, d).reshape(shape), jnp.sum(gram, (1, 2)), None, rows=(a, d))


def _materialised(g: jax.Array, sq_sum: bool) -> _LeafStats:
    flat = g.reshape(g.shape[0], -1)
    s2 = jnp.sum(jnp.square(g), 0) if sq_sum else None
    return _LeafStats(jnp.sum(g, 0), jnp.sum(jnp.square(flat), 1), s2, per_example=g)


def _embed_stats(ids: jax.Array, d: jax.Array, shape: tuple, sq_sum: bool) -> _LeafStats:
    b, vocab, features = d.shape[0], shape[0], shape[1]
    ids = ids.reshape(b, -1)
    d = d.reshape(b, -1, features)
    t = ids.shape[1]
    s1 = jnp.zeros(shape, d.dtype).at[ids.reshape(-1)].add(d.reshape(-1, features))
    if sq_sum or vocab <= DIRECT_FACTOR * t or t * t >= vocab * features:
        g = jnp.zeros((b, vocab, features), d.dtype).at[jnp.arange(b)[:, None], ids].add(d)
        return _materialised(g, sq_sum)
    same = (ids[:, :, None] == ids[:, None, :]).astype(d.dtype)
    sq = jnp.sum(same * jnp.einsum("btf,bsf->bts", d, d), (1, 2))
    return _LeafStats(s1, sq, None, rows=(ids, d))


def _inner(kind: str, stats: _LeafStats, mean: jax.Array) -> jax.Array:
    """⟨g_i, mean⟩ for every example (``mean`` leaf-shaped)."""
    if stats.per_example is not None:
        g = stats.per_example
        return jnp.sum(g.reshape(g.shape[0], -1) * mean.reshape(1, -1), 1)
    assert stats.rows is not None  # set whenever the per-example gradients are not materialised
    a, d = stats.rows
    if kind == "embed":
        return jnp.sum(jnp.take(mean, a, axis=0) * d, (1, 2))
    return jnp.einsum("bti,io,bto->b", a, mean.reshape(a.shape[2], d.shape[2]), d)


def _group_stats(
    calls: list[_Call], xs: list, deltas: list, leaves: list, weigh: Callable, dtype, sq_sum: bool
) -> dict:
    """Per leaf index: (kind, _LeafStats) for one layer's captured calls (all of one group), weighted by the
    examples' 0/1 weights through ``weigh``."""
    first = calls[0]
    roles = dict(first.roles)
    if first.kind == "layerwise":
        values = {role: leaves[index] for role, index in roles.items()}
        total: Any = None  # params-shaped sum over the calls
        for call, x, delta in zip(calls, xs, deltas, strict=True):

            def one(xi, di, call=call):
                out, vjp = jax.vjp(lambda p: call.apply(p, xi), values)
                return vjp(di.astype(out.dtype))[0]

            g = jax.vmap(one)(x, delta)
            total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
        return {index: ("layerwise", _materialised(weigh(total[role]), sq_sum)) for role, index in roles.items()}
    deltas = [weigh(dl) for dl in deltas]
    if first.kind == "embed":
        ids = jnp.concatenate([x.reshape(x.shape[0], -1) for x in xs], 1)
        d = jnp.concatenate([dl.reshape(dl.shape[0], -1, dl.shape[-1]).astype(dtype) for dl in deltas], 1)
        index = roles["embedding"]
        return {index: ("embed", _embed_stats(ids, d, jnp.shape(leaves[index]), sq_sum))}
    kernel_shape = jnp.shape(leaves[roles["kernel"]])
    if first.kind == "conv":
        k_in, k_out = int(np.prod(kernel_shape[:-1])), int(kernel_shape[-1])
        pairs = [
            (_patches(x, first.config, dtype), dl.reshape(dl.shape[0], -1, k_out))
            for x, dl in zip(xs, deltas, strict=True)
        ]
    else:
        axes, k_in, k_out = first.config
        pairs = [_rows(x, dl, axes, k_in, k_out, dtype) for x, dl in zip(xs, deltas, strict=True)]
    a = jnp.concatenate([p[0] for p in pairs], 1).astype(dtype)
    d = jnp.concatenate([p[1] for p in pairs], 1).astype(dtype)
    out = {roles["kernel"]: (first.kind, _linear_stats(a, d, kernel_shape, sq_sum))}
    if "bias" in roles:
        out[roles["bias"]] = (
            "bias",
            _materialised(jnp.sum(d, 1).reshape((-1,) + jnp.shape(leaves[roles["bias"]])), sq_sum),
        )
    return out


def ghost_stats(
    plan: GhostPlan,
    example_loss: Callable,
    params: Any,
    batch: Any,
    weights: jax.Array,
    *,
    sq_sum: bool = False,
    inner_sq_sum: bool = False,
    leaf_sq_norm_sum: bool = False,
) -> tuple[GradStats, jax.Array]:
    """One ghost pass over ``batch`` (leading axis = examples) with 0/1 example ``weights``; ``leaf_sq_norm_sum``
    keeps the per-leaf :math:`q_l` that :math:`q` sums (no extra work).

    Returns:
      ``(GradStats, per-example losses)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    dtype = accumulation_dtype(jnp.result_type(*leaves))
    fallback = [i for i, r in enumerate(plan.route) if r == "vmap"]
    active = [c for c in plan.calls if c is not None and c.active]
    perturbations = [jnp.zeros(c.out_shape, c.out_dtype) for c in active]

    def per_example(fallback_leaves, perturbations_, example):
        current = list(leaves)
        for i, leaf in zip(fallback, fallback_leaves, strict=True):
            current[i] = leaf
        recorder = _Recorder("run", plan.calls, perturbations_)
        with _recording(recorder):
            loss = example_loss(jax.tree_util.tree_unflatten(treedef, current), example)
        if recorder.position != len(plan.calls):
            raise RuntimeError(
                "ghost capture: the model made fewer layer calls than when it was planned (is loss_fn wrapped in "
                "jax.jit? pass the un-jitted function, or use method='vmap')"
            )
        return loss, tuple(recorder.inputs)

    grad_fn = jax.value_and_grad(per_example, argnums=(0, 1), has_aux=True)
    (losses, inputs), (fallback_grads, deltas) = jax.vmap(grad_fn, in_axes=(None, None, 0))(
        [leaves[i] for i in fallback], perturbations, batch
    )
    w = weights.astype(dtype)
    count = jnp.sum(w)
    safe_count = jnp.maximum(count, 1)

    def weigh(x):
        return x.astype(dtype) * w.reshape((-1,) + (1,) * (x.ndim - 1))

    per_leaf: dict[int, tuple] = {}
    for i, g in zip(fallback, fallback_grads, strict=True):
        per_leaf[i] = ("vmap", _materialised(weigh(g), sq_sum))
    groups: dict[tuple, list[int]] = {}
    for n, call in enumerate(active):
        groups.setdefault(_group_key(call), []).append(n)
    for members in groups.values():
        calls = [active[n] for n in members]
        result = _group_stats(
            calls, [inputs[n] for n in members], [deltas[n] for n in members], leaves, weigh, dtype, sq_sum
        )
        for index, (kind, st) in result.items():
            if plan.route[index] == "ghost":
                per_leaf[index] = (kind, st)

    zeros = jnp.zeros(jnp.shape(weights), dtype)
    means: list[jax.Array] = []
    s2s: list[jax.Array | None] = []
    qs: list[jax.Array] = []
    a = zeros
    for i, leaf in enumerate(leaves):
        if i not in per_leaf:  # unused: zero gradient
            means.append(jnp.zeros(jnp.shape(leaf), dtype))
            s2s.append(jnp.zeros(jnp.shape(leaf), dtype))
            qs.append(jnp.zeros((), dtype))
            continue
        kind, st = per_leaf[i]
        mean = (st.s1 / safe_count).reshape(jnp.shape(leaf))
        means.append(mean)
        s2s.append(None if st.s2 is None else st.s2.reshape(jnp.shape(leaf)))
        qs.append(jnp.sum(st.sq))
        if inner_sq_sum:
            a = a + _inner(kind, st, mean)
    q, leaf_q = _leaf_sums(jax.tree_util.tree_unflatten(treedef, qs))
    stats = GradStats(
        count=count.astype(jnp.int32),
        mean=jax.tree_util.tree_unflatten(treedef, means),
        sq_norm_sum=q,
        sq_sum=jax.tree_util.tree_unflatten(treedef, s2s) if sq_sum else None,
        inner_sq_sum=jnp.sum(jnp.square(a)) if inner_sq_sum else None,
        leaf_sq_norm_sum=leaf_q if leaf_sq_norm_sum else None,
    )
    return stats, losses
