"""Layer 1 — statistics: :class:`GradStats`, the estimators built on it, and the producers that compute it.

What lives here:

* :class:`GradStats`, additive sufficient statistics of a batch of per-example gradients, :func:`merge`, and the
  estimators (:func:`trace_covariance`, :func:`unbiased_grad_sq_norm`, :func:`b_simple`,
  :func:`coordinate_variance`, :func:`inner_product_variance`, :func:`orthogonal_variance`,
  :func:`leaf_norm_ratio`);
* the producers: :func:`grad_stats` (``method="vmap"``, ``"ghost"``, ``"auto"``, ``"microbatch"``),
  :func:`per_example_grads`, :func:`inner_products` (one forward-mode pass), the ghost layer tags of
  :mod:`adabatch.stats.ghost`, and :func:`from_group_means` / :func:`device_grad_stats` (group means);
* the gradient noise scale: estimators (:func:`estimate_from_stats`, :func:`two_batch_estimate`, EMA smoothing,
  Adam preconditioning) and the tracking transformation :func:`noise_scale`;
* how transformations receive statistics: :func:`read_statistics` (``grad_stats=`` with the mean gradient, or
  per-example ``updates`` declared by ``per_example=True``) and the declaration :class:`GradStatsNeeds` of the
  optional fields a transformation reads.

May import: jax, optax, numpy and ``adabatch._validation`` / ``adabatch._tree`` only (the lowest layer).
"""

from adabatch.stats import ghost
from adabatch.stats._ghost import ghost_report
from adabatch.stats._grad_stats import (
    GradStats,
    b_simple,
    coordinate_variance,
    from_per_example,
    inner_product_variance,
    leaf_norm_ratio,
    mean_sq_norm,
    merge,
    orthogonal_variance,
    trace_covariance,
    unbiased_grad_sq_norm,
)
from adabatch.stats._inputs import GradStatsNeeds, check_grad_stats, declared_needs, read_statistics
from adabatch.stats._microbatch import device_grad_stats, from_group_means, microbatch_grad_stats
from adabatch.stats._noise_scale import (
    DEFAULT_MAX_NOISE_SCALE,
    DEFAULT_MIN_NOISE_SCALE,
    NoiseScaleEstimate,
    NoiseScaleState,
    adam_preconditioner,
    bias_corrected_ema,
    clamp_noise_scale,
    estimate_from_stats,
    noise_scale,
    precondition,
    two_batch_estimate,
)
from adabatch.stats._per_example import METHODS, grad_stats, inner_products, per_example_grads

__all__ = [
    "DEFAULT_MAX_NOISE_SCALE",
    "DEFAULT_MIN_NOISE_SCALE",
    "METHODS",
    "GradStats",
    "GradStatsNeeds",
    "NoiseScaleEstimate",
    "NoiseScaleState",
    "adam_preconditioner",
    "b_simple",
    "bias_corrected_ema",
    "check_grad_stats",
    "clamp_noise_scale",
    "coordinate_variance",
    "declared_needs",
    "device_grad_stats",
    "estimate_from_stats",
    "from_group_means",
    "from_per_example",
    "ghost",
    "ghost_report",
    "grad_stats",
    "inner_product_variance",
    "inner_products",
    "leaf_norm_ratio",
    "mean_sq_norm",
    "merge",
    "microbatch_grad_stats",
    "noise_scale",
    "orthogonal_variance",
    "per_example_grads",
    "precondition",
    "read_statistics",
    "trace_covariance",
    "two_batch_estimate",
    "unbiased_grad_sq_norm",
]
