"""Plain NumPy (float64) transcriptions of the papers' equations, the references the tests compare against.

Nothing here imports adabatch: each function is written from the equations in ``algorithms.md``, with loops and
explicit per-example vectors rather than the library's algebraic shortcuts.
"""

from __future__ import annotations

import math

import numpy as np


def flatten_per_example(per_example: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-example leaves ``(b, *shape)`` into one ``(b, d)`` float64 matrix (the whole vector)."""
    b = per_example[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(b, -1) for x in per_example], axis=1)


def estimators(G: np.ndarray) -> dict[str, object]:
    """Every estimator of ``algorithms.md`` §0, by brute force from the ``(b, d)`` per-example gradients."""
    b = G.shape[0]
    gbar = G.mean(axis=0)
    g2 = float(gbar @ gbar)
    coord_var = G.var(axis=0, ddof=1)  # s²_j, NumPy's two-pass variance
    trace = float(coord_var.sum())
    a = G @ gbar  # a_i = <g_i, ḡ>
    var_a = float(np.var(a, ddof=1))
    residual = G - np.outer(a / g2, gbar)  # o_i = g_i − (a_i/‖ḡ‖²) ḡ
    v_orth = float(np.sum(residual * residual) / (b - 1))
    unbiased = g2 - trace / b
    return {
        "count": b,
        "mean": gbar,
        "sq_norm_sum": float(np.sum(G * G)),
        "sq_sum": np.sum(G * G, axis=0),
        "inner_sq_sum": float(np.sum(a * a)),
        "mean_sq_norm": g2,
        "trace_covariance": trace,
        "unbiased_grad_sq_norm": unbiased,
        "b_simple": trace / unbiased if unbiased > 0 else math.inf,
        "coordinate_variance": coord_var,
        "inner_product_variance": var_a,
        "orthogonal_variance": v_orth,
    }


def required_batch(test: str, G: np.ndarray, *, eta=0.1, theta=0.1, nu=0.1, aggregation="mean", guard=1e-3):
    """b* of ``algorithms.md`` §1.2 (practical versions), from brute-force estimators."""
    e = estimators(G)
    g2 = e["mean_sq_norm"]
    if test == "norm":
        return e["trace_covariance"] / (eta**2 * g2)
    if test == "inner_product":
        return e["inner_product_variance"] / (theta**2 * g2**2)
    if test == "orthogonality":
        return e["orthogonal_variance"] / (nu**2 * g2)
    if test == "augmented_inner_product":
        return max(e["inner_product_variance"] / (theta**2 * g2**2), e["orthogonal_variance"] / (nu**2 * g2))
    if test == "coordinate_norm":
        gbar2 = e["mean"] ** 2
        ratios = [
            s2 / (eta**2 * m2)
            for s2, m2 in zip(e["coordinate_variance"], gbar2, strict=True)
            if m2 > guard * gbar2.mean() and m2 > 0
        ]
        return {"max": max(ratios), "mean": sum(ratios) / len(ratios)}[aggregation]
    raise ValueError(test)


def next_batch_size(required: float, current: int, b: int, max_batch_size: int, granularity: int = 1) -> int:
    """b_{k+1} = min(B_max, roundup_G(max(b_k, b, ⌈b*⌉)))."""
    proposed = max(current, b, math.ceil(min(required, max_batch_size)))
    proposed = -(-proposed // granularity) * granularity
    return min(proposed, max_batch_size)


def adagrad(grads: list[np.ndarray], lr: float, v0: float = 0.0, eps: float = 1e-10) -> list[np.ndarray]:
    """Coordinate-wise AdaGrad updates Δθ_k = −α ḡ_k/(√v_k + ε), v_k = v_{k−1} + ḡ_k² (one vector per step)."""
    v = np.full_like(np.asarray(grads[0], np.float64), v0)
    out = []
    for g in grads:
        g = np.asarray(g, np.float64)
        v = v + g * g
        out.append(-lr * g / (np.sqrt(v) + eps))
    return out


def adagrad_norm(grads: list[np.ndarray], lr: float, v0: float = 1e-2, eps: float = 1e-10) -> list[np.ndarray]:
    """AdaGrad-Norm updates Δθ_k = −α ḡ_k/(√v_k + ε), v_k = v_{k−1} + ‖ḡ_k‖² (scalar v)."""
    v = v0
    out = []
    for g in grads:
        g = np.asarray(g, np.float64)
        v = v + float(np.sum(g * g))
        out.append(-lr * g / (math.sqrt(v) + eps))
    return out
