"""Flax integration (the only part of adabatch that imports flax).

* :func:`per_example_loss` turns an NNX module or a linen ``apply`` function into the per-example loss
  ``loss_fn(params, (inputs, targets)) -> (b,)`` that adabatch's statistics take; :func:`nnx_params` gives the
  matching pure parameters of an NNX module.
* NNX: a stock ``nnx.Optimizer`` works; ``optimizer.update(model, grads, **extra_args)`` forwards ``grad_stats``,
  ``batch_size`` and ``value`` to ``tx.update``. :func:`nnx_update` does statistics and update in one call.
* linen: :class:`TrainState` (a ``flax.training.train_state.TrainState`` whose ``apply_gradients`` forwards extra
  arguments to ``tx.update``) and :func:`linen_update`.
* :mod:`adabatch.flax.models`: small models for the examples, the command line and the benchmarks.
"""

from adabatch.flax.loss import nnx_params, per_example_loss
from adabatch.flax.training import TrainState, linen_update, nnx_update

__all__ = ["TrainState", "linen_update", "nnx_params", "nnx_update", "per_example_loss"]
