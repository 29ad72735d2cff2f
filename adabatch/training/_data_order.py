r"""Host-side data feeding for a batch size that changes during training, without recompiling the step.

The training data is an in-memory pytree of arrays (NumPy or JAX) sharing a leading axis of :math:`N` examples.
The examples are read as one endless **stream**: the concatenation of a fresh seeded permutation of
:math:`0..N-1` per epoch, where epoch :math:`e` uses ``numpy.random.default_rng([seed, e])``. A batch is the next
:math:`b` entries of the stream, so the whole position of the loop is one integer, the **global sample offset**
:math:`o` (epoch :math:`\lfloor o/N\rfloor`, position :math:`o \bmod N`); a batch may straddle two epochs. Resuming
from :math:`o` reproduces every later batch exactly, whatever batch sizes were used before.

**Padded buckets.** A jitted step compiles once per input shape. :func:`bucket_size` rounds a batch of :math:`b`
examples up to a *physical* size :math:`P = \text{base}\cdot 2^j` (capped), the batch is padded to :math:`P` rows
and the step is told :math:`b`; the padding rows are copies of real examples (so every loss stays finite) and are
masked out of every statistic. A run whose batch grows from :math:`b_{\min}` to :math:`b_{\max}` therefore sees at
most :math:`\lceil\log_2(b_{\max}/b_{\min})\rceil + 1` shapes.

**Layout for micro-batches and devices.** With a micro-batch of :math:`m` rows and :math:`D` data shards, logical
example :math:`e` (micro-batch :math:`i=\lfloor e/m\rfloor`, slot :math:`t = e \bmod m`) is stored at physical row
:math:`d\,P/D + i\,m/D + j` with :math:`d=\lfloor t/(m/D)\rfloor`, :math:`j=t \bmod (m/D)`: every micro-batch is
spread evenly over the :math:`D` shards of a buffer sharded along its leading axis, and the real examples fill the
first :math:`\lceil b/m\rceil` micro-batches. For :math:`D=1` the layout is the identity. :func:`physical_order`
gives the permutation, :class:`DataStream` applies it.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import numpy as np

from adabatch._validation import check_positive_int

__all__ = ["DataStream", "bucket_size", "epoch_permutation", "physical_order", "process_rows"]


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``num_examples`` examples (seeded, reproducible).

    Example:
      >>> from adabatch.training import epoch_permutation
      >>> sorted(epoch_permutation(5, seed=0, epoch=3).tolist())
      [0, 1, 2, 3, 4]
    """
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(num_examples))


def bucket_size(size: int, base: int, cap: int | None = None) -> int:
    """The physical batch size for ``size`` examples: the smallest ``base * 2**j >= size``, at most ``cap``.

    ``cap`` (if given) must be a multiple of the unit the buckets must respect and at least ``size``.

    Example:
      >>> from adabatch.training import bucket_size
      >>> [bucket_size(b, 32) for b in (1, 32, 33, 100, 129)], bucket_size(900, 32, cap=928)
      ([32, 32, 64, 128, 256], 928)
    """
    check_positive_int("size", size)
    check_positive_int("base", base)
    physical = int(base)
    while physical < size:
        physical *= 2
    if cap is not None:
        if cap < size:
            raise ValueError(f"cap={cap} is below size={size}")
        physical = min(physical, int(cap))
    return physical


def physical_order(physical_size: int, micro_batch_size: int, num_shards: int = 1) -> np.ndarray:
    """``order[r]`` = the logical example index stored at physical row ``r`` (see the module docstring).

    Example:
      >>> from adabatch.training import physical_order
      >>> physical_order(8, micro_batch_size=4, num_shards=2).tolist()
      [0, 1, 4, 5, 2, 3, 6, 7]
    """
    for name, value in (("physical_size", physical_size), ("micro_batch_size", micro_batch_size)):
        check_positive_int(name, value)
    check_positive_int("num_shards", num_shards)
    if physical_size % micro_batch_size:
        raise ValueError(f"physical_size={physical_size} must be a multiple of micro_batch_size={micro_batch_size}")
    if micro_batch_size % num_shards:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be a multiple of num_shards={num_shards}")
    k = physical_size // micro_batch_size
    logical = np.arange(physical_size).reshape(k, num_shards, micro_batch_size // num_shards)
    return logical.transpose(1, 0, 2).reshape(-1)


def process_rows(sharding: Any, physical_size: int) -> np.ndarray:
    """The physical rows of a ``physical_size``-row buffer that this process's devices hold under ``sharding``.

    The rows of every device of this process (``sharding.addressable_devices_indices_map``), without repeats,
    in increasing order: the local data ``jax.make_array_from_process_local_data(sharding, local)`` expects. With
    one process, or a sharding that replicates the leading axis, every row.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec
      >>> from adabatch.training import process_rows
      >>> mesh = Mesh(np.array(jax.devices()), ("data",))
      >>> process_rows(NamedSharding(mesh, PartitionSpec("data")), 4).tolist()  # one process holds every row
      [0, 1, 2, 3]
    """
    check_positive_int("physical_size", physical_size)
    held = np.zeros(physical_size, bool)
    for index in sharding.addressable_devices_indices_map((physical_size,)).values():
        held[index[0] if index else slice(None)] = True
    return np.flatnonzero(held)


class DataStream:
    """Batches of any size from an in-memory data set, read as a seeded stream of per-epoch permutations.

    Args:
      data: a pytree of arrays (NumPy or JAX; JAX arrays are copied to the host once) with a shared leading axis.
      seed: seed of the per-epoch permutations.

    Example:
      >>> import numpy as np
      >>> from adabatch.training import DataStream
      >>> stream = DataStream({"x": np.arange(10.0)}, seed=0)
      >>> batch = stream.batch(offset=8, size=4, physical_size=8)  # straddles epochs 0 and 1
      >>> batch["x"].shape, len(set(stream.indices(0, 10).tolist()))
      ((8,), 10)
    """

    def __init__(self, data: Any, seed: int = 0):
        leaves = jax.tree_util.tree_leaves(data)
        if not leaves:
            raise ValueError("data must hold at least one array with a leading example axis")
        self.data = jax.tree_util.tree_map(np.asarray, data)
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(self.data)}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(self.data)]
            raise ValueError(f"data leaves must share one non-empty leading example axis; got shapes {shapes}")
        self.num_examples = int(cast(int, sizes.pop()))  # not None: checked above
        self.seed = int(seed)
        self._cached: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_permutation(self.num_examples, self.seed, epoch))
        return self._cached[1]

    def indices(self, offset: int, size: int) -> np.ndarray:
        """Example indices of stream entries ``offset .. offset + size - 1``."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        check_positive_int("size", size)
        parts, n = [], self.num_examples
        while size > 0:
            epoch, position = divmod(offset, n)
            take = min(size, n - position)
            parts.append(self._permutation(epoch)[position : position + take])
            offset, size = offset + take, size - take
        return np.concatenate(parts)

    def batch(
        self,
        offset: int,
        size: int,
        physical_size: int | None = None,
        micro_batch_size: int | None = None,
        num_shards: int = 1,
        rows: np.ndarray | None = None,
    ) -> Any:
        """The next ``size`` examples from ``offset``, padded to ``physical_size`` rows in the physical layout.

        Padding rows repeat real examples of the batch (they are masked out by the step). ``rows`` (physical row
        indices, default all) selects the rows to return: a process of a multi-process run reads only the rows its
        devices hold (:func:`process_rows`), and the rows of every process together are the whole buffer.
        """
        physical_size = size if physical_size is None else physical_size
        if physical_size < size:
            raise ValueError(f"physical_size={physical_size} is below size={size}")
        index = self.indices(offset, size)
        logical = index[np.arange(physical_size) % size]
        if micro_batch_size is not None or num_shards > 1:
            logical = logical[physical_order(physical_size, micro_batch_size or physical_size, num_shards)]
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.ndim != 1 or (rows.size and not 0 <= rows.min() <= rows.max() < physical_size):
                raise ValueError(f"rows must be a vector of physical row indices in [0, {physical_size})")
            logical = logical[rows]
        return jax.tree_util.tree_map(lambda x: np.take(x, logical, axis=0), self.data)
