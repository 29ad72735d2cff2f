"""adabatch: adaptive batch sizes and learning rates from gradient noise, as Optax transformations.

The public names live flat here and, by layer, in the subpackages (lowest first):

* :mod:`adabatch.stats` — :class:`GradStats`, estimators, producers (:func:`grad_stats`), the noise scale;
* :mod:`adabatch.rules` — the batch-size tests, the noise-scale rule, the learned optimal SGD batch size;
  :func:`next_batch_size`;
* :mod:`adabatch.optimizers` — AdaGrad, AdaGrad-Norm, AdaBelief, AdAdaGrad, Eve, Tom, MaxVA, ActiveLR, AdaLomo,
  CLARS, EXTRAP-SGD;
* :mod:`adabatch.curvature` — Hessian / Gauss-Newton vector products, Lanczos, SLQ spectra (:class:`Spectrum`);
* :mod:`adabatch.scaling` — learning rate as a function of batch size, AdaScale;
* :mod:`adabatch.training` — the jitted step, the host loop, data order, checkpoints;
* :mod:`adabatch.flax` (optional, imports flax), :mod:`adabatch.experiments`, :mod:`adabatch.benchmarks`,
  :mod:`adabatch.cli`.

The documentation (maths, defaults, examples) is in ``docs/`` and at the documentation site built from it.
"""

import sys as _sys
from importlib import metadata as _metadata

from adabatch import _deprecation, curvature, optimizers, rules, scaling, stats, training
from adabatch.curvature import (
    LanczosResult,
    ModelLoss,
    Spectrum,
    curvature_matvec,
    density,
    ggn_vp,
    hessian_spectrum,
    hvp,
    lambda_max,
    lambda_min,
    lanczos,
    operator_spectrum,
    scale_by_slq_learner,
    slq_learner,
    trace_moment,
)
from adabatch.optimizers import (
    ActiveLRState,
    ScaleByAdagradNormState,
    ScaleByAdagradState,
    ScaleByAdalomoState,
    ScaleByBeliefState,
    ScaleByClarsState,
    ScaleByEveState,
    ScaleByExtrapSGDState,
    ScaleByMaxVAState,
    ScaleByTomState,
    active_adabelief,
    active_adam,
    active_lr,
    adabelief,
    adadagrad,
    adadagrad_norm,
    adagrad,
    adagrad_norm,
    adalomo,
    clars,
    eve,
    evew,
    extrap_sgd,
    extrapolate,
    maxva,
    needs_extrapolated_grads,
    scale_by_adagrad,
    scale_by_adagrad_norm,
    scale_by_adalomo,
    scale_by_belief,
    scale_by_clars,
    scale_by_eve,
    scale_by_extrap_sgd,
    scale_by_maxva,
    scale_by_tom,
    tom,
)
from adabatch.rules import (
    BatchSizeTestState,
    NoiseScaleRuleState,
    OptimalBatchRuleState,
    augmented_inner_product_test,
    coordinate_norm_test,
    decide,
    inner_product_test,
    next_batch_size,
    noise_scale_rule,
    norm_test,
    optimal_batch_rule,
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

# The statistics layer never imports a framework: the root wires the Flax linen and NNX capture backends, each
# imported the first time statistics are computed after the user's code imported flax.linen, resp. flax.nnx.
stats.ghost.register_backend_provider("flax.linen", "adabatch.flax._ghost")
stats.ghost.register_backend_provider("flax.nnx", "adabatch.flax._nnx_ghost")

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
    "ActiveLRState",
    "BatchSizeTestState",
    "FitResult",
    "GradStats",
    "GradStatsNeeds",
    "LanczosResult",
    "ModelLoss",
    "NoiseScaleRuleState",
    "NoiseScaleState",
    "OptimalBatchRuleState",
    "ScaleByAdaScaleState",
    "ScaleByAdagradNormState",
    "ScaleByAdagradState",
    "ScaleByAdalomoState",
    "ScaleByBatchSizeState",
    "ScaleByBeliefState",
    "ScaleByClarsState",
    "ScaleByEveState",
    "ScaleByExtrapSGDState",
    "ScaleByMaxVAState",
    "ScaleBySampleScheduleState",
    "ScaleByTomState",
    "Spectrum",
    "TrainState",
    "TrainStep",
    "__version__",
    "active_adabelief",
    "active_adam",
    "active_lr",
    "adabelief",
    "adadagrad",
    "adadagrad_norm",
    "adagrad",
    "adagrad_norm",
    "adalomo",
    "adascale",
    "augmented_inner_product_test",
    "batch_size_factor",
    "clars",
    "coordinate_norm_test",
    "curvature",
    "curvature_matvec",
    "decide",
    "density",
    "device_grad_stats",
    "eve",
    "evew",
    "extrap_sgd",
    "extrapolate",
    "fit",
    "from_group_means",
    "ggn_vp",
    "ghost",
    "ghost_report",
    "grad_stats",
    "hessian_spectrum",
    "hvp",
    "init_train_state",
    "inner_product_test",
    "inner_products",
    "lambda_max",
    "lambda_min",
    "lanczos",
    "make_train_step",
    "maxva",
    "needs_extrapolated_grads",
    "next_batch_size",
    "noise_scale_rule",
    "norm_test",
    "operator_spectrum",
    "optimal_batch_rule",
    "optimizers",
    "orthogonality_test",
    "per_example_grads",
    "required_statistics",
    "rules",
    "scale_by_adagrad",
    "scale_by_adagrad_norm",
    "scale_by_adalomo",
    "scale_by_batch_size",
    "scale_by_belief",
    "scale_by_clars",
    "scale_by_eve",
    "scale_by_extrap_sgd",
    "scale_by_maxva",
    "scale_by_sample_schedule",
    "scale_by_slq_learner",
    "scale_by_tom",
    "scaling",
    "slq_learner",
    "stats",
    "surge_learning_rate",
    "tom",
    "trace_moment",
    "training",
]
