"""adabatch: adaptive batch sizes and learning rates from gradient noise, as Optax transformations.

The public names live flat here and, by layer, in the subpackages (lowest first):

* :mod:`adabatch.stats` — :class:`GradStats`, estimators, producers (:func:`grad_stats`), the noise scale;
* :mod:`adabatch.rules` — the batch-size tests and the noise-scale rule; :func:`next_batch_size`;
* :mod:`adabatch.optimizers` — AdaGrad, AdaGrad-Norm, AdaBelief, AdAdaGrad;
* :mod:`adabatch.scaling` — learning rate as a function of batch size, AdaScale;
* :mod:`adabatch.training` — the jitted step, the host loop, data order, checkpoints;
* :mod:`adabatch.flax` (optional, imports flax), :mod:`adabatch.experiments`, :mod:`adabatch.benchmarks`,
  :mod:`adabatch.cli`.

The documentation (maths, defaults, examples) is in ``docs/`` and at the documentation site built from it.
"""

import sys as _sys
from importlib import metadata as _metadata

from adabatch import _deprecation, optimizers, rules, scaling, stats, training
from adabatch.optimizers import (
    ScaleByAdagradNormState,
    ScaleByAdagradState,
    ScaleByBeliefState,
    adabelief,
    adadagrad,
    adadagrad_norm,
    adagrad,
    adagrad_norm,
    scale_by_adagrad,
    scale_by_adagrad_norm,
    scale_by_belief,
)
from adabatch.rules import (
    BatchSizeTestState,
    NoiseScaleRuleState,
    augmented_inner_product_test,
    coordinate_norm_test,
    decide,
    inner_product_test,
    next_batch_size,
    noise_scale_rule,
    norm_test,
    orthogonality_test,
)
from adabatch.scaling import (
    ScaleByAdaScaleState,
    ScaleByBatchSizeState,
    ScaleBySampleScheduleState,
    adascale,
    batch_size_factor,
    scale_by_batch_size,
    scale_by_sample_schedule,
    surge_learning_rate,
)
from adabatch.stats import (
    GradStats,
    GradStatsNeeds,
    NoiseScaleState,
    device_grad_stats,
    from_group_means,
    ghost,
    ghost_report,
    grad_stats,
    inner_products,
    per_example_grads,
)
from adabatch.training import (
    FitResult,
    TrainState,
    TrainStep,
    fit,
    init_train_state,
    make_train_step,
    required_statistics,
)

try:
    __version__ = _metadata.version("adabatch")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0+unknown"

# The statistics layer never imports a framework: the root wires the Flax linen capture backend, imported the
# first time statistics are computed after the user's code imported flax.linen.
stats.ghost.register_backend_provider("flax.linen", "adabatch.flax._ghost")

# Module paths of the previous release, served with a DeprecationWarning naming their new home.
_sys.meta_path.append(
    _deprecation.RenamedModules(
        {
            "adabatch.per_example": ("adabatch.stats",),
            "adabatch.microbatch": ("adabatch.stats",),
            "adabatch.noise_scale": ("adabatch.stats", "adabatch.rules"),
            "adabatch.train": ("adabatch.training",),
            "adabatch.data": ("adabatch.training",),
            "adabatch.checkpoint": ("adabatch.training",),
        }
    )
)

__getattr__ = _deprecation.deprecated_getattr(
    __name__,
    {
        "batch_size": ("adabatch.rules", "next_batch_size"),
        "AdaBeliefState": ("adabatch.optimizers", "ScaleByBeliefState"),
        "AdaScaleState": ("adabatch.scaling", "ScaleByAdaScaleState"),
        "noise_scale": ("adabatch.noise_scale", ""),
        "per_example": ("adabatch.per_example", ""),
        "microbatch": ("adabatch.microbatch", ""),
        "train": ("adabatch.train", ""),
        "data": ("adabatch.data", ""),
        "checkpoint": ("adabatch.checkpoint", ""),
    },
)

__all__ = [
    "BatchSizeTestState",
    "FitResult",
    "GradStats",
    "GradStatsNeeds",
    "NoiseScaleRuleState",
    "NoiseScaleState",
    "ScaleByAdaScaleState",
    "ScaleByAdagradNormState",
    "ScaleByAdagradState",
    "ScaleByBatchSizeState",
    "ScaleByBeliefState",
    "ScaleBySampleScheduleState",
    "TrainState",
    "TrainStep",
    "__version__",
    "adabelief",
    "adadagrad",
    "adadagrad_norm",
    "adagrad",
    "adagrad_norm",
    "adascale",
    "augmented_inner_product_test",
    "batch_size_factor",
    "coordinate_norm_test",
    "decide",
    "device_grad_stats",
    "fit",
    "from_group_means",
    "ghost",
    "ghost_report",
    "grad_stats",
    "init_train_state",
    "inner_product_test",
    "inner_products",
    "make_train_step",
    "next_batch_size",
    "noise_scale_rule",
    "norm_test",
    "optimizers",
    "orthogonality_test",
    "per_example_grads",
    "required_statistics",
    "rules",
    "scale_by_adagrad",
    "scale_by_adagrad_norm",
    "scale_by_batch_size",
    "scale_by_belief",
    "scale_by_sample_schedule",
    "scaling",
    "stats",
    "surge_learning_rate",
    "training",
]
