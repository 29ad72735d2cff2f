"""Layer 2 — batch-size rules: transformations that read per-example statistics and decide the next batch size.

What lives here: the AdAdaGrad tests (:func:`norm_test`, :func:`inner_product_test`, :func:`orthogonality_test`,
:func:`augmented_inner_product_test`, :func:`coordinate_norm_test`) and their one decision function :func:`decide`;
the noise-scale rule :func:`noise_scale_rule`; the learned optimal batch size of SGD :func:`optimal_batch_rule`
(with its step size; :func:`optimal_batch_size`, :func:`sgd_step_size`); and what every rule shares — argument
checks, rounding, and reading the decision with :func:`next_batch_size`. Every rule's state holds its decision in a
field ``next_batch_size`` and declares the statistics it reads in a field ``grad_stats_needs``
(:class:`adabatch.stats.GradStatsNeeds`).

May import: :mod:`adabatch.stats` and the base modules.
"""

from adabatch import _deprecation
from adabatch.rules._batch_size_tests import (
    AGGREGATIONS,
    TESTS,
    BatchSizeTestState,
    augmented_inner_product_test,
    coordinate_norm_test,
    decide,
    inner_product_test,
    norm_test,
    orthogonality_test,
)
from adabatch.rules._common import (
    DECISION_FIELD,
    DEFAULT_INIT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    check_rule_arguments,
    has_decision,
    next_batch_size,
    round_batch_size,
)
from adabatch.rules._noise_scale_rule import NoiseScaleRuleState, noise_scale_rule
from adabatch.rules._optimal_batch import (
    ESTIMATORS,
    OptimalBatchRuleState,
    optimal_batch_rule,
    optimal_batch_size,
    sgd_step_size,
)

__all__ = [
    "AGGREGATIONS",
    "DECISION_FIELD",
    "DEFAULT_INIT_BATCH_SIZE",
    "DEFAULT_MAX_BATCH_SIZE",
    "ESTIMATORS",
    "TESTS",
    "BatchSizeTestState",
    "NoiseScaleRuleState",
    "OptimalBatchRuleState",
    "augmented_inner_product_test",
    "check_rule_arguments",
    "coordinate_norm_test",
    "decide",
    "has_decision",
    "inner_product_test",
    "next_batch_size",
    "noise_scale_rule",
    "norm_test",
    "optimal_batch_rule",
    "optimal_batch_size",
    "orthogonality_test",
    "round_batch_size",
    "sgd_step_size",
]

__getattr__ = _deprecation.deprecated_getattr(__name__, {"batch_size": ("adabatch.rules", "next_batch_size")})
