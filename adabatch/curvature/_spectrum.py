"""Spectra of curvature matrices by stochastic Lanczos quadrature (SLQ): :class:`Spectrum`, the extremal eigenvalues,
the smoothed density and the trace moments; :func:`hessian_spectrum` (Hessian or Gauss-Newton of a per-example
loss, optionally preconditioned) and :func:`operator_spectrum` (any symmetric params-shaped operator)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from adabatch._validation import (
    accumulation_dtype,
    check_choice,
    check_positive,
    check_positive_int,
    is_concrete,
)
from adabatch.curvature._hvp import ModelLoss, _split, _weights, check_vector, masked_mean
from adabatch.curvature._lanczos import LanczosResult, _lanczos_block
from adabatch.stats._batch import leading_size

__all__ = [
    "MATRICES",
    "Spectrum",
    "curvature_matvec",
    "density",
    "hessian_spectrum",
    "lambda_max",
    "lambda_min",
    "operator_spectrum",
    "quadrature",
    "trace_moment",
]

MATRICES = ("hessian", "ggn")


class Spectrum(NamedTuple):
    r"""Gauss quadrature rules of a symmetric matrix :math:`A` (``d`` × ``d``), one per probe vector.

    For a unit probe :math:`v` and the Lanczos tridiagonal :math:`T_m = U\Theta U^\top` of :math:`A` from
    :math:`v`, the nodes are the Ritz values :math:`\theta_k` and the weights :math:`\tau_k = U_{1k}^2`
    (:math:`\sum_k\tau_k = 1`): :math:`v^\top g(A) v \approx \sum_k \tau_k g(\theta_k)`, exact for polynomials of
    degree up to :math:`2m-1`. Averaged over random probes this estimates :math:`\operatorname{tr} g(A)/d`.

    The functions :func:`lambda_max`, :func:`lambda_min`, :func:`density` and :func:`trace_moment` read it; the
    same are available as ``spectrum.lambda_max``, ``spectrum.lambda_min`` (properties),
    ``spectrum.density(grid, sigma)`` and ``spectrum.trace_moment(k)``. A ``Spectrum`` is a pytree of arrays: it
    goes through ``jit``, into optimizer states and as the ``curvature`` extra argument of a transformation.

    Steps after a Lanczos breakdown (:func:`lanczos`) add nodes of weight 0 placed at :math:`\alpha_1 = v^\top A v`,
    inside :math:`[\lambda_{\min}, \lambda_{\max}]`: they change neither the quadrature nor the extremal nodes.
    """

    nodes: jax.Array  # (num_probes, num_steps) Ritz values θ_k, ascending per probe; accumulation dtype
    weights: jax.Array  # (num_probes, num_steps) quadrature weights τ_k >= 0, each row sums to 1
    dim: jax.Array  # () int32: d, the dimension of the matrix (number of parameters)

    @property
    def lambda_max(self) -> jax.Array:
        """:func:`lambda_max` of this spectrum."""
        return _lambda_max(self)

    @property
    def lambda_min(self) -> jax.Array:
        """:func:`lambda_min` of this spectrum."""
        return _lambda_min(self)

    def density(self, grid: Any, sigma: float) -> jax.Array:
        """:func:`density` of this spectrum."""
        return _density(self, grid, sigma)

    def trace_moment(self, k: int, *, per_probe: bool = False) -> jax.Array:
        """:func:`trace_moment` of this spectrum."""
        return _trace_moment(self, k, per_probe=per_probe)


def _lambda_max(spectrum: Spectrum) -> jax.Array:
    return jnp.max(spectrum.nodes)


def _lambda_min(spectrum: Spectrum) -> jax.Array:
    return jnp.min(spectrum.nodes)


def lambda_max(spectrum: Spectrum) -> jax.Array:
    r"""The largest Ritz value over all probes: an estimate of :math:`\lambda_{\max}(A)` from below (each Ritz value
    lies in :math:`[\lambda_{\min},\lambda_{\max}]`), converging fast in :math:`m` for a well separated top.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.curvature import Spectrum, lambda_max
      >>> s = Spectrum(jnp.array([[-1.0, 2.0]]), jnp.array([[0.5, 0.5]]), jnp.asarray(2))
      >>> float(lambda_max(s)), float(s.lambda_min)
      (2.0, -1.0)
    """
    return _lambda_max(spectrum)


def lambda_min(spectrum: Spectrum) -> jax.Array:
    r"""The smallest Ritz value over all probes: an estimate of :math:`\lambda_{\min}(A)` from above (negative for a
    Hessian away from a minimum)."""
    return _lambda_min(spectrum)


def _density(spectrum: Spectrum, grid: Any, sigma: float) -> jax.Array:
    check_positive("sigma", sigma)
    grid = jnp.asarray(grid, spectrum.nodes.dtype)
    z = (grid[..., None, None] - spectrum.nodes) / sigma
    kernel = jnp.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    return jnp.mean(jnp.sum(spectrum.weights * kernel, axis=-1), axis=-1)


def density(spectrum: Spectrum, grid: Any, sigma: float) -> jax.Array:
    r"""The Gaussian-smoothed spectral density on ``grid``:

    .. math:: \phi_\sigma(\lambda) = \frac{1}{n_v}\sum_{v}\sum_k \tau_k^{(v)}\,
              \frac{1}{\sigma\sqrt{2\pi}} e^{-(\lambda-\theta_k^{(v)})^2/2\sigma^2},

    a probability density (it integrates to 1 over the real line) approximating
    :math:`\frac1d\sum_i \mathcal N(\lambda;\lambda_i,\sigma^2)` for the eigenvalues :math:`\lambda_i` of the matrix.

    Args:
      spectrum: a :class:`Spectrum`.
      grid: points :math:`\lambda` (any shape).
      sigma: the kernel width :math:`\sigma>0`, in the units of the eigenvalues.

    Returns:
      :math:`\phi_\sigma` on ``grid``, with the shape of ``grid``.
    """
    return _density(spectrum, grid, sigma)


def _trace_moment(spectrum: Spectrum, k: int, *, per_probe: bool = False) -> jax.Array:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    per = jnp.sum(spectrum.weights * spectrum.nodes ** int(k), axis=-1)
    return per if per_probe else jnp.mean(per, axis=-1)


def trace_moment(spectrum: Spectrum, k: int, *, per_probe: bool = False) -> jax.Array:
    r"""The SLQ estimate of :math:`\operatorname{tr}(A^k)/d`: :math:`\frac{1}{n_v}\sum_v\sum_j \tau_j^{(v)}
    (\theta_j^{(v)})^k`.

    For :math:`k \le 2m-1` the quadrature is exact for each probe, :math:`\sum_j\tau_j\theta_j^k = v^\top A^k v`, so
    this is Hutchinson's unbiased estimator with normalised Rademacher probes; its standard error is the standard
    deviation of the ``per_probe`` values over :math:`\sqrt{n_v}`. Multiply by ``spectrum.dim`` for the trace.

    Args:
      spectrum: a :class:`Spectrum`.
      k: the power, an integer :math:`\ge 0`.
      per_probe: return one estimate per probe, shape ``(num_probes,)``, instead of their mean.

    Returns:
      The estimate (a scalar, or ``(num_probes,)``).
    """
    return _trace_moment(spectrum, k, per_probe=per_probe)


def quadrature(result: LanczosResult) -> tuple[jax.Array, jax.Array]:
    r"""Nodes (Ritz values, ascending) and weights (squared first components of the eigenvectors) of the
    tridiagonal of one :func:`lanczos` run; steps after a breakdown become nodes of weight 0 at :math:`\alpha_1`."""
    alphas = jnp.where(result.valid, result.alphas, result.alphas[0])
    m = alphas.shape[0]
    t = jnp.diag(alphas)
    if m > 1:
        off = jnp.where(result.valid[1:], result.betas, 0)
        t = t + jnp.diag(off, 1) + jnp.diag(off, -1)
    nodes, vectors = jnp.linalg.eigh(t)
    weights = jnp.square(vectors[0])
    return nodes, weights / jnp.sum(weights)


def _check_num_steps(num_steps: int, dim: int) -> None:
    check_positive_int("num_steps", num_steps)
    if num_steps > dim:
        raise ValueError(f"num_steps must be at most the number of parameters ({dim}), got {num_steps}")


def operator_spectrum(
    matvec: Callable[[Any], Any],
    params: Any,
    *,
    key: jax.Array,
    num_steps: int = 30,
    num_probes: int = 1,
    preconditioner: Any = None,
) -> Spectrum:
    r"""The SLQ :class:`Spectrum` of a symmetric operator on params-shaped vectors (any curvature matrix).

    ``num_probes`` Rademacher vectors :math:`z\in\{\pm1\}^d`, normalised (:math:`v = z/\sqrt d`), each run through
    ``num_steps`` steps of :func:`lanczos` (all probes' products in one vmapped call: memory ``num_probes ×
    num_steps × d``).

    With a ``preconditioner`` :math:`P` (a params-shaped pytree of positive entries, a diagonal matrix), the
    spectrum is that of :math:`P^{-1/2} A P^{-1/2}`, similar to :math:`P^{-1}A`: the curvature as a preconditioned
    method (e.g. Adam with :math:`P = \sqrt{\hat v}+\epsilon`) sees it, whose largest stable step is
    :math:`2/\lambda_{\max}(P^{-1}A)`.

    Args:
      matvec: :math:`v\mapsto Av`, params-shaped to params-shaped, symmetric (e.g. ``functools.partial`` of
        :func:`hvp`, or :func:`curvature_matvec`).
      params: the parameters (their structure, shapes and dtypes define the vector space).
      key: a JAX PRNG key for the probes.
      num_steps: Lanczos steps :math:`m` per probe, ``1 <= m <= d``.
      num_probes: number of probe vectors :math:`n_v\ge 1`.
      preconditioner: optional diagonal :math:`P`, a pytree with the structure and shapes of ``params``.

    Returns:
      A :class:`Spectrum` with ``(num_probes, num_steps)`` nodes and weights, computed in the parameters' dtype
      promoted to float32 at least.
    """
    flat, unravel = ravel_pytree(params)
    dim = int(flat.size)
    _check_num_steps(num_steps, dim)
    check_positive_int("num_probes", num_probes)
    dtype = accumulation_dtype(flat.dtype)

    def flat_matvec(x: jax.Array) -> jax.Array:
        return ravel_pytree(matvec(unravel(x.astype(flat.dtype))))[0].astype(dtype)

    op = flat_matvec
    if preconditioner is not None:
        preconditioner = check_vector("preconditioner", preconditioner, params)
        _check_positive_preconditioner(preconditioner)
        flat_p = ravel_pytree(preconditioner)[0].astype(dtype)
        inv_sqrt = jax.lax.rsqrt(flat_p)

        def op(x: jax.Array) -> jax.Array:
            return inv_sqrt * flat_matvec(inv_sqrt * x)

    probes = jax.random.rademacher(key, (int(num_probes), dim), dtype) / jnp.sqrt(jnp.asarray(dim, dtype))
    # One batched product for all probes (vmap of the operator), each probe's re-orthogonalisation on its own.
    block_op = (lambda x: op(x[0])[None]) if num_probes == 1 else jax.vmap(op)
    results = _lanczos_block(block_op, probes, num_steps)
    nodes, weights = jax.vmap(quadrature)(results)
    return Spectrum(nodes=nodes, weights=weights, dim=jnp.asarray(dim, jnp.int32))


def curvature_matvec(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    matrix: str = "hessian",
    mask: Any = None,
) -> Callable[[Any], Any]:
    r"""The linear map :math:`v\mapsto Av` of the Hessian (``matrix="hessian"``) or the Gauss-Newton matrix
    (``"ggn"``) of the mean per-example loss at ``params``, linearised once.

    The same products as :func:`hvp` / :func:`ggn_vp`, but the forward and backward passes at ``params`` run once
    (``jax.linearize``) and every product after that is the tangent computation only: the right form for many
    products at the same point (Lanczos). Memory: the residuals of one gradient computation.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)``; a :class:`ModelLoss` for ``matrix="ggn"``.
      params: the parameters.
      batch: the batch (``(inputs, targets)`` for ``"ggn"``).
      matrix: ``"hessian"`` or ``"ggn"``.
      mask: optional ``(b,)`` example weights, as for :func:`hvp`.

    Returns:
      A function of a params-shaped vector returning a params-shaped vector.
    """
    check_choice("matrix", matrix, MATRICES)
    b = leading_size(batch)
    weights = _weights(mask, b)
    if matrix == "hessian":

        def mean_loss(p):
            return masked_mean(loss_fn(p, batch), weights, b, "loss_fn")

        _, lin = jax.linearize(jax.grad(mean_loss), params)
        return lambda v: lin(check_vector("vector", v, params))

    if not isinstance(loss_fn, ModelLoss):
        raise ValueError(
            "loss_fn must be an adabatch.curvature.ModelLoss(model_fn, output_loss_fn) for matrix='ggn' (the "
            f"Gauss-Newton matrix needs the model's outputs); got {loss_fn!r}"
        )
    inputs, targets = _split(batch)
    outputs, jvp_fn = jax.linearize(lambda p: loss_fn.model_fn(p, inputs), params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)

    def output_loss(z):
        return masked_mean(loss_fn.output_loss_fn(z, targets), weights, b, "output_loss_fn")

    _, h_out = jax.linearize(jax.grad(output_loss), outputs)

    def ggn(v):
        return vjp_fn(h_out(jvp_fn(check_vector("vector", v, params))))[0]

    return ggn


def hessian_spectrum(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    key: jax.Array,
    num_steps: int = 30,
    num_probes: int = 1,
    matrix: str = "hessian",
    mask: Any = None,
    preconditioner: Any = None,
) -> Spectrum:
    r"""The SLQ :class:`Spectrum` of the Hessian or Gauss-Newton matrix of the mean per-example loss on a batch.

    The matrix is the batch Hessian :math:`H_B = \nabla^2 \frac1{|B|}\sum_{i\in B}\ell_i(\theta)` (``"hessian"``)
    or the Generalised Gauss-Newton matrix :math:`G_B = J^\top H_\ell J` (``"ggn"``, see :func:`ggn_vp`), the mean
    running over the examples ``mask`` keeps. Products come from :func:`curvature_matvec` (linearised once), the
    tridiagonals from :func:`lanczos` vmapped over ``num_probes`` normalised Rademacher probes; see
    :func:`operator_spectrum` for the preconditioned variant :math:`P^{-1/2}H_BP^{-1/2}`. Everything is traceable:
    jit the call (``loss_fn`` and the integers static); with the batch sharded over a mesh the products reduce
    over the devices as a gradient does.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses; for ``matrix="ggn"`` a
        :class:`ModelLoss` ``(model_fn, output_loss_fn)`` (which is also a valid ``loss_fn`` for the Hessian).
      params: the parameters (``d`` entries in all).
      batch: a pytree of arrays with a leading batch axis (``(inputs, targets)`` for ``"ggn"``).
      key: a JAX PRNG key for the probes.
      num_steps: Lanczos steps :math:`m` per probe, ``1 <= m <= d`` (tens suffice for the extremal eigenvalues).
      num_probes: probe vectors :math:`n_v\ge1` (more for the density and the traces).
      matrix: ``"hessian"`` or ``"ggn"``.
      mask: optional ``(b,)`` example weights (bool or float, as for :func:`adabatch.grad_stats`).
      preconditioner: optional diagonal :math:`P` (params-shaped, positive), e.g. Adam's
        :math:`\sqrt{\hat v}+\epsilon`: the spectrum of :math:`P^{-1/2}AP^{-1/2}`.

    Returns:
      A :class:`Spectrum` (``(num_probes, num_steps)`` nodes and weights, and ``dim = d``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adabatch.curvature import hessian_spectrum
      >>> loss = lambda w, x: 0.5 * (x @ w) ** 2          # H = mean_i x_i x_iᵀ = diag(1, 4, 9)
      >>> x = jnp.sqrt(3.0) * jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> s = hessian_spectrum(loss, jnp.zeros(3), x, key=jax.random.key(0), num_steps=3)
      >>> round(float(s.lambda_max), 4), round(float(s.lambda_min), 4), round(float(s.trace_moment(1)), 4)
      (9.0, 1.0, 4.6667)
    """
    check_choice("matrix", matrix, MATRICES)
    _check_num_steps(num_steps, int(ravel_pytree(params)[0].size))
    check_positive_int("num_probes", num_probes)
    if preconditioner is not None:
        preconditioner = check_vector("preconditioner", preconditioner, params)
        _check_positive_preconditioner(preconditioner)
    statics = dict(loss_fn=loss_fn, num_steps=int(num_steps), num_probes=int(num_probes), matrix=matrix)
    try:
        hash(loss_fn)
    except TypeError:  # an unhashable callable cannot key the compilation cache: run traced op by op
        return _hessian_spectrum(params, batch, key, mask, preconditioner, **statics)
    # Compiled once per loss_fn, sizes and shapes: repeated calls (a sweep over batches) reuse it; inside an
    # outer jit this is inlined.
    return _hessian_spectrum_jit(params, batch, key, mask, preconditioner, **statics)


def _hessian_spectrum(params, batch, key, mask, preconditioner, *, loss_fn, num_steps, num_probes, matrix):
    matvec = curvature_matvec(loss_fn, params, batch, matrix=matrix, mask=mask)
    return operator_spectrum(
        matvec, params, key=key, num_steps=num_steps, num_probes=num_probes, preconditioner=preconditioner
    )


_hessian_spectrum_jit = jax.jit(_hessian_spectrum, static_argnames=("loss_fn", "num_steps", "num_probes", "matrix"))


def _check_positive_preconditioner(preconditioner: Any) -> None:
    leaves = jax.tree_util.tree_leaves(preconditioner)
    if all(is_concrete(x) for x in leaves) and not all(
        bool(np.all(np.isfinite(x) & (np.asarray(x) > 0))) for x in leaves
    ):
        raise ValueError("preconditioner must have finite entries > 0 (a diagonal positive-definite matrix)")
