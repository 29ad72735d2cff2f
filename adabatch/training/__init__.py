"""Layer 4 — the training runtime: one jit-compiled step and the host loop around it.

What lives here: :func:`make_train_step` (statistics, update and next batch size in one compiled step, growth
without recompiling), :class:`TrainState` and :func:`init_train_state`, :func:`fit` (the host loop: seeded data
order, padded buckets, progress bar, checkpoints), the data order (:class:`DataStream`, :func:`bucket_size`,
:func:`epoch_permutation`, :func:`physical_order`), and exact checkpoint/resume with orbax
(:class:`Checkpointer`, :class:`CheckpointError`; needs the optional ``orbax-checkpoint``).

May import: :mod:`adabatch.optimizers`, :mod:`adabatch.scaling`, :mod:`adabatch.rules`, :mod:`adabatch.stats`
and the base modules.
"""

from typing import Any

from adabatch.training._data_order import DataStream, bucket_size, epoch_permutation, physical_order, process_rows
from adabatch.training._fit import FitResult, fit
from adabatch.training._step import (
    TrainState,
    TrainStep,
    init_train_state,
    make_train_step,
    model_partition_spec,
    required_statistics,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DataStream",
    "FitResult",
    "TrainState",
    "TrainStep",
    "bucket_size",
    "epoch_permutation",
    "fit",
    "init_train_state",
    "make_train_step",
    "model_partition_spec",
    "physical_order",
    "process_rows",
    "required_statistics",
]


def __getattr__(name: str) -> Any:
    # The checkpoint classes import orbax-checkpoint, an optional dependency: load them on first use.
    if name in ("Checkpointer", "CheckpointError"):
        from adabatch.training import _checkpoint

        return getattr(_checkpoint, name)
    raise AttributeError(f"module 'adabatch.training' has no attribute {name!r}")
