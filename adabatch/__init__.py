"""adabatch: adaptive batch sizes and learning rates from gradient noise, as Optax transformations.

See ``README.md`` and ``docs/`` for the maths and examples.
"""

from adabatch import data, ghost, noise_scale, stats
from adabatch.adabelief import AdaBeliefState, adabelief, scale_by_belief
from adabatch.adadagrad import adadagrad, adadagrad_norm
from adabatch.adagrad import (
    ScaleByAdagradNormState,
    ScaleByAdagradState,
    adagrad,
    adagrad_norm,
    scale_by_adagrad,
    scale_by_adagrad_norm,
)
from adabatch.ghost import ghost_report
from adabatch.microbatch import device_grad_stats, from_group_means
from adabatch.noise_scale import NoiseScaleRuleState, NoiseScaleState, noise_scale_rule
from adabatch.per_example import grad_stats, inner_products, per_example_grads
from adabatch.rules import (
    BatchSizeTestState,
    augmented_inner_product_test,
    batch_size,
    coordinate_norm_test,
    decide,
    inner_product_test,
    norm_test,
    orthogonality_test,
)
from adabatch.scaling import (
    AdaScaleState,
    ScaleByBatchSizeState,
    ScaleBySampleScheduleState,
    adascale,
    batch_size_factor,
    scale_by_batch_size,
    scale_by_sample_schedule,
    surge_learning_rate,
)
from adabatch.stats import GradStats
from adabatch.train import (
    FitResult,
    TrainState,
    TrainStep,
    fit,
    init_train_state,
    make_train_step,
    required_statistics,
)

__version__ = "0.1.0"

__all__ = [
    "AdaBeliefState",
    "AdaScaleState",
    "BatchSizeTestState",
    "FitResult",
    "GradStats",
    "NoiseScaleRuleState",
    "NoiseScaleState",
    "ScaleByAdagradNormState",
    "ScaleByAdagradState",
    "ScaleByBatchSizeState",
    "ScaleBySampleScheduleState",
    "TrainState",
    "TrainStep",
    "adabelief",
    "adadagrad",
    "adadagrad_norm",
    "adagrad",
    "adagrad_norm",
    "adascale",
    "augmented_inner_product_test",
    "batch_size",
    "batch_size_factor",
    "coordinate_norm_test",
    "data",
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
    "noise_scale",
    "noise_scale_rule",
    "norm_test",
    "orthogonality_test",
    "per_example_grads",
    "required_statistics",
    "scale_by_adagrad",
    "scale_by_adagrad_norm",
    "scale_by_batch_size",
    "scale_by_belief",
    "scale_by_sample_schedule",
    "stats",
    "surge_learning_rate",
]
