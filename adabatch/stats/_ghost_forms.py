r"""The per-layer forms of the ghost pass and the cost model that picks one per layer at trace time.

A captured layer that is linear in its weights has per-example weight gradient :math:`g_i = A_i^\top\Delta_i`
(:mod:`adabatch.stats.ghost`), with :math:`A_i` (:math:`T\times I`) its inputs at :math:`T` positions and
:math:`\Delta_i` (:math:`T\times O`) the output gradients; a convolution with :math:`G` feature groups is :math:`G`
such layers on its unfolded input (:math:`I = \prod k\cdot C_\text{in}/G`, :math:`O = C_\text{out}/G`, :math:`T`
output positions); an embedding of a :math:`V\times e` table reads :math:`T` token ids. Every statistic can be
formed in several exact ways whose cost depends only on these static shapes:

``"gram"``
  :math:`\lVert g_i\rVert^2 = \sum_g\langle A_{ig}A_{ig}^\top, \Delta_{ig}\Delta_{ig}^\top\rangle_F` (for an
  embedding :math:`\sum_{t,s}[x_{it}=x_{is}]\,\delta_{it}\cdot\delta_{is}`): :math:`2T^2G(I+O)` flops and
  :math:`2GT^2` memory per example. With :math:`T=1` it is the product of norms
  :math:`\lVert a_i\rVert^2\lVert\delta_i\rVert^2` and gives :math:`S_2 = (a\odot a)^\top(\delta\odot\delta)`;
  with :math:`T>1` it has no :math:`S_2`.
``"direct"``
  the per-example gradients themselves, :math:`A_i^\top\Delta_i` (the plain weight-gradient product kept per
  example, whose sum over the examples is the mean's; for an embedding a scatter into :math:`V\times e`):
  :math:`3GIO` flops beyond the plain product (the sum and the squares) and :math:`GIO` memory per example
  (:math:`Te + 2Ve` and :math:`Ve` for an embedding); gives every statistic.
``"segment"`` (embeddings)
  sum :math:`\delta` over each example's equal ids (:math:`s_{iv} = \sum_{t: x_{it}=v}\delta_{it}`, the non-zero
  rows of :math:`g_i`; equal ids found through a representative position per id, :func:`segment_stats`), then
  :math:`\lVert g_i\rVert^2 = \sum_v\lVert s_{iv}\rVert^2` and :math:`S_2 = \sum_{i}` scatter of
  :math:`s_{iv}\odot s_{iv}`: :math:`2T` table moves, :math:`3Te` flops, :math:`Te` memory (in cache: the examples
  run one at a time on CPU); never builds :math:`T\times T`, :math:`V\times e` per example, nor sorts.

The inner products :math:`\langle g_i,\bar g\rangle` cost :math:`2GIO` per example from materialised gradients and
:math:`2TGIO` (one forward of the layer with weights :math:`\bar g`, dotted with :math:`\Delta_i`) from the rows; for
an embedding :math:`2Te` (a gather of :math:`\bar g` at the ids). :math:`S_2` costs :math:`2GIO` more in the direct
form.

**The cost model.** For each layer group the applicable forms are scored as
``flops + MEMORY_WEIGHT * memory`` (per example, extra over a plain gradient step: the sum
:math:`\sum_i A_i^\top\Delta_i` that the mean needs is the plain step's own product and is not counted; the direct
form's per-example products replace it) and the lowest wins. ``MEMORY_WEIGHT`` (flops per element written and read
back) was fitted on the 2-core CPU machine of the benchmarks, where a fresh buffer is page-faulted on every call: an
element of a per-example buffer costs about as much as 128 flops (with 64 the direct form won on the 128-channel
1-D convolution of the ``seq5`` probe, 384 × 128 per example, and was 1.7× slower than the Gram form there; with
128 every choice on the benchmark models is the faster of the two measured). The choice, the estimated cost of
every applicable form, and the reason are reported
(:class:`LayerForm`); ``grad_stats(..., ghost_form=...)`` forces a form.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["FORMS", "Cost", "GhostReport", "LayerForm"]

FORMS = ("gram", "direct", "segment")
# Cost of one element of per-example memory (written, read back, reduced) in flops, on the benchmark machine.
MEMORY_WEIGHT = 128


@dataclasses.dataclass(frozen=True)
class Cost:
    """Estimated extra cost of a form *per example*, beyond a plain gradient step: ``flops`` (a multiply-add
    counts 2) and ``memory`` (elements materialised per example)."""

    flops: int
    memory: int

    @property
    def score(self) -> int:
        """``flops + MEMORY_WEIGHT * memory``, the quantity the cost model minimises."""
        return self.flops + MEMORY_WEIGHT * self.memory


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shape facts of one captured layer group, per example: ``positions`` :math:`T` (summed over the
    group's calls), ``groups`` :math:`G`, ``k_in`` :math:`I` and ``k_out`` :math:`O` per group (embedding:
    ``k_in`` the vocabulary :math:`V`, ``k_out`` the features :math:`e`)."""

    kind: str
    positions: int
    groups: int
    k_in: int
    k_out: int


@dataclasses.dataclass(frozen=True)
class LayerForm:
    """How one captured layer's statistics are computed (an entry of ``GhostReport.layers``).

    Attributes:
      name: the layer (module path for Flax, else the tag's name; ``#k`` appended when names repeat).
      kind: ``"dense"``, ``"conv"``, ``"embed"`` or ``"layerwise"``.
      form: ``"gram"``, ``"direct"``, ``"segment"`` or ``"layerwise"`` (a per-example VJP of the layer alone).
      paths: the params paths of the layer's leaves that take the ghost route.
      geometry: positions, groups, inputs and outputs per group (None for layerwise layers).
      costs: estimated extra cost per example of every applicable form (the chosen one included).
      reason: why this form (``"cheapest"``, ``"forced"``, or what ruled the others out).
    """

    name: str
    kind: str
    form: str
    paths: tuple[str, ...]
    geometry: Geometry | None
    costs: Mapping[str, Cost]
    reason: str


class GhostReport(dict):
    """Params path → route (``"ghost"``, ``"vmap"``, ``"unused"`` or ``"microbatch"``), a ``dict``, with details.

    Attributes:
      layers: one :class:`LayerForm` per captured layer (trace order): its form, the estimated extra cost per
        example of every applicable form, and why this one.
      forms: params path → the form of that leaf (``"gram"``, ``"direct"``, ``"segment"``, ``"layerwise"``; a
        layer's bias is always ``"direct"``) or its route when it is not ghost.
      reasons: params path → why a leaf did not take the ghost route.
    """

    def __init__(
        self,
        routes: Mapping[str, str],
        layers: Sequence[LayerForm] = (),
        forms: Mapping[str, str] | None = None,
        reasons: Mapping[str, str] | None = None,
    ):
        super().__init__(routes)
        self.layers = tuple(layers)
        self.forms = dict(routes if forms is None else forms)
        self.reasons = dict(reasons or {})


# ----------------------------------------------------------------------------------------------------------------
# The cost model


def geometry(calls: Sequence[Any], leaf_shapes: Sequence[tuple]) -> Geometry:
    """The static shapes of one layer group (captured calls of one layer, with ``kind``, ``config``, ``roles``,
    ``in_shape`` and ``out_shape``); a ``ValueError`` when they do not fit the layer's kind."""
    first = calls[0]
    roles = dict(first.roles)
    positions = 0
    if first.kind == "embed":
        shape = leaf_shapes[roles["embedding"]]
        if len(shape) != 2:
            raise ValueError(f"an embedding table must be 2-D, got shape {shape}")
        for call in calls:
            positions += math.prod(int(n) for n in call.in_shape)
        return Geometry("embed", positions, 1, int(shape[0]), int(shape[1]))
    kernel = leaf_shapes[roles["kernel"]]
    if first.kind == "conv":
        kernel_size = tuple(first.config[0])
        groups = int(first.config[5]) if len(first.config) > 5 else 1
        channels, out_channels = int(first.in_shape[-1]), int(first.out_shape[-1])
        if channels % groups or out_channels % groups:
            raise ValueError(f"{groups} feature groups do not divide {channels} → {out_channels} channels")
        if tuple(kernel) != (*kernel_size, channels // groups, out_channels):
            raise ValueError(f"kernel shape {kernel} is not (*kernel_size, C_in/G, C_out) for this input")
        for call in calls:
            positions += math.prod(int(n) for n in call.out_shape[:-1])
        k_in = math.prod(kernel_size) * (channels // groups)
        return Geometry("conv", positions, groups, k_in, out_channels // groups)
    _, k_in, k_out = first.config
    if math.prod(int(n) for n in kernel) != k_in * k_out:
        raise ValueError(f"kernel shape {kernel} is not {k_in} inputs × {k_out} outputs")
    for call in calls:
        size = math.prod(int(n) for n in call.in_shape)
        if size % k_in or math.prod(int(n) for n in call.out_shape) != size // k_in * k_out:
            raise ValueError(f"input shape {call.in_shape} does not contract {k_in} features into {k_out}")
        positions += size // k_in
    return Geometry("dense", positions, 1, int(k_in), int(k_out))


def unavailable(geometry: Geometry, form: str, sq_sum: bool) -> str | None:
    """Why ``form`` cannot give the requested statistics of this layer (None when it can)."""
    if form not in FORMS:
        return f"unknown form {form!r} (one of {', '.join(FORMS)})"
    if form == "segment" and geometry.kind != "embed":
        return f"'segment' applies to embeddings only, not to a {geometry.kind} layer"
    if form == "gram" and sq_sum and geometry.positions > 1:
        return f"'gram' gives no S2 (sq_sum) for a layer with T = {geometry.positions} > 1 positions"
    return None


def form_cost(geometry: Geometry, form: str, sq_sum: bool, inner: bool) -> Cost:
    """Estimated extra flops and memory per example of ``form`` (module docstring)."""
    t, g, i, o = geometry.positions, geometry.groups, geometry.k_in, geometry.k_out
    if geometry.kind == "embed":
        v, e = i, o
        flops, memory = (2 * t * e, t * e) if inner else (0, 0)  # gather of the mean at the ids
        if form == "gram":
            return Cost(flops + 2 * t * t * e + 2 * t * t, memory + 2 * t * t)
        if form == "direct":
            return Cost(flops + t * e + 2 * v * e * (1 + sq_sum), memory + v * e)
        return Cost(flops + 2 * t + 3 * t * e + 2 * t * e * sq_sum, memory + t * e)
    unfold = t * g * i if geometry.kind == "conv" else 0  # the unfolded input (patches) of a convolution
    if form == "direct":  # the per-example products replace the batch product; their sum is the mean
        return Cost(g * i * o * (3 + 2 * sq_sum + 2 * inner), unfold + g * i * o)
    if t == 1:  # products of norms; S2 = (a ⊙ a)ᵀ(δ ⊙ δ)
        return Cost(2 * g * (i + o) + 2 * g * i * o * (sq_sum + inner), unfold + g * (i + o) * sq_sum)
    flops = 2 * t * t * g * (i + o) + t * t * g + (2 * t * g * i * o + 2 * t * g * o) * inner
    return Cost(flops, unfold + 2 * g * t * t)


def choose_form(name: str, geometry: Geometry, sq_sum: bool, inner: bool, forced: str | None) -> tuple:
    """``(form, costs, reason)`` for one layer group: ``forced`` when given (a ``ValueError`` naming the layer if
    it does not apply), else the applicable form of lowest :attr:`Cost.score`."""
    costs = {f: form_cost(geometry, f, sq_sum, inner) for f in FORMS if unavailable(geometry, f, sq_sum) is None}
    if forced is not None:
        why = unavailable(geometry, forced, sq_sum)
        if why is not None:
            raise ValueError(f"ghost_form: cannot force form {forced!r} on layer {name!r}: {why}")
        return forced, costs, "forced"
    form = min(costs, key=lambda f: (costs[f].score, costs[f].memory))
    ruled_out = [f for f in FORMS if f not in costs and (f != "segment" or geometry.kind == "embed")]
    return form, costs, "cheapest" + (f" ({', '.join(ruled_out)}: no S2 with T > 1)" if ruled_out else "")


# ----------------------------------------------------------------------------------------------------------------
# Layer operands


def unfold(x: jax.Array, config: tuple) -> jax.Array:
    """Patches of a channels-last input ``x[N, *spatial, C]`` for a convolution of configuration ``config``
    (kernel_size, strides, padding, input_dilation, kernel_dilation): ``(N, *out_spatial, prod(kernel_size), C)``,
    by strided slices of the padded, dilated input (data movement only; the features of one position come in the
    order of an HWIO kernel's rows)."""
    kernel_size, strides, padding, input_dilation, kernel_dilation = config[:5]
    rank = len(kernel_size)
    spatial = x.shape[1 : 1 + rank]
    dilated_in = [(s - 1) * d + 1 for s, d in zip(spatial, input_dilation, strict=True)]
    dilated_k = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    pads = jax.lax.padtype_to_pads(dilated_in, dilated_k, strides, padding) if isinstance(padding, str) else padding
    config_pad = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, input_dilation, strict=True)] + [(0, 0, 0)]
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype), config_pad)
    out = [(padded.shape[1 + a] - dilated_k[a]) // strides[a] + 1 for a in range(rank)]
    columns = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = [0] + [o * d for o, d in zip(offset, kernel_dilation, strict=True)] + [0]
        limit = [x.shape[0]] + [s + (n - 1) * st + 1 for s, n, st in zip(start[1:-1], out, strides, strict=True)]
        columns.append(jax.lax.slice(padded, start, limit + [x.shape[-1]], [1, *strides, 1]))
    return jnp.stack(columns, -2)


def conv_rows(x: jax.Array, delta: jax.Array, config: tuple, groups: int, dtype) -> tuple[jax.Array, jax.Array]:
    """``(A, Δ)`` of shapes ``(b, T, G, I)`` and ``(b, T, G, O)`` for a convolution call (``x`` and ``delta`` with
    a leading example axis and the model's own batch axis of 1 behind it)."""
    b = x.shape[0]
    patches = unfold(x.reshape((-1,) + x.shape[2:]).astype(dtype), config)  # (b, *out, K, C)
    k, c = patches.shape[-2], patches.shape[-1]
    patches = patches.reshape(b, -1, k, groups, c // groups)
    a = jnp.swapaxes(patches, 2, 3).reshape(b, -1, groups, k * (c // groups))
    return a, delta.reshape(b, -1, groups, delta.shape[-1] // groups).astype(dtype)


def dense_rows(x: jax.Array, delta: jax.Array, axes: tuple[int, ...], k_in: int, k_out: int, dtype) -> tuple:
    """``(A, Δ)`` of shapes ``(b, T, 1, k_in)`` and ``(b, T, 1, k_out)`` for a dense call contracting ``axes``."""
    b = x.shape[0]
    moved = jnp.moveaxis(x, [a + 1 for a in axes], list(range(x.ndim - len(axes), x.ndim)))
    return moved.reshape(b, -1, 1, k_in).astype(dtype), delta.reshape(b, -1, 1, k_out).astype(dtype)


def kernel_layout(shape: tuple, groups: int, k_in: int, k_out: int) -> tuple[Callable, Callable]:
    """``(to_leaf, from_leaf)`` between the ``(G, I, O)`` layout of the statistics and a kernel of ``shape`` whose
    flattening is ``(I, G·O)`` (a dense kernel: ``G = 1``; an HWIO convolution kernel: rows ``(*k, C_in/G)``, the
    output channels of group ``g`` at ``g·O … (g+1)·O − 1``)."""

    def to_leaf(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x, 0, 1).reshape(shape)

    def from_leaf(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(k_in, groups, k_out), 0, 1)

    return to_leaf, from_leaf


# ----------------------------------------------------------------------------------------------------------------
# Per-layer statistics


@dataclasses.dataclass
class LeafStats:
    """One leaf's sums: ``s1`` leaf-shaped :math:`\\sum_i w_ig_i`, ``sq`` ``(b,)`` :math:`w_i\\lVert g_i\\rVert^2`,
    ``s2`` leaf-shaped :math:`\\sum_i w_ig_i\\odot g_i` or None, and ``inner(mean) -> (b,)`` the inner products
    :math:`\\langle g_i, \\text{mean}\\rangle` (``mean`` leaf-shaped) in the layer's own form."""

    s1: jax.Array
    sq: jax.Array
    s2: jax.Array | None
    inner: Callable[[jax.Array], jax.Array]


def materialised(g: jax.Array, sq_sum: bool) -> LeafStats:
    """Statistics of materialised per-example gradients ``g`` (leading axis = examples)."""
    flat = g.reshape(g.shape[0], -1)
    return LeafStats(
        jnp.sum(g, 0),
        jnp.sum(jnp.square(flat), 1),
        jnp.sum(jnp.square(g), 0) if sq_sum else None,
        lambda mean: flat @ mean.reshape(-1),
    )


def linear_stats(form: str, a: jax.Array, d: jax.Array, shape: tuple, sq_sum: bool) -> LeafStats:
    """Kernel statistics of ``g_i = A_iᵀΔ_i`` per group (``a``: (b, T, G, I), ``d``: (b, T, G, O), already weighted)
    in ``form`` (``"gram"`` with T = 1 is the product of norms). The groups are folded into the example axis, so
    every product is a plain batched matrix product (XLA on CPU runs those fastest)."""
    b, t, groups, k_in = a.shape
    k_out = d.shape[3]
    to_leaf, from_leaf = kernel_layout(shape, groups, k_in, k_out)
    a3 = jnp.swapaxes(a, 1, 2).reshape(b * groups, t, k_in)  # (b·G, T, I)
    d3 = jnp.swapaxes(d, 1, 2).reshape(b * groups, t, k_out)
    if form == "direct":  # the per-example products replace the batch product: the mean is their sum
        # (in chunks of examples under a scan, as the segment form, it was no faster here: the patches are already
        # materialised, and the scan adds its steps)
        g = jnp.einsum("nti,nto->nio", a3, d3).reshape(b, groups, k_in, k_out)
        flat = g.reshape(b, -1)  # (b, G·I·O) in the (G, I, O) layout
        s2 = to_leaf(jnp.sum(jnp.square(g), 0)) if sq_sum else None
        inner = lambda mean: flat @ from_leaf(mean).reshape(-1)  # noqa: E731
        return LeafStats(to_leaf(jnp.sum(g, 0)), jnp.sum(jnp.square(flat), 1), s2, inner)
    if groups == 1:
        s1 = to_leaf(jnp.einsum("nti,nto->io", a3, d3)[None])
    else:
        s1 = to_leaf(jnp.einsum("bgti,bgto->gio", a3.reshape(b, groups, t, k_in), d3.reshape(b, groups, t, k_out)))

    def rows_inner(mean: jax.Array) -> jax.Array:
        return jnp.einsum("btgi,gio,btgo->b", a, from_leaf(mean), d)

    if t == 1:
        a1, d1 = a[:, 0], d[:, 0]
        sq = jnp.sum(jnp.sum(jnp.square(a1), 2) * jnp.sum(jnp.square(d1), 2), 1)
        s2 = to_leaf(jnp.einsum("bgi,bgo->gio", jnp.square(a1), jnp.square(d1))) if sq_sum else None
        return LeafStats(s1, sq, s2, rows_inner)
    gram = jnp.einsum("nti,nsi->nts", a3, a3) * jnp.einsum("nto,nso->nts", d3, d3)
    return LeafStats(s1, jnp.sum(gram.reshape(b, -1), 1), None, rows_inner)


def embed_stats(form: str, ids: jax.Array, d: jax.Array, shape: tuple, sq_sum: bool) -> LeafStats:
    """Table statistics of an embedding read at ``ids`` (b, T) with output gradients ``d`` (b, T, e) (weighted)."""
    b, t = ids.shape
    vocab, features = shape

    def rows_inner(mean: jax.Array) -> jax.Array:
        return jnp.sum(jnp.take(mean, ids, axis=0) * d, (1, 2))

    if form == "segment":
        return segment_stats(ids, d, shape, sq_sum, rows_inner)
    if form == "direct":  # the mean is the sum of the per-example tables
        g = jnp.zeros((b, vocab, features), d.dtype).at[jnp.arange(b)[:, None], ids].add(d)
        st = materialised(g, sq_sum)
        return LeafStats(st.s1, st.sq, st.s2, rows_inner)
    s1 = jnp.zeros(shape, d.dtype).at[ids.reshape(-1)].add(d.reshape(-1, features))
    same = (ids[:, :, None] == ids[:, None, :]).astype(d.dtype)
    return LeafStats(s1, jnp.sum(same * jnp.einsum("btf,bsf->bts", d, d), (1, 2)), None, rows_inner)


# On CPU the segment form runs over chunks of examples whose working set fits this many bytes (in cache: no page
# faults on fresh buffers; on the embedding probe one vectorised step was best up to about this size, and one example
# per step beyond it was within the noise of chunks of 32-64)
WORKING_SET_BYTES = 2**22


def example_chunk(b: int, per_example: int, accelerator: int | None = None) -> int:
    """Examples per step when a form with ``per_example`` elements (float32) of working set per example runs over
    the ``b`` examples in a scan: on CPU the largest power of two whose chunk fits ``WORKING_SET_BYTES`` (at
    least one; all ``b`` when the whole batch fits, one step); on accelerators, where each scan step is a kernel
    launch, ``accelerator`` (all ``b`` when None)."""
    if jax.default_backend() != "cpu":
        return b if accelerator is None else max(1, min(b, accelerator))
    fits = max(1, WORKING_SET_BYTES // (4 * max(per_example, 1)))
    return b if fits >= b else 1 << (fits.bit_length() - 1)


def scan_examples(step: Callable, init: Any, xs: tuple, b: int, chunk: int) -> tuple[Any, jax.Array]:
    """``lax.scan`` of ``step(carry, chunk_of_xs) -> (carry, (chunk,) values)`` over ``xs`` (arrays with ``b``
    leading examples) in chunks of ``chunk``; the tail is padded with zeros (already-weighted inputs: padding adds
    nothing). Returns the final carry and the ``(b,)`` per-example values."""
    steps = -(-b // chunk)
    pad = steps * chunk - b
    chunks = tuple(jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(steps, chunk, *x.shape[1:]) for x in xs)
    carry, values = jax.lax.scan(step, init, chunks)
    return carry, values.reshape(-1)[:b]


def segment_stats(ids: jax.Array, d: jax.Array, shape: tuple, sq_sum: bool, rows_inner: Callable) -> LeafStats:
    r"""The ``"segment"`` form of :func:`embed_stats`: each example's output gradients summed over equal ids.

    Equal ids are grouped by a *representative* position: a ``(V,)`` integer table is written at the example's ids
    with their positions and read back at the same ids (whichever write wins, equal ids read the same position;
    only entries written for this example are read, so the table is never cleared). The :math:`T` gradients are
    then scatter-added into :math:`T` rows at their representatives (the non-zero rows are :math:`g_i`'s rows), so
    :math:`\lVert g_i\rVert^2` is the sum of the squared rows and :math:`S_2` a scatter of the squared rows at the
    ids. The examples run in chunks (``example_chunk``) under ``lax.scan`` with the table, the mean and
    :math:`S_2` in the carry: no :math:`T\times T`, no per-example :math:`V\times e`, no sort."""
    b, t = ids.shape
    vocab, features = shape
    chunk = example_chunk(b, t * features + vocab, accelerator=64)  # (chunk, V) tables: bounded on accelerators
    positions = jnp.broadcast_to(jnp.arange(t, dtype=ids.dtype), (chunk, t))
    rows_of = jnp.arange(chunk)[:, None]

    def step(carry, xs):
        table, s1, s2 = carry
        ids_i, d_i = xs  # (chunk, T), (chunk, T, e)
        table = table.at[rows_of, ids_i].set(positions)
        representative = table[rows_of, ids_i]
        rows = jnp.zeros_like(d_i).at[rows_of, representative].add(d_i)  # row r: the sum over ids equal to ids[r]
        s1 = s1.at[ids_i].add(d_i)
        if s2 is not None:
            s2 = s2.at[ids_i].add(jnp.square(rows))  # rows that are no representative are zero
        return (table, s1, s2), jnp.sum(jnp.square(rows), (1, 2))

    init = (
        jnp.zeros((chunk, vocab), ids.dtype),
        jnp.zeros(shape, d.dtype),
        jnp.zeros(shape, d.dtype) if sq_sum else None,
    )
    (_, s1, s2), sq = scan_examples(step, init, (ids, d), b, chunk)
    return LeafStats(s1, sq, s2, rows_inner)
