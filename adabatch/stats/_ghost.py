r"""Ghost statistics: exact per-example gradient statistics without materialising per-example gradients.

A layer :math:`y = f(x; W)` that is linear in its weights has per-example weight gradient
:math:`g_i = \sum_t a_{it}\,\delta_{it}^\top = A_i^\top\Delta_i` where :math:`a_{it}` are the rows of the layer
input of example :math:`i` (one row per position :math:`t` of a sequence axis, or per patch of a convolution) and
:math:`\delta_{it} = \partial\ell_i/\partial y_{it}` the gradient of the example's loss at the layer output. The
statistics need only :math:`A_i` and :math:`\Delta_i` (both of activation size):

* without a sequence axis (:math:`T=1`): :math:`\lVert g_i\rVert^2 = \lVert a_i\rVert^2\lVert\delta_i\rVert^2`,
  :math:`\sum_i g_i\odot g_i = (a\odot a)^\top(\delta\odot\delta)` and
  :math:`\langle g_i, D\rangle = a_i^\top D\,\delta_i`;
* with a sequence axis (:math:`T>1` positions, or the output positions of a convolution), either the Gram form
  :math:`\lVert g_i\rVert^2 = \langle A_iA_i^\top, \Delta_i\Delta_i^\top\rangle_F` or the layer's own
  per-example gradients :math:`A_i^\top\Delta_i` ("direct"), and for embeddings also a sorted "segment" form;
  a cost model picks the cheapest exact form per layer at trace time from the static shapes and the statistics
  asked for (``adabatch.stats._ghost_forms`` has the formulas; ``docs/statistics.md`` the measurements).

Convolutions (1-D, 2-D, 3-D; strides, padding, dilations, feature groups) become :math:`G` dense layers on their
input patches (:math:`T` = output positions), embeddings read :math:`T` ids, and small element-wise layers
(LayerNorm/RMSNorm scale and bias, einsums) get their per-example gradients by a per-example VJP of the layer
alone (``"layerwise"``: :math:`b\times` that layer's parameters only).

How :math:`A_i` and :math:`\Delta_i` are obtained: the batch is run *per example* under ``jax.vmap`` (exactly the
semantics of ``method="vmap"``), the layer inputs are recorded, and every captured layer output passes through a
*tap*: an identity in the forward pass whose backward also hands the output's cotangent :math:`\Delta` to a probe
argument, so that the gradient with respect to the probe is :math:`\Delta` (the probe is never read in the forward
pass, so no zero perturbation of the layer's output size is materialised and added, as the usual trick does; on the
1-D convolution probe of the benchmarks that took the ghost step from 2.0× to 1.8× a plain step). Parameters are
not differentiated
at all, except the ones no captured layer covers: their per-example gradients come out of the same ``vmap``
(``"vmap"`` fallback, :math:`b\times` those parameters only). One forward and one backward pass in all.

Layers are found by *capture backends* while ``loss_fn`` is traced: :func:`adabatch.flax.linen_capture`
intercepts Flax linen ``Dense``, ``DenseGeneral``, ``Conv``, ``Embed``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``
and ``Einsum`` (loaded automatically when flax is imported); in plain JAX write layers with
:func:`~adabatch.stats.ghost.dense`, :func:`~adabatch.stats.ghost.conv`, :func:`~adabatch.stats.ghost.embed` and
:func:`~adabatch.stats.ghost.layer`, which compute the layer normally and register it when a capture is active. A
parameter leaf is attributed to a layer by identity (the array passed in ``params`` reaches the layer unchanged);
a leaf that is also used outside its captured layers, or by two different layers, falls back to vmap, and so do
the parameters of a layer a backend declines (``decline``, e.g. circular padding) or whose shapes do not fit
its kind. The report (:func:`ghost_report`, or ``grad_stats(..., return_report=True)``: a
``GhostReport``) says which path each leaf took, which form each layer took with its estimated cost, and why
a leaf fell back.

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

from adabatch._validation import accumulation_dtype
from adabatch.stats import _ghost_forms as forms_
from adabatch.stats._batch import example_loss
from adabatch.stats._ghost_forms import FORMS, Cost, GhostReport, LayerForm, LeafStats
from adabatch.stats._grad_stats import GradStats, _inner_sums, _leaf_sums

__all__ = [
    "FORMS",
    "Cost",
    "GhostPlan",
    "GhostReport",
    "LayerForm",
    "capture",
    "decline",
    "ghost_report",
    "plan_ghost",
    "register_backend_provider",
    "register_capture_backend",
]

KINDS = ("dense", "conv", "embed", "layerwise")
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
    form: str = ""  # set by planning: "gram", "direct", "segment" or "layerwise"


class _Recorder:
    def __init__(self, mode: str, calls: list | None = None, perturbations: Sequence[jax.Array] = ()):
        self.mode = mode  # "plan" or "run"
        self.calls: list[_Call | None] = [] if calls is None else calls
        self.perturbations = list(perturbations)
        self.leaf_index: dict[int, int] = {}
        self.declined: dict[int, str] = {}  # params leaf index -> why its layer was not captured
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
        (config ``(kernel_size, strides, padding, input_dilation, kernel_dilation[, feature_group_count])``,
        channels last, HWIO kernel of shape ``(*kernel_size, C_in/G, C_out)``), ``"embed"`` (role
        ``embedding``, ``inputs`` the integer ids) or ``"layerwise"`` (any per-example layer; exact per-example
        gradients of this layer by a per-example VJP of ``apply``).
      params: the layer's parameters by role, each the very array found in the params pytree.
      inputs: the layer input (per-example under the capture).
      call: computes the layer output as the model normally would.
      apply: ``apply(params, inputs)`` recomputes the output for other parameter values.
      config: static description of the layer (see ``kind``).
      name: a readable name for reports.

    Returns:
      The layer output (through the tap that yields its output gradient while capturing).
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
    return _tap(out, recorder.perturbations[len(recorder.inputs) - 1])


@jax.custom_vjp
def _tap(out: jax.Array, probe: jax.Array) -> jax.Array:
    """``out``, unchanged; the cotangent of ``out`` also becomes the gradient with respect to ``probe`` (an array
    of ``out``'s shape and dtype that is never read, so XLA drops it)."""
    del probe
    return out


def _tap_fwd(out: jax.Array, probe: jax.Array) -> tuple[jax.Array, None]:
    del probe
    return out, None


def _tap_bwd(_: None, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
    return cotangent, cotangent


_tap.defvjp(_tap_fwd, _tap_bwd)


def decline(params: Mapping[str, Any], reason: str, name: str = "") -> None:
    """Record that a layer a backend recognised cannot be captured (its parameters fall back to vmap), with the
    reason the report gives (e.g. ``"circular padding"``). A no-op unless a ghost plan is being traced."""
    recorder = _current()
    if recorder is None or recorder.busy or recorder.mode != "plan":
        return
    for leaf in params.values():
        index = recorder.leaf_index.get(id(leaf), -1)
        if index >= 0:
            recorder.declined[index] = f"{name}: {reason}" if name else reason


# ----------------------------------------------------------------------------------------------------------------
# Planning: which leaves the captured layers cover, and each layer's form.


@dataclasses.dataclass
class GhostPlan:
    """What a ghost pass computes for each parameter leaf (from tracing ``loss_fn`` on one example).

    Attributes:
      calls: the captured layer calls in trace order (``None`` for a call that could not be attributed).
      paths: ``jax.tree_util.keystr`` path of every params leaf, in flattening order.
      route: per leaf, ``"ghost"`` (captured layers only), ``"vmap"`` (per-example gradients of this leaf) or
        ``"unused"`` (the loss does not depend on it: zero gradient).
      layers: the form of every captured layer (see ``GhostReport``).
      reasons: per leaf index, why it is not ghost.
    """

    calls: list
    paths: list[str]
    route: list[str]
    layers: list[LayerForm] = dataclasses.field(default_factory=list)
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)

    def report(self) -> GhostReport:
        """The ``GhostReport`` of this plan."""
        forms = dict(zip(self.paths, self.route, strict=True))
        for layer in self.layers:
            for path in layer.paths:
                forms[path] = layer.form
        for call in self.calls:
            if call is not None and call.active and call.kind in ("dense", "conv") and "bias" in dict(call.roles):
                index = dict(call.roles)["bias"]
                if self.route[index] == "ghost":
                    forms[self.paths[index]] = "direct"
        reasons = {self.paths[i]: why for i, why in self.reasons.items()}
        return GhostReport(dict(zip(self.paths, self.route, strict=True)), self.layers, forms, reasons)

    @property
    def covers_any(self) -> bool:
        return "ghost" in self.route


def _group_key(call: _Call) -> tuple:
    return (call.kind, call.config, call.roles)


def _check_ghost_form(ghost_form: Any) -> None:
    if ghost_form is None:
        return
    values = [ghost_form] if isinstance(ghost_form, str) else list(dict(ghost_form).values())
    bad = [v for v in values if v not in FORMS]
    if bad:
        raise ValueError(f"ghost_form must be None, one of {FORMS} or a mapping layer name -> form; got {ghost_form!r}")


def _plan_forms(plan: GhostPlan, leaf_shapes: list[tuple], sq_sum: bool, inner_sq_sum: bool, ghost_form: Any) -> None:
    """Choose the form of every active layer group (``plan.layers``); a group whose shapes do not fit falls back to
    vmap with a reason."""
    groups: dict[tuple, list[_Call]] = {}
    for call in plan.calls:
        if call is not None and call.active:
            groups.setdefault(_group_key(call), []).append(call)
    names: dict[str, int] = {}
    named = []
    for calls in groups.values():
        base = calls[0].name or calls[0].kind
        names[base] = names.get(base, 0) + 1
        named.append((base if names[base] == 1 else f"{base}#{names[base] - 1}", calls))
    forced: dict[str, str] = {}
    if isinstance(ghost_form, str):
        forced = {name: ghost_form for name, calls in named if calls[0].kind != "layerwise"}
    elif ghost_form is not None:
        forced = dict(ghost_form)
        unknown = sorted(set(forced) - {name for name, _ in named})
        if unknown:
            raise ValueError(
                f"ghost_form names layers {unknown} that the model does not have; its captured layers are "
                f"{[name for name, _ in named]}"
            )
    for name, calls in named:
        indices = [index for _, index in calls[0].roles if plan.route[index] == "ghost"]
        paths = tuple(plan.paths[i] for i in indices)
        kind = calls[0].kind
        if kind == "layerwise":
            if name in forced:
                raise ValueError(f"ghost_form: layer {name!r} is layerwise (a per-example VJP); it has no other form")
            for call in calls:
                call.form = "layerwise"
            plan.layers.append(LayerForm(name, kind, "layerwise", paths, None, {}, "per-example VJP of the layer"))
            continue
        try:
            geometry = forms_.geometry(calls, leaf_shapes)
        except (ValueError, TypeError, jax.errors.ConcretizationTypeError) as error:  # symbolic or unfit shapes
            for index in indices:
                plan.route[index] = "vmap"
                plan.reasons[index] = f"{name}: form cannot be determined ({error})"
            for call in calls:
                call.active = False
            continue
        form, costs, reason = forms_.choose_form(name, geometry, sq_sum, inner_sq_sum, forced.get(name))
        for call in calls:
            call.form = form
        plan.layers.append(LayerForm(name, kind, form, paths, geometry, costs, reason))


def plan_ghost(
    example_loss: Callable,
    params: Any,
    example: Any,
    *,
    sq_sum: bool = False,
    inner_sq_sum: bool = False,
    ghost_form: str | Mapping[str, str] | None = None,
) -> GhostPlan:
    """Trace ``example_loss(params, example) -> scalar`` once (abstractly), decide each leaf's route and each
    layer's form for the statistics asked for (``ghost_form`` forces one: a form for every layer it applies to,
    or a mapping layer name → form).

    A leaf goes the ghost way when captured calls of one layer (same kind, configuration and leaves) are its only
    uses; the trace's jaxpr shows any other use, since captured layers run on stand-in parameters while planning.
    """
    _check_ghost_form(ghost_form)
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
    route: list[str] = []
    reasons: dict[int, str] = {}
    for i, var in enumerate(closed.jaxpr.invars[: len(leaves)]):
        layers = len(groups.get(i, ()))
        if id(var) not in used and layers == 1:
            route.append("ghost")
            continue
        route.append("vmap" if id(var) in used or i in groups else "unused")
        if i in recorder.declined:
            reasons[i] = recorder.declined[i]
        elif route[-1] == "unused":
            reasons[i] = "the loss does not depend on it"
        elif layers > 1:
            reasons[i] = f"read by {layers} different captured layers"
        elif layers == 1:
            reasons[i] = "also used outside its captured layer"
        else:
            reasons[i] = "not read by a captured layer"
    for call in recorder.calls:
        if call is not None:
            call.active = any(route[index] == "ghost" for _, index in call.roles)
    plan = GhostPlan(recorder.calls, paths, route, reasons=reasons)
    _plan_forms(plan, [tuple(jnp.shape(x)) for x in leaves], sq_sum, inner_sq_sum, ghost_form)
    return plan


def ghost_report(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    sq_sum: bool = False,
    inner_sq_sum: bool = False,
    ghost_form: str | Mapping[str, str] | None = None,
) -> GhostReport:
    """Which path each parameter leaf takes under ``grad_stats(..., method="ghost")`` with these statistics, and
    which form each captured layer takes (a ``GhostReport``).

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch import ghost
      >>> def loss_fn(p, x):
      ...     return jnp.sum(ghost.dense(x, p["w"]) * p["v"], axis=-1)
      >>> report = ghost.ghost_report(loss_fn, {"w": jnp.ones((3, 2)), "v": jnp.ones(2)}, jnp.ones((4, 3)))
      >>> report
      {"['v']": 'vmap', "['w']": 'ghost'}
      >>> [(layer.name, layer.form, layer.costs["gram"]) for layer in report.layers]
      [('dense', 'gram', Cost(flops=10, memory=0))]
    """
    example = jax.tree_util.tree_map(lambda x: x[0], batch)
    plan = plan_ghost(
        example_loss(loss_fn), params, example, sq_sum=sq_sum, inner_sq_sum=inner_sq_sum, ghost_form=ghost_form
    )
    return plan.report()


# ----------------------------------------------------------------------------------------------------------------
# The pass


def _group_stats(calls: list[_Call], xs: list, deltas: list, leaves: list, weigh: Callable, dtype, sq_sum: bool):
    """Per leaf index: :class:`LeafStats` of one layer's captured calls (all of one group, one form), weighted
    by the examples' 0/1 weights through ``weigh``."""
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
        return {index: forms_.materialised(weigh(total[role]), sq_sum) for role, index in roles.items()}
    deltas = [weigh(dl) for dl in deltas]
    if first.kind == "embed":
        ids = jnp.concatenate([x.reshape(x.shape[0], -1) for x in xs], 1)
        d = jnp.concatenate([dl.reshape(dl.shape[0], -1, dl.shape[-1]).astype(dtype) for dl in deltas], 1)
        index = roles["embedding"]
        return {index: forms_.embed_stats(first.form, ids, d, jnp.shape(leaves[index]), sq_sum)}
    if first.kind == "conv":
        groups = int(first.config[5]) if len(first.config) > 5 else 1
        pairs = [forms_.conv_rows(x, dl, first.config, groups, dtype) for x, dl in zip(xs, deltas, strict=True)]
    else:
        axes, k_in, k_out = first.config
        pairs = [forms_.dense_rows(x, dl, axes, k_in, k_out, dtype) for x, dl in zip(xs, deltas, strict=True)]
    a = jnp.concatenate([p[0] for p in pairs], 1)
    d = jnp.concatenate([p[1] for p in pairs], 1)
    out = {roles["kernel"]: forms_.linear_stats(first.form, a, d, jnp.shape(leaves[roles["kernel"]]), sq_sum)}
    if "bias" in roles:
        bias_shape = jnp.shape(leaves[roles["bias"]])
        out[roles["bias"]] = forms_.materialised(jnp.sum(d, 1).reshape((-1,) + bias_shape), sq_sum)
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
    keeps the per-leaf :math:`q_l` that :math:`q` sums (no extra work). With ``inner_sq_sum`` the per-example
    :math:`a_i=\\langle g_i,\\bar g\\rangle` give both :math:`\\sum_i a_i^2` and the cancellation-free
    :math:`\\sum_i(a_i-\\lVert\\bar g\\rVert^2)^2`.

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

    per_leaf: dict[int, LeafStats] = {}
    for i, g in zip(fallback, fallback_grads, strict=True):
        per_leaf[i] = forms_.materialised(weigh(g), sq_sum)
    groups: dict[tuple, list[int]] = {}
    for n, call in enumerate(active):
        groups.setdefault(_group_key(call), []).append(n)
    for members in groups.values():
        calls = [active[n] for n in members]
        result = _group_stats(
            calls, [inputs[n] for n in members], [deltas[n] for n in members], leaves, weigh, dtype, sq_sum
        )
        for index, st in result.items():
            if plan.route[index] == "ghost":
                per_leaf[index] = st

    means: list[jax.Array] = []
    s2s: list[jax.Array | None] = []
    qs: list[jax.Array] = []
    for i, leaf in enumerate(leaves):
        if i not in per_leaf:  # unused: zero gradient
            means.append(jnp.zeros(jnp.shape(leaf), dtype))
            s2s.append(jnp.zeros(jnp.shape(leaf), dtype))
            qs.append(jnp.zeros((), dtype))
            continue
        st = per_leaf[i]
        means.append((st.s1 / safe_count).reshape(jnp.shape(leaf)))
        s2s.append(None if st.s2 is None else st.s2.reshape(jnp.shape(leaf)))
        qs.append(jnp.sum(st.sq))
    mean = jax.tree_util.tree_unflatten(treedef, means)
    inner = dev = None
    if inner_sq_sum:
        a = sum((per_leaf[i].inner(means[i]) for i in per_leaf), start=jnp.zeros(jnp.shape(weights), dtype))
        inner, dev = _inner_sums(a, w, mean)
    q, leaf_q = _leaf_sums(jax.tree_util.tree_unflatten(treedef, qs))
    stats = GradStats(
        count=count.astype(jnp.int32),
        mean=mean,
        sq_norm_sum=q,
        sq_sum=jax.tree_util.tree_unflatten(treedef, s2s) if sq_sum else None,
        inner_sq_sum=inner,
        leaf_sq_norm_sum=leaf_q if leaf_sq_norm_sum else None,
        inner_dev_sq_sum=dev,
    )
    return stats, losses
