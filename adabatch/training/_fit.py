"""The host loop: feed batches of the decided size to a compiled step, with checkpoints and a progress bar."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from adabatch import _deprecation
from adabatch._tree import find_state
from adabatch._validation import check_positive_int
from adabatch.rules import DECISION_FIELD, has_decision
from adabatch.training._data_order import DataStream, bucket_size, process_rows
from adabatch.training._step import TrainState, TrainStep, strong

__all__ = ["FitResult", "fit"]


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


def _global_batch(sharding: Any, physical: int, local: Any) -> Any:
    """The global ``physical``-row batch whose rows held by this process's devices are ``local``."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, (physical, *x.shape[1:])), local
    )


def _abstract(state: Any, layout: Any) -> Any:
    """``state`` as shapes and dtypes in the shardings ``layout`` (``state`` itself without a layout)."""
    if layout is None:
        return state
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, layout)


def _place(x: Any, sharding: Any) -> Any:
    """``x`` laid out as ``sharding`` (its global value unchanged)."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() > 1 and (not isinstance(x, jax.Array) or x.is_fully_addressable):
        # An array on this process's devices cannot move to the devices of other processes: place the host copy,
        # the same on every process (each keeps the shards its devices hold).
        x = np.asarray(jax.device_get(x))
    return jax.device_put(x, sharding)


def _state_types(opt_state: Any) -> str:
    """The optimizer state's NamedTuple types in tree order, e.g. ``"BatchSizeTestState, ScaleByAdagradNormState"``:
    what tells one optimizer or rule from another in a checkpoint's metadata."""
    names: list[str] = []

    def visit(node: Any) -> None:
        if hasattr(node, "_fields"):
            names.append(type(node).__name__)
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for key in sorted(node):
                visit(node[key])

    visit(opt_state)
    return ", ".join(names)


def _check_same_run(checkpointer: Any, checkpoint_dir: Any, meta: dict) -> None:
    """Raise a CheckpointError naming every setting in which the latest checkpoint's run differs from this one."""
    from adabatch.training._checkpoint import CheckpointError

    saved = checkpointer.metadata()
    labels = {"optimizer_state": "optimizer state (the optimizer or rule)", "init_batch_size": "init_batch_size"}
    differ = [
        f"{labels.get(key, key)}: {saved[key]!r} in the checkpoint, {value!r} now"
        for key, value in meta.items()
        if key in saved and saved[key] != value  # an older checkpoint without a key is not refused for it
    ]
    if differ:
        checkpointer.close()
        raise CheckpointError(
            f"the checkpoint in {checkpoint_dir} was written by a different run; " + "; ".join(differ)
        )


def fit(
    step: TrainStep,
    state: TrainState,
    data: Any,
    *,
    num_steps: int,
    init_batch_size: int | None = None,
    seed: int = 0,
    callback: Callable[[TrainState, dict], Any] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = False,
    batch_size: int | None = None,
) -> FitResult:
    r"""Train until ``state.step == num_steps``, feeding batches of the size the rule in ``tx`` decides.

    Step :math:`k` uses :math:`b_k = \min(N, \max(\texttt{init\_batch\_size}, \text{decision}))` examples (only
    ``init_batch_size`` without a rule) taken from the seeded stream of :class:`adabatch.training.DataStream` at offset
    ``state.samples``, padded to the bucket :math:`P = \text{base}\cdot2^j` with
    :math:`\text{base}=\texttt{init\_batch\_size}` rounded up to a multiple of the micro-batch and the number of data
    shards. A decision above the data-set size :math:`N` is capped at :math:`N` with a warning.

    **Several processes** (``jax.distributed.initialize``, one per host): every process calls ``fit`` with the same
    arguments and the same data set, and ``step`` must have a ``mesh`` over the devices of every process. The
    stream's order depends on the seed and the offset only, so it is the same whatever the number of processes; each
    process takes only the rows of the padded global batch that its devices hold
    (:func:`adabatch.training.process_rows`), and ``jax.make_array_from_process_local_data`` forms the global batch.
    The step reduces the statistics over every device of every process, so every process reads the same decision;
    only process 0 shows the progress bar. The state is placed as :meth:`TrainStep.state_sharding` says (replicated,
    or split along ``model_axis``, FSDP-style); with ``checkpoint_dir`` (on storage every process sees) every process
    writes the shards its devices hold and resumes by reading only those, whatever the number of processes that
    wrote the checkpoint.

    Args:
      step: from :func:`make_train_step`.
      state: the initial state (with ``resume``, only its structure matters: the checkpoint replaces it).
      data: a pytree of in-memory arrays with a leading example axis.
      num_steps: train until this many steps in total (a resumed run continues to the same total).
      init_batch_size: the first (and smallest) batch size; the fixed size when ``tx`` has no rule.
      seed: seed of the per-epoch shuffling.
      callback: ``callback(state, record)`` after each step with the new state and the step's host metrics (a dict
        already in the history: entries the callback adds, e.g. an evaluation, are kept); an exception
        (``KeyboardInterrupt`` included) stops the run and the last checkpoint stays intact.
      checkpoint_dir: write the state atomically every ``checkpoint_every`` steps and at the end
        (:class:`adabatch.training.Checkpointer`, needs orbax-checkpoint). A directory that already holds
        checkpoints is refused unless ``resume``.
      checkpoint_every: the interval in steps (None: only at the end).
      resume: continue from the latest checkpoint in ``checkpoint_dir`` (an error if there is none). Resumed with
        the same arguments, the run ends bit-identical to an uninterrupted one.
      progress: show a tqdm progress bar (on process 0 only).
      batch_size: deprecated name of ``init_batch_size`` (removed in the next release).

    Returns:
      A :class:`FitResult`.
    """
    if batch_size is not None:
        _deprecation.warn("fit(batch_size=...)", "fit(init_batch_size=...)")
        init_batch_size = batch_size
    if init_batch_size is None:
        raise ValueError("fit needs init_batch_size (the first batch size; the fixed size when tx has no rule)")
    batch_size = init_batch_size
    check_positive_int("num_steps", num_steps)
    check_positive_int("init_batch_size", batch_size)
    check_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    if step.mesh is None and jax.process_count() > 1:
        raise ValueError(
            f"this is one of {jax.process_count()} processes: make_train_step needs mesh= over the devices of every "
            "process (e.g. Mesh(np.array(jax.devices()), ('data',))) so that they share the batch"
        )
    stream = DataStream(data, seed)
    total = stream.num_examples
    if batch_size > total:
        warnings.warn(
            f"init_batch_size={batch_size} exceeds the {total} examples of the data set; capped", stacklevel=2
        )
        batch_size = total
    meta = {
        "seed": int(seed),
        "num_examples": total,
        "init_batch_size": int(batch_size),
        "optimizer_state": _state_types(state.opt_state),
    }
    state = strong(state)
    layout = step.state_sharding(state)  # None without a mesh
    checkpointer = None
    if checkpoint_dir is not None:
        from adabatch.training._checkpoint import Checkpointer, CheckpointError  # orbax is optional

        checkpointer = Checkpointer(checkpoint_dir)
        if resume:  # with a mesh, every process reads only the shards its devices hold, in the step's layout
            _check_same_run(checkpointer, checkpoint_dir, meta)  # before the state: a clear message, not a tree dump
            state, _ = checkpointer.restore(_abstract(state, layout))
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
    if step.mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharded = NamedSharding(step.mesh, PartitionSpec(step.data_axis))
        state = jax.tree_util.tree_map(_place, state, layout)
        local_rows: dict[int, np.ndarray] = {}  # physical size -> the rows this process's devices hold
    rule = find_state(state.opt_state, has_decision)
    decision = batch_size if rule is None else int(getattr(rule, DECISION_FIELD))
    offset, done = int(state.samples), int(state.step)
    start_compilations, start = step.compilations, time.perf_counter()
    bar = None
    if progress and jax.process_index() == 0:
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
            if step.mesh is None:
                batch = stream.batch(offset, size, physical, step.micro_batch_size, step.num_shards)
            else:  # this process reads only the rows its devices hold; the rows of all processes form the batch
                if physical not in local_rows:
                    local_rows[physical] = process_rows(sharded, physical)
                local = stream.batch(
                    offset, size, physical, step.micro_batch_size, step.num_shards, rows=local_rows[physical]
                )
                batch = _global_batch(sharded, physical, local)
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
