r"""The training runtime: one jit-compiled step that computes the statistics, the update and the next batch size
together, and a host loop that feeds batches of the decided size without recompiling for every size.

**The step.** For a batch :math:`\mathcal B` of :math:`b` real examples (the rows of a possibly padded buffer),
:func:`make_train_step` computes the :class:`~adabatch.stats.GradStats` of the per-example gradients
:math:`g_i=\nabla\ell_i(\theta)` with :func:`adabatch.grad_stats` (``method=stats``), the mean loss
:math:`\bar\ell = \tfrac1b\sum_i\ell_i` and the mean gradient :math:`\bar g`, then calls

``tx.update(ḡ, opt_state, params, grad_stats=stats, batch_size=b, value=ℓ̄)``

(the extra-argument names of ``design.md`` §4; ``tx`` is wrapped with ``optax.with_extra_args_support`` so a plain
transformation ignores them) and applies the update. A batch-size rule anywhere in ``tx`` leaves its decision in
the optimizer state; the step reports it as ``next_batch_size``.

**Growth without recompiling.** The buffer has :math:`P` rows, of which the first :math:`b` (a traced int32) are
real. With ``micro_batch_size=m`` the buffer is cut into :math:`P/m` micro-batches and a ``lax.fori_loop`` with
the *traced* trip count :math:`k=\lceil b/m\rceil` accumulates their statistics with
:func:`adabatch.stats.merge` (exact for every field but :math:`\sum_i\langle g_i,\bar g\rangle^2`, which needs the
mean of the whole batch: when the transformation needs it, a second loop over the same micro-batches computes
:math:`\langle g_i,\bar g\rangle` by one JVP each, :func:`adabatch.inner_products`). The work is therefore
:math:`\lceil b/m\rceil` micro-batches whatever :math:`P`; the shape only changes when :func:`fit` moves to the next
padded bucket :math:`P=\text{base}\cdot2^j` (:mod:`adabatch.data`), so a run growing from :math:`b_{\min}` to
:math:`b_{\max}` compiles at most :math:`\lceil\log_2(b_{\max}/b_{\min})\rceil+1` times. Without
``micro_batch_size`` the whole buffer is one micro-batch and the padding rows are masked out.

**Which statistics.** ``sq_sum`` (:math:`\sum_i g_i\odot g_i`, the coordinate-wise test) and ``inner_sq_sum``
(the inner-product tests) cost extra, so they are computed only when ``tx`` needs them. ``None`` (the default)
means *infer*: when the step is traced, ``tx.update`` is run on abstract values (``jax.eval_shape``, no
computation) with neither field, and a field is switched on when the rules raise their "``... is None``"
``ValueError`` naming it. Pass ``True``/``False`` to decide yourself.

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

import math
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adabatch import per_example
from adabatch import stats as st
from adabatch._validation import accumulation_dtype, check_choice, check_positive_int
from adabatch.data import DataStream, bucket_size
from adabatch.rules import BatchSizeTestState, find_state, has_batch_size

__all__ = [
    "FitResult",
    "TrainState",
    "TrainStep",
    "fit",
    "init_train_state",
    "make_train_step",
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


def _strong(tree: Any) -> Any:
    """Drop weak types (a weak leaf would retrace the step once it comes back strong)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp.asarray(x).dtype), tree)


def init_train_state(params: Any, tx: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    """A fresh :class:`TrainState`: ``tx.init(params)``, zero counters and the key of ``seed``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adabatch.train import init_train_state
      >>> state = init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), seed=1)
      >>> int(state.step), int(state.samples), state.rng.dtype.name
      (0, 0, 'uint32')
    """
    zero = jnp.zeros((), jnp.int32)
    key = jax.random.key_data(jax.random.key(int(seed)))
    return _strong(TrainState(params, optax.with_extra_args_support(tx).init(params), zero, zero, zero, key))


def _leading(batch: Any) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        shapes = [tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(batch)]
        raise ValueError(f"batch leaves must share one leading batch axis; got shapes {shapes}")
    return sizes.pop()


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

    ``tx.update`` is evaluated on abstract values (``jax.eval_shape``: nothing is computed) with ``grad_stats``
    lacking both fields; a field is switched on when a rule raises its "``... is None``" ``ValueError`` naming
    it. An argument that is not None is taken as given. Works on concrete or traced ``params``/``opt_state``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adabatch
      >>> from adabatch.train import required_statistics
      >>> tx = optax.chain(adabatch.inner_product_test(), optax.sgd(0.1))
      >>> required_statistics(tx, jnp.zeros(3), tx.init(jnp.zeros(3)))
      (False, True)
    """
    return _infer_needs(optax.with_extra_args_support(tx), params, opt_state, sq_sum, inner_sq_sum)


def _infer_needs(tx: Any, params: Any, opt_state: Any, sq_sum: bool | None, inner: bool | None) -> tuple[bool, bool]:
    sds = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))  # noqa: E731
    acc = accumulation_dtype(jnp.result_type(*jax.tree_util.tree_leaves(params)))
    mean = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), acc), params)
    scalar = jax.ShapeDtypeStruct((), acc)
    want_sq, want_inner = bool(sq_sum), bool(inner)

    def update(p, o, s, b, v):
        grads = jax.tree_util.tree_map(lambda g, q: g.astype(q.dtype), s.mean, p)
        return tx.update(grads, o, p, grad_stats=s, batch_size=b, value=v)

    for _ in range(3):
        stats = st.GradStats(
            jax.ShapeDtypeStruct((), jnp.int32), mean, scalar, mean if want_sq else None, scalar if want_inner else None
        )
        try:
            jax.eval_shape(
                update,
                *jax.tree_util.tree_map(sds, (params, opt_state)),
                stats,
                jax.ShapeDtypeStruct((), jnp.int32),
                scalar,
            )
            return want_sq, want_inner
        except ValueError as exc:
            message = str(exc)
            if "inner_sq_sum" in message and not want_inner and inner is None:
                want_inner = True
            elif "sq_sum" in message and not want_sq and sq_sum is None:
                want_sq = True
            else:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


class TrainStep:
    """The callable :func:`make_train_step` returns: ``step(state, batch, size=None) -> (state, metrics)``.

    ``batch`` has ``P`` rows of which the first ``size`` (default all) are real examples, in the layout of
    :func:`adabatch.data.physical_order` (the identity without a mesh). ``compilations`` counts how many times the
    step was traced and compiled; ``jitted`` is the underlying ``jax.jit`` function.
    """

    def __init__(self, fn: Callable, *, micro_batch_size: int | None, mesh: Any, data_axis: str, counter: list):
        self.micro_batch_size = micro_batch_size
        self.mesh = mesh
        self.data_axis = data_axis
        self.num_shards = 1 if mesh is None else int(mesh.shape[data_axis])
        self._counter = counter
        if mesh is None:
            self.jitted = jax.jit(fn)
        else:
            from jax.sharding import NamedSharding, PartitionSpec

            replicated, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(data_axis))
            self.jitted = jax.jit(fn, in_shardings=(replicated, sharded, replicated), out_shardings=replicated)

    @property
    def compilations(self) -> int:
        """How many times the step has been traced (each trace is one compilation)."""
        return self._counter[0]

    def __call__(self, state: TrainState, batch: Any, size: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        rows = _leading(batch)
        if size is None:
            size = rows
        elif not isinstance(size, jax.core.Tracer) and not 1 <= int(size) <= rows:
            raise ValueError(f"size must lie in [1, {rows}] (the batch has {rows} rows), got {size}")
        return self.jitted(state, batch, jnp.asarray(size, jnp.int32))


def make_train_step(
    loss_fn: Callable[..., jax.Array],
    tx: optax.GradientTransformation,
    *,
    stats: str = "vmap",
    micro_batch_size: int | None = None,
    chunk_size: int | None = None,
    sq_sum: bool | None = None,
    inner_sq_sum: bool | None = None,
    mesh: Any = None,
    data_axis: str = "data",
    per_example_keys: bool = False,
) -> TrainStep:
    r"""One jit-compiled, pure training step: statistics, update and next batch size together.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses (not their mean); with
        ``per_example_keys=True``, ``loss_fn(params, batch, keys)`` where ``keys`` is a ``(b, 2)`` uint32 array of
        PRNG keys, row :math:`i` being ``fold_in(state.rng, o + i)`` for stream offset :math:`o` (the same key for
        the same example whatever the micro-batching or sharding; use it for dropout).
      tx: any Optax transformation; a batch-size rule in it receives ``grad_stats=``, everything receives
        ``batch_size=`` (int32, the number of real examples) and ``value=`` (the mean loss).
      stats: the :func:`adabatch.grad_stats` method, passed through (``"microbatch"`` only without
        ``micro_batch_size``: its group-mean estimates do not merge across micro-batches).
      micro_batch_size: physical micro-batch :math:`m`; the statistics of :math:`\lceil b/m\rceil` micro-batches
        are accumulated in a loop with a traced trip count (None: the whole buffer at once).
      chunk_size: passed to :func:`adabatch.grad_stats` (bounds memory inside a micro-batch).
      sq_sum, inner_sq_sum: compute these optional statistics; None infers what ``tx`` needs.
      mesh: a ``jax.sharding.Mesh``: the batch is sharded along ``data_axis``, everything else replicated.
      data_axis: the mesh axis of the batch.
      per_example_keys: pass per-example PRNG keys to ``loss_fn`` (see above).

    Returns:
      A :class:`TrainStep` ``step(state, batch, size=None) -> (state, metrics)``; ``metrics`` holds ``loss``,
      ``batch_size``, ``next_batch_size``, ``finite``, ``skipped``, ``learning_rate``,
      ``effective_learning_rate``, ``grad_norm``, ``update_norm``, ``trace_cov``, ``b_simple`` and, with a rule,
      ``rule_statistic``, ``rule_threshold``, ``rule_nonfinite``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adabatch
      >>> from adabatch.train import init_train_state, make_train_step
      >>> loss = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
      >>> tx = optax.chain(adabatch.norm_test(0.5, max_batch_size=64), optax.sgd(0.1))
      >>> step = make_train_step(loss, tx, micro_batch_size=4)
      >>> x = jnp.arange(16.0).reshape(8, 2) / 8
      >>> state, metrics = step(init_train_state(jnp.zeros(2), tx), (x, x.sum(1)))
      >>> int(metrics["batch_size"]), int(state.samples), int(metrics["next_batch_size"]) >= 8
      (8, 8, True)
    """
    check_choice("stats", stats, per_example.METHODS)
    check_positive_int("micro_batch_size", micro_batch_size, allow_none=True)
    if stats == "microbatch" and micro_batch_size is not None:
        raise ValueError(
            "stats='microbatch' estimates the statistics from group means inside one batch and its estimates do not "
            "merge across micro-batches; use micro_batch_size=None with it, or stats='vmap'/'ghost' with micro-batches"
        )
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    for name, value in (("sq_sum", sq_sum), ("inner_sq_sum", inner_sq_sum)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True, False or None (infer), got {value!r}")
    shards = 1
    if mesh is not None:
        if data_axis not in mesh.axis_names:
            raise ValueError(f"data_axis={data_axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
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
        rows = _leading(batch)
        m = micro_batch_size or rows
        if rows % m and shards == 1:  # pad with copies of real rows (masked out) to whole micro-batches
            padded = -(-rows // m) * m
            batch = jax.tree_util.tree_map(lambda x: jnp.take(x, jnp.arange(padded) % rows, axis=0), batch)
            rows = padded
        if rows % m or m % shards:
            raise ValueError(
                f"the batch has {rows} rows: it must be a multiple of micro_batch_size={m}, itself a multiple of "
                f"the {shards} data shards (adabatch.data.bucket_size gives such sizes)"
            )
        want_sq, want_inner = _infer_needs(tx, params, state.opt_state, sq_sum, inner_sq_sum)
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
            s, losses = per_example.grad_stats(
                loss,
                params,
                xs,
                method=stats,
                chunk_size=chunk_size,
                mask=mask,
                sq_sum=want_sq,
                inner_sq_sum=inner,
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

                def inner_body(i, total):
                    xs, mask = micro(i)
                    a = per_example.inner_products(loss, params, xs, batch_stats.mean).astype(acc)
                    return total + jnp.sum(jnp.where(mask, jnp.square(a), 0))

                inner = jax.lax.fori_loop(0, (n + m - 1) // m, inner_body, jnp.zeros((), acc))
                batch_stats = batch_stats._replace(inner_sq_sum=inner)

        mean_loss = loss_sum / n.astype(acc)
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(jnp.result_type(p)), batch_stats.mean, params)
        updates, new_opt = tx.update(
            grads, state.opt_state, params, grad_stats=batch_stats, batch_size=n, value=mean_loss
        )
        finite = jnp.isfinite(mean_loss) & jnp.isfinite(batch_stats.sq_norm_sum)
        for leaf in jax.tree_util.tree_leaves((grads, updates)):  # an optimizer may also turn finite into inf
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
        rule = find_state(new_state.opt_state, has_batch_size)  # any batch-size rule (tests, noise-scale rule)
        metrics = dict(
            loss=mean_loss,
            batch_size=n,
            next_batch_size=n if rule is None else rule.batch_size,
            finite=finite,
            skipped=skipped,
            learning_rate=effective if injected is None else jnp.asarray(injected.hyperparams["learning_rate"], acc),
            effective_learning_rate=effective,
            grad_norm=grad_norm,
            update_norm=update_norm,
            trace_cov=st.trace_covariance(batch_stats),
            b_simple=st.b_simple(batch_stats),
        )
        if isinstance(rule, BatchSizeTestState):
            metrics.update(
                rule_statistic=rule.statistic, rule_threshold=rule.threshold, rule_nonfinite=rule.nonfinite_count
            )
        return new_state, metrics

    return TrainStep(step_fn, micro_batch_size=micro_batch_size, mesh=mesh, data_axis=data_axis, counter=counter)


class FitResult(NamedTuple):
    """What :func:`fit` returns."""

    state: TrainState  # the final state
    history: list  # one dict of host scalars per step run by this call (plus "step" and "samples")
    compilations: int  # compilations of the step during this call
    wall_time_s: float  # wall-clock time of this call


def _to_host(metrics: dict) -> dict:
    out = {}
    for key, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        out[key] = value.item() if value.ndim == 0 else value.tolist()
    return out


def fit(
    step: TrainStep,
    state: TrainState,
    data: Any,
    *,
    num_steps: int,
    batch_size: int,
    seed: int = 0,
    callback: Callable[[TrainState, dict], Any] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = False,
) -> FitResult:
    r"""Train until ``state.step == num_steps``, feeding batches of the size the rule in ``tx`` decides.

    Step :math:`k` uses :math:`b_k = \min(N, \max(\texttt{batch\_size}, \text{decision}))` examples (only
    ``batch_size`` without a rule) taken from the seeded stream of :class:`adabatch.data.DataStream` at offset
    ``state.samples``, padded to the bucket :math:`P = \text{base}\cdot2^j` with
    :math:`\text{base}=\texttt{batch\_size}` rounded up to a multiple of the micro-batch and the number of data
    shards. A decision above the data-set size :math:`N` is capped at :math:`N` with a warning.

    Args:
      step: from :func:`make_train_step`.
      state: the initial state (with ``resume``, only its structure matters: the checkpoint replaces it).
      data: a pytree of in-memory arrays with a leading example axis.
      num_steps: train until this many steps in total (a resumed run continues to the same total).
      batch_size: the smallest (and first) batch size; the fixed size when ``tx`` has no rule.
      seed: seed of the per-epoch shuffling.
      callback: ``callback(state, record)`` after each step with the new state and the step's host metrics (a dict
        already in the history: entries the callback adds, e.g. an evaluation, are kept); an exception
        (``KeyboardInterrupt`` included) stops the run and the last checkpoint stays intact.
      checkpoint_dir: write the state atomically every ``checkpoint_every`` steps and at the end
        (:class:`adabatch.checkpoint.Checkpointer`, needs orbax-checkpoint). A directory that already holds
        checkpoints is refused unless ``resume``.
      checkpoint_every: the interval in steps (None: only at the end).
      resume: continue from the latest checkpoint in ``checkpoint_dir`` (an error if there is none). Resumed with
        the same arguments, the run ends bit-identical to an uninterrupted one.
      progress: show a tqdm progress bar.

    Returns:
      A :class:`FitResult`.
    """
    check_positive_int("num_steps", num_steps)
    check_positive_int("batch_size", batch_size)
    check_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    stream = DataStream(data, seed)
    total = stream.num_examples
    if batch_size > total:
        warnings.warn(f"batch_size={batch_size} exceeds the {total} examples of the data set; capped", stacklevel=2)
        batch_size = total
    meta = {"seed": int(seed), "num_examples": total, "batch_size": int(batch_size)}
    checkpointer = None
    if checkpoint_dir is not None:
        from adabatch.checkpoint import Checkpointer, CheckpointError

        checkpointer = Checkpointer(checkpoint_dir)
        if resume:
            state, saved = checkpointer.restore(state)
            if any(saved.get(key) != value for key, value in meta.items()):
                checkpointer.close()
                raise CheckpointError(
                    f"the checkpoint in {checkpoint_dir} was written by a run with {saved}; got {meta}"
                )
        elif (latest := checkpointer.latest_step()) is not None:
            checkpointer.close()
            raise CheckpointError(
                f"{checkpoint_dir} already holds checkpoints (latest step {latest}); pass "
                "resume=True to continue that run or choose another directory"
            )
    elif resume:
        raise ValueError("resume=True needs checkpoint_dir")
    unit = math.lcm(step.micro_batch_size or 1, step.num_shards)
    base = -(-max(batch_size, step.micro_batch_size or 1) // unit) * unit
    cap = -(-total // unit) * unit
    state = _strong(state)
    if step.mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharded = NamedSharding(step.mesh, PartitionSpec(step.data_axis))
        state = jax.device_put(state, NamedSharding(step.mesh, PartitionSpec()))
    rule = find_state(state.opt_state, has_batch_size)
    decision = batch_size if rule is None else int(rule.batch_size)
    offset, done = int(state.samples), int(state.step)
    start_compilations, start = step.compilations, time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=done, unit="step", leave=False, mininterval=0.5)
    history, warned = [], False
    try:
        while done < num_steps:
            size = max(batch_size, decision)
            if size > total:
                if not warned:
                    warnings.warn(
                        f"batch size {size} exceeds the {total} examples of the data set; capped", stacklevel=2
                    )
                    warned = True
                size = total
            physical = bucket_size(size, base, cap)
            batch = stream.batch(offset, size, physical, step.micro_batch_size, step.num_shards)
            if step.mesh is not None:
                batch = jax.device_put(batch, sharded)
            state, metrics = step(state, batch, size)
            offset, done = offset + size, done + 1
            record = _to_host(metrics)
            record.update(step=done, samples=offset)
            history.append(record)
            decision = int(record["next_batch_size"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", batch=size, refresh=False)
            if callback is not None:
                callback(state, record)
            if checkpointer is not None and (done == num_steps or (checkpoint_every and done % checkpoint_every == 0)):
                checkpointer.save(done, state, metadata=meta)
    finally:
        if bar is not None:
            bar.close()
        if checkpointer is not None:
            checkpointer.close()
    return FitResult(state, history, step.compilations - start_compilations, time.perf_counter() - start)
