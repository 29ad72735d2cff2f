"""Layer 3 — learning rate as a function of batch size.

What lives here: :func:`scale_by_batch_size` (linear, square-root and surge laws read from the ``batch_size``
extra argument), :func:`surge_learning_rate` and :func:`batch_size_factor` (the laws themselves),
:func:`adascale` (the AdaScale gain from per-example statistics, with its scale-invariant progress), and
:func:`scale_by_sample_schedule` (a schedule keyed on examples seen). The gradient-noise-scale estimators these
read live in :mod:`adabatch.stats` (a batch-size rule needs them too, and rules sit below this layer).

May import: :mod:`adabatch.rules`, :mod:`adabatch.stats` and the base modules.
"""

from adabatch import _deprecation
from adabatch.scaling._adascale import ScaleByAdaScaleState, adascale
from adabatch.scaling._batch_size_scaling import (
    FORMS,
    RULES,
    ScaleByBatchSizeState,
    ScaleBySampleScheduleState,
    batch_size_factor,
    scale_by_batch_size,
    scale_by_sample_schedule,
    surge_learning_rate,
)

__all__ = [
    "FORMS",
    "RULES",
    "ScaleByAdaScaleState",
    "ScaleByBatchSizeState",
    "ScaleBySampleScheduleState",
    "adascale",
    "batch_size_factor",
    "scale_by_batch_size",
    "scale_by_sample_schedule",
    "surge_learning_rate",
]

__getattr__ = _deprecation.deprecated_getattr(__name__, {"AdaScaleState": ("adabatch.scaling", "ScaleByAdaScaleState")})
