"""Checkpoint and resume a :class:`~adabatch.training.TrainState` with orbax-checkpoint.

A checkpoint holds the whole state (parameters, optimizer state with the batch-size decision and the rule's
statistics, step, samples seen = the data stream's offset, skipped-update count, PRNG key) plus a small JSON
record of the host loop (seed, data-set size, smallest batch size). Writes are synchronous and atomic: orbax writes
into a temporary directory and renames it when complete, so an interrupted write (Ctrl-C, a crash) leaves the
previous checkpoint intact and the partial one is never read (orbax removes it the next time the directory is
opened). Restoring checks the tree structure, shapes and dtypes against a template state; a missing or unreadable
checkpoint raises :class:`CheckpointError` and writes nothing.

**Several processes** (``jax.distributed``): every process calls ``save`` and ``restore`` with the same arguments
on a directory they all see. orbax writes the shards each process's devices hold (one copy of a replicated shard)
into a store per process, and process 0 alone writes the metadata and the JSON record. ``restore`` reads into the
shardings of ``like`` (arrays, or ``jax.ShapeDtypeStruct`` with a ``sharding``): each process reads only the
shards its devices need, so a checkpoint written by N processes restores on M, on another mesh.

Needs the ``orbax-checkpoint`` package (``pip install 'adabatch[cli]'``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

try:
    import orbax.checkpoint as ocp
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("adabatch.training.Checkpointer needs orbax-checkpoint: pip install 'adabatch[cli]'") from exc

__all__ = ["CheckpointError", "Checkpointer"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the state it should restore into."""


def _describe(tree: Any) -> list[tuple[str, tuple, str]]:
    return [
        (
            jax.tree_util.keystr(path),
            tuple(np.shape(x)),
            str(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype),
        )
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    ]


class Checkpointer:
    """Numbered checkpoints of a training state in one directory (keeps the ``max_to_keep`` latest).

    Args:
      directory: where checkpoints live (created on the first save).
      max_to_keep: how many of the latest checkpoints to keep.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax
      >>> from adabatch.training import Checkpointer
      >>> from adabatch.training import init_train_state
      >>> state = init_train_state({"w": jnp.ones(2)}, optax.sgd(0.1))
      >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
      ...     _ = ckpt.save(3, state, metadata={"seed": 0})
      ...     restored, meta = ckpt.restore(state)
      >>> restored.params["w"].tolist(), meta
      ([1.0, 1.0], {'seed': 0})
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} exists and is not a directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=False)
        self._manager: Any = None
        self._options = options

    def _open(self, create: bool) -> Any:
        if self._manager is None:
            if not os.path.isdir(self.directory):
                if not create:
                    return None
                os.makedirs(self.directory, exist_ok=True)
            self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        return self._manager

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        manager = self._open(create=False)
        return None if manager is None else manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint, oldest first."""
        manager = self._open(create=False)
        return [] if manager is None else sorted(manager.all_steps())

    def save(self, step: int, state: Any, *, metadata: dict | None = None) -> bool:
        """Write ``state`` (and the JSON-serialisable ``metadata``) as checkpoint ``step``; returns True."""
        manager = self._open(create=True)
        if step in manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(metadata or {})))
        manager.save(int(step), args=args, force=True)
        manager.wait_until_finished()
        return True

    def _resolve(self, step: int | None) -> tuple[Any, int]:
        """The manager and the step to read (default the latest); CheckpointError when there is none."""
        manager = self._open(create=False)
        steps = [] if manager is None else list(manager.all_steps())
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {sorted(steps)}")
        return manager, step

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of checkpoint ``step`` (default the latest) alone, without reading the state.

        Raises:
          CheckpointError: no such checkpoint, or no readable metadata record.
        """
        manager, step = self._resolve(step)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as exc:  # orbax raises many types for damaged files
            where = os.path.join(self.directory, str(step))
            raise CheckpointError(f"checkpoint {where} has no readable metadata record: {exc}") from exc
        return dict(restored.meta or {})

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state of checkpoint ``step`` (default the latest) in the structure of ``like``, and its metadata.

        ``like``'s leaves give the shapes, dtypes and shardings to restore into (arrays or ``jax.ShapeDtypeStruct``).

        Raises:
          CheckpointError: no checkpoint, an unreadable (corrupt, truncated) one, or one whose tree, shapes or dtypes
            differ from ``like``.
        """
        manager, step = self._resolve(step)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        where = os.path.join(self.directory, str(step))
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except Exception as exc:  # orbax/tensorstore raise many types for damaged files
            raise CheckpointError(f"checkpoint {where} could not be read (corrupt or incomplete?): {exc}") from exc
        state, meta = restored.state, restored.meta
        if meta is None:
            raise CheckpointError(f"checkpoint {where} has no metadata record (corrupt or not written by adabatch)")
        expected, got = _describe(like), _describe(state)
        tree, like_tree = jax.tree_util.tree_structure(state), jax.tree_util.tree_structure(like)
        if tree != like_tree or expected != got:  # type: ignore[operator]  # jaxlib ships no stub for PyTreeDef
            raise CheckpointError(f"checkpoint {where} does not match the state to restore: {got} != {expected}")
        return state, dict(meta)

    def close(self) -> None:
        """Finish pending writes and release the directory."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
