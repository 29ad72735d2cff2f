"""Layer 5 — Flax integration (the only part of adabatch that imports flax).

* :func:`per_example_loss` turns an NNX module or a linen ``apply`` function into the per-example loss
  ``loss_fn(params, (inputs, targets)) -> (b,)`` that adabatch's statistics take; :func:`nnx_params` gives the
  matching pure parameters of an NNX module.
* NNX: a stock ``nnx.Optimizer`` works; ``optimizer.update(model, grads, **extra_args)`` forwards ``grad_stats``,
  ``batch_size`` and ``value`` to ``tx.update``. :func:`nnx_update` does statistics and update in one call.
* linen: :class:`LinenTrainState` (a ``flax.training.train_state.TrainState`` whose ``apply_gradients`` forwards
  extra arguments to ``tx.update``) and :func:`linen_update`.
* ghost statistics for linen layers (``Dense``, ``DenseGeneral``, ``Conv``, ``Embed``, the norms, ``Einsum``) and
  their NNX counterparts (``Linear``, ``LinearGeneral``, ``Conv``, ``Embed``, the norms, ``Einsum``): capture
  backends that :func:`adabatch.grad_stats` loads by itself once the user's code has imported flax.linen, resp.
  flax.nnx (:func:`linen_capture`, :func:`nnx_capture`).
* :mod:`adabatch.flax.models`: small models for the examples, the command line and the benchmarks.

May import: flax, :mod:`adabatch.training` and every layer below it.
"""

from adabatch import _deprecation
from adabatch.flax._ghost import linen_capture
from adabatch.flax._loss import nnx_params, per_example_loss
from adabatch.flax._nnx_ghost import nnx_capture
from adabatch.flax._training import LinenTrainState, linen_update, nnx_update

__all__ = [
    "LinenTrainState",
    "linen_capture",
    "linen_update",
    "nnx_capture",
    "nnx_params",
    "nnx_update",
    "per_example_loss",
]

__getattr__ = _deprecation.deprecated_getattr(__name__, {"TrainState": ("adabatch.flax", "LinenTrainState")})
