r"""The training runtime: one jit-compiled step that computes the statistics, the update and the next batch size
together, and a host loop that feeds batches of the decided size without recompiling for every size.

**The step.** For a batch :math:`\mathcal B` of :math:`b` real examples (the rows of a possibly padded buffer),
:func:`make_train_step` computes the :class:`~adabatch.stats.GradStats` of the per-example gradients
:math:`g_i=\nabla\ell_i(\theta)` with :func:`adabatch.grad_stats` (``method=method``), the mean loss
:math:`\bar\ell = \tfrac1b\sum_i\ell_i` and the mean gradient :math:`\bar g`, then calls

``tx.update(ḡ, opt_state, params, grad_stats=stats, batch_size=b, value=ℓ̄)``

(adabatch's extra-argument names, fixed once; ``value`` is optax's name for the loss; ``tx`` is wrapped with
``optax.with_extra_args_support`` so a plain transformation ignores them) and applies the update. A batch-size
rule anywhere in ``tx`` leaves its decision in the optimizer state; the step reports it as ``next_batch_size``.

**Growth without recompiling.** The buffer has :math:`P` rows, of which the first :math:`b` (a traced int32) are
real. With ``micro_batch_size=m`` the buffer is cut into :math:`P/m` micro-batches and a ``lax.fori_loop`` with
the *traced* trip count :math:`k=\lceil b/m\rceil` accumulates their statistics with
:func:`adabatch.stats.merge` (exact for every field but :math:`\sum_i\langle g_i,\bar g\rangle^2`, which needs the
mean of the whole batch: when the transformation needs it, a second loop over the same micro-batches computes
:math:`\langle g_i,\bar g\rangle` by one JVP each, :func:`adabatch.inner_products`). The work is therefore
:math:`\lceil b/m\rceil` micro-batches whatever :math:`P`; the shape only changes when :func:`fit` moves to the next
padded bucket :math:`P=\text{base}\cdot2^j` (:func:`~adabatch.training.bucket_size`), so a run growing from
:math:`b_{\min}` to :math:`b_{\max}` compiles at most :math:`\lceil\log_2(b_{\max}/b_{\min})\rceil+1` times.
Without ``micro_batch_size`` the whole buffer is one micro-batch and the padding rows are masked out.

**Which statistics.** ``sq_sum`` (:math:`\sum_i g_i\odot g_i`, the coordinate-wise test) and ``inner_sq_sum``
(the inner-product tests) cost extra, so they are computed only when ``tx`` needs them. ``None`` (the default)
means *infer*: when the step is traced, each transformation that reads statistics declares the fields it needs
in its state (:class:`adabatch.stats.GradStatsNeeds`), and the step computes their union, read once when it is
traced (:func:`required_statistics`). Pass ``True``/``False`` to decide yourself.

**A second gradient (EXTRAP-SGD).** When a transformation in ``tx`` declares that it steps along the gradient at
an extrapolated point (:func:`adabatch.needs_extrapolated_grads`: :func:`adabatch.extrap_sgd`), the step also
computes :math:`\tilde\theta = \theta - \tilde\gamma_t\bar g` (:func:`adabatch.extrapolate`) and the mean gradient
:math:`\tilde g = \tfrac1b\sum_i\nabla\ell_i(\tilde\theta)` of the **same** :math:`b` examples (same micro-batches, same
per-example keys), one plain backward pass per micro-batch, and passes it as ``extrapolated_grads=``. The
statistics, ``grad_norm`` and the rule's decision stay those of the first gradient :math:`\bar g` at
:math:`\theta`; a non-finite :math:`\tilde g` skips the update like a non-finite :math:`\bar g`.

**Faults.** A non-finite mean loss, mean gradient, :math:`\sum_i\lVert g_i\rVert^2` or update skips the update:
parameters and optimizer state are returned unchanged, ``TrainState.skipped`` and the metric ``skipped`` count it,
and the data position still advances (the next step sees new examples).

**The learning rate actually applied.** ``metrics["learning_rate"]`` is the ``learning_rate`` hyperparameter of an
``optax.inject_hyperparams`` state in ``tx`` when there is one; otherwise the effective step
:math:`\lVert\Delta\theta\rVert/\lVert\bar g\rVert` (exactly :math:`\alpha/(\sqrt{v_k}+\epsilon)` for AdaGrad-Norm,
:math:`\alpha` for SGD). ``metrics["effective_learning_rate"]`` is always the latter.

References:
  Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods", 2024,
  https://arxiv.org/abs/2402.11215.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch import _deprecation
from adabatch import curvature as curv
from adabatch import optimizers as opt
from adabatch import stats as st
from adabatch._tree import find_state
from adabatch._validation import accumulation_dtype, check_choice, check_positive_int
from adabatch.rules import BatchSizeTestState, has_decision
from adabatch.stats._batch import leading_size
from adabatch.stats._grad_stats import _inner_sums

__all__ = [
    "TrainState",
    "TrainStep",
    "init_train_state",
    "make_train_step",
    "model_partition_spec",
    "required_statistics",
]


class TrainState(NamedTuple):
    """Everything a training run needs to continue exactly (a pytree; checkpoint it whole)."""

    params: Any  # the model parameters (any pytree of floating arrays)
    opt_state: Any  # tx's state, with the batch-size rule's decision and statistics
    step: jax.Array  # int32[]: steps taken (updates applied plus updates skipped)
    samples: jax.Array  # int32[]: examples consumed = global offset of the data stream (epoch = samples // N); < 2³¹
    skipped: jax.Array  # int32[]: updates skipped because the loss or the gradient was not finite
    rng: jax.Array  # uint32[2]: base PRNG key; stream example e gets the key fold_in(rng, e)


def strong(tree: Any) -> Any:
    """Drop weak types (a weak leaf would retrace the step once it comes back strong)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp.asarray(x).dtype), tree)


def init_train_state(params: Any, tx: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    """A fresh :class:`TrainState`: ``tx.init(params)``, zero counters and the key of ``seed``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adabatch.training import init_train_state
      >>> state = init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), seed=1)
      >>> int(state.step), int(state.samples), state.rng.dtype.name
      (0, 0, 'uint32')
    """
    zero = jnp.zeros((), jnp.int32)
    key = jax.random.key_data(jax.random.key(int(seed)))
    return strong(TrainState(params, optax.with_extra_args_support(tx).init(params), zero, zero, zero, key))


def _has_learning_rate(node: Any) -> bool:
    return isinstance(getattr(node, "hyperparams", None), dict) and "learning_rate" in node.hyperparams


def required_statistics(
    tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    *,
    sq_sum: bool | None = None,
    inner_sq_sum: bool | None = None,
) -> tuple[bool, bool]:
    """Which optional :class:`~adabatch.GradStats` fields ``tx.update`` needs: ``(sq_sum, inner_sq_sum)``.

    Every transformation that reads statistics declares the optional fields it needs in its state (a
    ``grad_stats_needs`` field, :class:`adabatch.stats.GradStatsNeeds`); this is the union of the declarations
    found in ``opt_state`` (:func:`adabatch.stats.declared_needs`). The declarations are static, so this works on
    concrete and on traced states alike and computes nothing. An argument that is not None is taken as given.
    ``tx`` and ``params`` are accepted for the signature's sake (the state alone decides).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adabatch
      >>> from adabatch.training import required_statistics
      >>> tx = optax.chain(adabatch.inner_product_test(), optax.sgd(0.1))
      >>> required_statistics(tx, jnp.zeros(3), tx.init(jnp.zeros(3)))
      (False, True)
    """
    del tx, params
    needs = st.declared_needs(opt_state)
    return (
        needs.sq_sum if sq_sum is None else bool(sq_sum),
        needs.inner_sq_sum if inner_sq_sum is None else bool(inner_sq_sum),
    )


def model_partition_spec(shape: tuple[int, ...], model_axis: str, size: int) -> Any:
    """The FSDP-style ``PartitionSpec`` of a leaf of ``shape`` on a ``model`` axis of ``size`` devices.

    A leaf with at least two dimensions is split along its largest dimension that ``size`` divides (the first such
    dimension on a tie); a vector, a scalar, or a leaf with no divisible dimension is replicated.

    Example:
      >>> from adabatch.training import model_partition_spec
      >>> model_partition_spec((6, 8), "model", 2), model_partition_spec((8,), "model", 2)
      (P(None, 'model'), P())
      >>> model_partition_spec((5, 3), "model", 2), model_partition_spec((4, 6), "model", 4)
      (P(), P('model', None))
    """
    from jax.sharding import PartitionSpec

    check_positive_int("size", size)
    shape = tuple(int(d) for d in shape)
    if len(shape) >= 2 and size > 1:
        for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], a)):
            if shape[axis] % size == 0:
                return PartitionSpec(*(model_axis if a == axis else None for a in range(len(shape))))
    return PartitionSpec()


class TrainStep:
    """The callable :func:`make_train_step` returns: ``step(state, batch, size=None) -> (state, metrics)``.

    ``batch`` has ``P`` rows of which the first ``size`` (default all) are real examples, in the layout of
    :func:`adabatch.training.physical_order` (the identity without a mesh). ``compilations`` counts how many times the
    step was traced and compiled; ``jitted`` is the underlying ``jax.jit`` function (with ``model_axis``, the one
    built for the state of the latest call: its shardings follow the state's shapes).
    """

    def __init__(
        self,
        fn: Callable,
        *,
        micro_batch_size: int | None,
        mesh: Any,
        data_axis: str,
        counter: list,
        model_axis: str | None = None,
    ):
        self.micro_batch_size = micro_batch_size
        self.mesh = mesh
        self.data_axis = data_axis
        self.model_axis = model_axis
        self.num_shards = 1 if mesh is None else int(mesh.shape[data_axis])
        self._counter = counter
        self._fn = fn
        self._by_layout: dict[Any, Any] = {}  # (tree structure, leaf shapes) -> jax.jit with those state shardings
        self._jitted: Any = None
        if mesh is None:
            self._jitted = jax.jit(fn)
        elif model_axis is None:
            from jax.sharding import NamedSharding, PartitionSpec

            replicated, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(data_axis))
            self._jitted = jax.jit(fn, in_shardings=(replicated, sharded, replicated), out_shardings=replicated)

    @property
    def compilations(self) -> int:
        """How many times the step has been traced (each trace is one compilation)."""
        return self._counter[0]

    @property
    def jitted(self) -> Any:
        """The ``jax.jit`` function the step calls (with ``model_axis``: the one of the latest call's state)."""
        if self._jitted is None:
            raise RuntimeError(
                "with model_axis the jitted step is built on the first call: its shardings follow the state's shapes"
            )
        return self._jitted

    def state_sharding(self, state: Any) -> Any:
        """The ``NamedSharding`` of every leaf of ``state`` on the step's mesh (None without a mesh).

        Replicated without ``model_axis``; with it, :func:`model_partition_spec` of each leaf's shape: parameters and
        the optimizer-state leaves shaped like them are split along ``model`` the same way, small leaves replicated.
        """
        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding, PartitionSpec

        if self.model_axis is None:
            return jax.tree_util.tree_map(lambda _: NamedSharding(self.mesh, PartitionSpec()), state)
        axis = self.model_axis
        size = int(self.mesh.shape[axis])
        return jax.tree_util.tree_map(
            lambda x: NamedSharding(self.mesh, model_partition_spec(x.shape, axis, size)), state
        )

    def _jit_for(self, state: Any) -> Any:
        if self.model_axis is None:
            return self._jitted
        key = (jax.tree_util.tree_structure(state), tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves(state)))
        if key not in self._by_layout:
            from jax.sharding import NamedSharding, PartitionSpec

            layout = self.state_sharding(state)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            sharded = NamedSharding(self.mesh, PartitionSpec(self.data_axis))
            self._by_layout[key] = jax.jit(
                self._fn, in_shardings=(layout, sharded, replicated), out_shardings=(layout, replicated)
            )
        self._jitted = self._by_layout[key]
        return self._jitted

    def __call__(self, state: TrainState, batch: Any, size: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        rows = leading_size(batch)
        if size is None:
            size = rows
        elif not isinstance(size, jax.core.Tracer) and not 1 <= int(size) <= rows:
            raise ValueError(f"size must lie in [1, {rows}] (the batch has {rows} rows), got {size}")
        return self._jit_for(state)(state, batch, jnp.asarray(size, jnp.int32))


def make_train_step(
    loss_fn: Callable[..., jax.Array],
    tx: optax.GradientTransformation,
    *,
    method: str = "vmap",
    micro_batch_size: int | None = None,
    chunk_size: int | None = None,
    sq_sum: bool | None = None,
    inner_sq_sum: bool | None = None,
    mesh: Any = None,
    data_axis: str = "data",
    model_axis: str | None = None,
    per_example_keys: bool = False,
    stats: str | None = None,
) -> TrainStep:
    r"""One jit-compiled, pure training step: statistics, update and next batch size together.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses (not their mean); with
        ``per_example_keys=True``, ``loss_fn(params, batch, keys)`` where ``keys`` is a ``(b, 2)`` uint32 array of
        PRNG keys, row :math:`i` being ``fold_in(state.rng, o + i)`` for stream offset :math:`o` (the same key for
        the same example whatever the micro-batching or sharding; use it for dropout).
      tx: any Optax transformation; a batch-size rule in it receives ``grad_stats=``, everything receives
        ``batch_size=`` (int32, the number of real examples) and ``value=`` (the mean loss); when it declares the
        need (EXTRAP-SGD, :func:`adabatch.needs_extrapolated_grads`), also ``extrapolated_grads=``, the mean
        gradient of the same examples at :func:`adabatch.extrapolate` (a second backward pass per micro-batch); when
        it holds a curvature learner (:func:`adabatch.slq_learner`, :func:`adabatch.curvature.declared_curvature`),
        also ``curvature=``, the SLQ :class:`~adabatch.curvature.Spectrum` of the first micro-batch's Hessian
        (the request's Lanczos steps, probes and matrix; probes from ``fold_in(rng, step)``), computed under
        ``lax.cond`` on the steps where the learner's ``due`` flag is set and zeros otherwise.
      method: the :func:`adabatch.grad_stats` method, passed through (``"microbatch"`` only without
        ``micro_batch_size``: its group-mean estimates do not merge across micro-batches).
      micro_batch_size: physical micro-batch :math:`m`; the statistics of :math:`\lceil b/m\rceil` micro-batches
        are accumulated in a loop with a traced trip count (None: the whole buffer at once).
      chunk_size: passed to :func:`adabatch.grad_stats` (bounds memory inside a micro-batch).
      sq_sum, inner_sq_sum: compute these optional statistics; None infers what ``tx`` needs.
      mesh: a ``jax.sharding.Mesh``: the batch is sharded along ``data_axis`` (and replicated along the other
        axes); the state is replicated unless ``model_axis`` is given.
      data_axis: the mesh axis of the batch.
      model_axis: a second mesh axis to shard the state along, FSDP-style (:meth:`TrainStep.state_sharding`): every
        leaf of the parameters and of the optimizer state with at least two dimensions is split along its largest
        dimension that the axis size divides (:func:`model_partition_spec`), the rest is replicated. The statistics
        stay those of one device: the step is one SPMD program, so a per-example norm summed over a split
        parameter is all-reduced over ``model_axis`` as well as over ``data_axis``.
      per_example_keys: pass per-example PRNG keys to ``loss_fn`` (see above).
      stats: deprecated name of ``method`` (removed in the next release).

    Returns:
      A :class:`TrainStep` ``step(state, batch, size=None) -> (state, metrics)``; ``metrics`` holds ``loss``,
      ``batch_size``, ``next_batch_size``, ``finite``, ``skipped``, ``learning_rate``,
      ``effective_learning_rate``, ``grad_norm``, ``update_norm``, ``trace_cov``, ``b_simple`` and, with a rule,
      ``rule_statistic``, ``rule_threshold``, ``rule_nonfinite``; with a curvature learner ``learning_rate`` is its
      step size and ``momentum``, ``lambda_max``, ``lambda_min`` (its smoothed estimates) and
      ``curvature_rejected`` are added.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adabatch
      >>> from adabatch.training import init_train_state, make_train_step
      >>> loss = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
      >>> tx = optax.chain(adabatch.norm_test(0.5, max_batch_size=64), optax.sgd(0.1))
      >>> step = make_train_step(loss, tx, micro_batch_size=4)
      >>> x = jnp.arange(16.0).reshape(8, 2) / 8
      >>> state, metrics = step(init_train_state(jnp.zeros(2), tx), (x, x.sum(1)))
      >>> int(metrics["batch_size"]), int(state.samples), int(metrics["next_batch_size"]) >= 8
      (8, 8, True)
    """
    if stats is not None:
        _deprecation.warn("make_train_step(stats=...)", "make_train_step(method=...)")
        method = stats
    check_choice("method", method, st.METHODS)
    check_positive_int("micro_batch_size", micro_batch_size, allow_none=True)
    if method == "microbatch" and micro_batch_size is not None:
        raise ValueError(
            "method='microbatch' estimates the statistics from group means inside one batch and its estimates do "
            "not merge across micro-batches; use micro_batch_size=None with it, or method='vmap'/'ghost' with "
            "micro-batches"
        )
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    for name, value in (("sq_sum", sq_sum), ("inner_sq_sum", inner_sq_sum)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True, False or None (infer), got {value!r}")
    shards = 1
    if mesh is None and model_axis is not None:
        raise ValueError(f"model_axis={model_axis!r} needs mesh= (a mesh with a {model_axis!r} axis)")
    if mesh is not None:
        if data_axis not in mesh.axis_names:
            raise ValueError(f"data_axis={data_axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
        if model_axis is not None and (model_axis not in mesh.axis_names or model_axis == data_axis):
            raise ValueError(
                f"model_axis={model_axis!r} must be an axis of the mesh {tuple(mesh.axis_names)} other than "
                f"data_axis={data_axis!r}"
            )
        shards = int(mesh.shape[data_axis])
        if micro_batch_size is not None and micro_batch_size % shards:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be a multiple of the {shards} data shards")
    tx = optax.with_extra_args_support(tx)
    counter = [0]
    if per_example_keys:
        loss = lambda params, batch_and_keys: loss_fn(params, *batch_and_keys)  # noqa: E731
    else:
        loss = loss_fn

    def constrain(tree: Any) -> Any:
        if mesh is None:
            return tree
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec(data_axis)))

    def step_fn(state: TrainState, batch: Any, size: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        counter[0] += 1
        params = state.params
        rows = leading_size(batch)
        m = micro_batch_size or rows
        if rows % m and shards == 1:  # pad with copies of real rows (masked out) to whole micro-batches
            padded = -(-rows // m) * m
            batch = jax.tree_util.tree_map(lambda x: jnp.take(x, jnp.arange(padded) % rows, axis=0), batch)
            rows = padded
        if rows % m or m % shards:
            raise ValueError(
                f"the batch has {rows} rows: it must be a multiple of micro_batch_size={m}, itself a multiple of "
                f"the {shards} data shards (adabatch.training.bucket_size gives such sizes)"
            )
        want_sq, want_inner = required_statistics(tx, params, state.opt_state, sq_sum=sq_sum, inner_sq_sum=inner_sq_sum)
        want_leaf = st.declared_needs(state.opt_state).leaf_sq_norm_sum  # per-leaf sums (CLARS)
        acc = accumulation_dtype(jnp.result_type(*jax.tree_util.tree_leaves(params)))
        n = jnp.clip(size, 1, rows).astype(jnp.int32)
        k_max = rows // m
        shaped = jax.tree_util.tree_map(lambda x: x.reshape((shards, k_max, m // shards) + x.shape[1:]), batch)

        def micro(i):
            xs = jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False).reshape((m,) + x.shape[3:]),
                shaped,
            )
            index = i * m + jnp.arange(m, dtype=jnp.int32)
            if per_example_keys:
                stream_index = (state.samples + index).astype(jnp.uint32)
                xs = (xs, jax.vmap(jax.random.fold_in, in_axes=(None, 0))(state.rng, stream_index))
            return constrain(xs), index < n

        def stats_of(i, inner):
            xs, mask = micro(i)
            s, losses = st.grad_stats(
                loss,
                params,
                xs,
                method=method,
                chunk_size=chunk_size,
                mask=mask,
                sq_sum=want_sq,
                inner_sq_sum=inner,
                leaf_sq_norm_sum=want_leaf,
                return_losses=True,
            )
            return s, jnp.sum(jnp.where(mask, losses, 0).astype(acc))

        if k_max == 1:
            batch_stats, loss_sum = stats_of(0, want_inner)
        else:
            zero = jax.tree_util.tree_map(
                lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(lambda: stats_of(0, False))
            )

            def body(i, carry):
                s, total = stats_of(i, False)
                return st.merge(carry[0], s), carry[1] + total

            batch_stats, loss_sum = jax.lax.fori_loop(0, (n + m - 1) // m, body, zero)
            if want_inner:

                def inner_body(i, totals):
                    xs, mask = micro(i)
                    a = st.inner_products(loss, params, xs, batch_stats.mean).astype(acc)
                    inner, dev = _inner_sums(a, mask, batch_stats.mean)  # the centre ‖ḡ‖² is known by now
                    return totals[0] + inner, totals[1] + dev

                zeros = (jnp.zeros((), acc), jnp.zeros((), acc))
                inner, dev = jax.lax.fori_loop(0, (n + m - 1) // m, inner_body, zeros)
                batch_stats = batch_stats._replace(inner_sq_sum=inner, inner_dev_sq_sum=dev)

        mean_loss = loss_sum / n.astype(acc)
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(jnp.result_type(p)), batch_stats.mean, params)
        second: dict[str, Any] = {}
        if opt.needs_extrapolated_grads(state.opt_state):  # EXTRAP-SGD: the gradient at θ̃ on the same examples
            tilde = opt.extrapolate(params, state.opt_state, grads)

            def grad_sum(i, total):
                xs, mask = micro(i)
                g = jax.grad(lambda p: jnp.sum(jnp.where(mask, loss(p, xs), 0)))(tilde)
                return jax.tree_util.tree_map(lambda t, x: t + x.astype(acc), total, g)

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), acc), params)
            if k_max == 1:
                total = grad_sum(0, zeros)
            else:
                total = jax.lax.fori_loop(0, (n + m - 1) // m, grad_sum, zeros)
            second["extrapolated_grads"] = jax.tree_util.tree_map(
                lambda t, p: (t / n.astype(acc)).astype(jnp.result_type(p)), total, params
            )
        if curv.declared_curvature(state.opt_state) is not None:  # a curvature learner: the first micro-batch
            xs, mask = micro(0)
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            second["curvature"] = curv.requested_spectrum(loss, params, xs, state.opt_state, key=key, mask=mask)
        updates, new_opt = tx.update(
            grads, state.opt_state, params, grad_stats=batch_stats, batch_size=n, value=mean_loss, **second
        )
        finite = jnp.isfinite(mean_loss) & jnp.isfinite(batch_stats.sq_norm_sum)
        for leaf in jax.tree_util.tree_leaves((grads, updates, second)):  # an optimizer may also turn finite into inf
            finite = finite & jnp.all(jnp.isfinite(leaf))
        keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b).astype(jnp.result_type(b)), new, old
        )
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = TrainState(
            params=keep(optax.apply_updates(params, updates), params),
            opt_state=keep(new_opt, state.opt_state),
            step=optax.safe_increment(state.step),
            samples=state.samples + n,
            skipped=skipped,
            rng=state.rng,
        )
        grad_norm = jnp.sqrt(st.mean_sq_norm(batch_stats))
        update_norm = optax.tree.norm(updates).astype(acc)
        effective = jnp.where(grad_norm > 0, update_norm / jnp.where(grad_norm > 0, grad_norm, 1), 0)
        injected = find_state(new_opt, _has_learning_rate)
        rule = find_state(new_state.opt_state, has_decision)  # any batch-size rule (tests, noise-scale rule)
        metrics = dict(
            loss=mean_loss,
            batch_size=n,
            next_batch_size=n if rule is None else rule.next_batch_size,
            finite=finite,
            skipped=skipped,
            learning_rate=effective if injected is None else jnp.asarray(injected.hyperparams["learning_rate"], acc),
            effective_learning_rate=effective,
            grad_norm=grad_norm,
            update_norm=update_norm,
            trace_cov=st.trace_covariance(batch_stats),
            b_simple=st.b_simple(batch_stats),
        )
        learner = find_state(new_state.opt_state, lambda node: isinstance(node, curv.ScaleBySLQLearnerState))
        if learner is not None:
            metrics.update(
                learning_rate=learner.learning_rate.astype(acc),
                momentum=learner.momentum.astype(acc),
                lambda_max=learner.lambda_max.astype(acc),
                lambda_min=learner.lambda_min.astype(acc),
                curvature_rejected=learner.rejected,
            )
        if isinstance(rule, BatchSizeTestState):
            metrics.update(
                rule_statistic=rule.statistic, rule_threshold=rule.threshold, rule_nonfinite=rule.nonfinite_count
            )
        return new_state, metrics

    return TrainStep(
        step_fn,
        micro_batch_size=micro_batch_size,
        mesh=mesh,
        data_axis=data_axis,
        counter=counter,
        model_axis=model_axis,
    )
