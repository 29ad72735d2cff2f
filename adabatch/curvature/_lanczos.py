"""The Lanczos tridiagonalisation of a symmetric linear operator, with full re-orthogonalisation, as one
``lax.fori_loop`` over a preallocated basis (jit- and vmap-compatible)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from adabatch._validation import accumulation_dtype, check_positive, check_positive_int

__all__ = ["LanczosResult", "lanczos", "tridiagonal"]

_HIGHEST = lax.Precision.HIGHEST
_DGKS = 1 / np.sqrt(2)  # second Gram-Schmidt pass when a pass keeps less than this fraction of the norm


class LanczosResult(NamedTuple):
    r"""The tridiagonal :math:`T_m = Q^\top A Q` of :func:`lanczos` (``m = num_steps``).

    After a breakdown at step :math:`k` (an invariant Krylov subspace: :math:`\beta_k\approx 0`) the basis stops
    growing: ``alphas[k:]`` and ``betas[k-1:]`` are 0 and ``valid[k:]`` is False.
    """

    alphas: jax.Array  # (m,) diagonal α_1..α_m of T_m, accumulation dtype (float32 at least)
    betas: jax.Array  # (m - 1,) off-diagonal β_1..β_{m-1} of T_m, >= 0
    valid: jax.Array  # (m,) bool: step j produced a basis vector (False after a breakdown)


def lanczos(
    matvec: Callable[[Any], Any],
    v0: Any,
    num_steps: int,
    *,
    breakdown_tol: float | None = None,
) -> LanczosResult:
    r"""``num_steps`` Lanczos steps on the symmetric operator ``matvec`` from ``v0``: the tridiagonal :math:`T_m`.

    With :math:`q_1 = v_0/\lVert v_0\rVert` and :math:`Q_j = [q_1,\dots,q_j]`, step :math:`j` computes

    .. math:: w = A q_j,\quad \alpha_j = q_j^\top w,\quad w \leftarrow w - \alpha_j q_j - \beta_{j-1} q_{j-1},\quad
              w \leftarrow w - Q_j Q_j^\top w,\quad \beta_j = \lVert w\rVert,\quad q_{j+1} = w/\beta_j,

    so :math:`T_m = Q_m^\top A Q_m` is tridiagonal with diagonal :math:`\alpha` and off-diagonal :math:`\beta`.
    Projecting :math:`w` against the whole basis after the three-term recurrence (classical Gram-Schmidt, with a
    second pass whenever a pass removes more than :math:`1-1/\sqrt2` of the norm, the Daniel-Gragg-Kaufman-Stewart
    criterion) keeps :math:`Q_m` orthonormal to working precision, so no spurious copies of converged Ritz values
    appear, in float32 too. The basis is preallocated (``num_steps`` × ``dim``, in the accumulation dtype) and the
    loop is a
    ``lax.fori_loop``: the function can be jitted and vmapped (over ``v0``). :func:`operator_spectrum` runs several
    probes with one batched product per step, which is faster than a ``vmap`` of this function.

    **Breakdown.** When :math:`\beta_j \le` ``breakdown_tol`` · :math:`\max_{i\le j}\lVert A q_i\rVert` the Krylov
    space is invariant (a rank-deficient or zero operator, or a ``v0`` in few eigenspaces) and :math:`T_j` already
    holds the exact Ritz values and Gauss quadrature of ``v0``. The basis then stops growing: the remaining steps
    have ``alphas``/``betas`` 0 and ``valid`` False (no division by :math:`\beta\approx 0`, no NaN). A zero operator
    gives ``alphas == 0`` with only the first step valid.

    Args:
      matvec: :math:`v \mapsto Av` for a symmetric :math:`A`, on vectors shaped like ``v0``.
      v0: the start vector, a flat array or any pytree of arrays (flattened with
        ``jax.flatten_util.ravel_pytree``); it need not be normalised, and must not be zero.
      num_steps: :math:`m\ge 1`, at most the dimension of ``v0``.
      breakdown_tol: relative threshold for a breakdown; default ``100 * eps`` of the accumulation dtype
        (about 1e-5 in float32, 2e-14 in float64).

    Returns:
      A :class:`LanczosResult` ``(alphas, betas, valid)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.curvature import lanczos, tridiagonal
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> res = lanczos(lambda v: a @ v, jnp.ones(3), 3)
      >>> [round(float(x), 4) for x in jnp.linalg.eigvalsh(tridiagonal(res))]
      [1.0, 2.0, 3.0]
    """
    flat0, unravel = ravel_pytree(v0)
    dim = int(flat0.size)
    check_positive_int("num_steps", num_steps)
    if num_steps > dim:
        raise ValueError(f"num_steps must be at most the dimension of v0 ({dim}), got {num_steps}")
    if breakdown_tol is not None:
        check_positive("breakdown_tol", breakdown_tol)
    dtype = accumulation_dtype(flat0.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"v0 must have a floating dtype, got {flat0.dtype}")

    def flat_matvec(x: jax.Array) -> jax.Array:
        out, _ = ravel_pytree(matvec(unravel(x[0].astype(flat0.dtype))))
        if out.shape != (dim,):
            raise ValueError(f"matvec must return a vector shaped like v0 ({dim} entries), got {out.shape}")
        return out.astype(dtype)[None]

    result = _lanczos_block(flat_matvec, flat0[None].astype(dtype), num_steps, breakdown_tol=breakdown_tol)
    return jax.tree_util.tree_map(lambda x: x[0], result)


def _lanczos_block(
    matvec: Callable[[jax.Array], jax.Array],
    starts: jax.Array,
    num_steps: int,
    *,
    breakdown_tol: float | None = None,
) -> LanczosResult:
    r""":func:`lanczos` from ``k`` start vectors at once: ``k`` independent runs whose products share one call.

    ``matvec`` maps a ``(k, d)`` array of vectors to their ``(k, d)`` products (e.g. ``jax.vmap`` of a
    Hessian-vector product, one batched pass instead of ``k``); ``starts`` is ``(k, d)`` in a floating dtype.
    The re-orthogonalisation of each run is written out per run rather than vmapped, so that it stays two
    matrix-vector products against its own ``(num_steps, d)`` basis (XLA's CPU backend runs a batched ``(k, m,
    d)`` product several times slower than ``k`` plain ones) and the second pass can be skipped when it is not
    needed (``lax.cond``). Returns a :class:`LanczosResult` with a leading axis of size ``k`` on every field.
    """
    k, dim = starts.shape
    m = int(num_steps)
    if not 1 <= m <= dim:
        raise ValueError(f"num_steps must be between 1 and the dimension ({dim}), got {num_steps}")
    dtype = accumulation_dtype(starts.dtype)
    tol = 100 * float(np.finfo(dtype).eps) if breakdown_tol is None else float(breakdown_tol)
    q0 = starts.astype(dtype)
    q0 = q0 / jnp.linalg.norm(q0, axis=-1, keepdims=True)

    def project_out(basis: jax.Array, w: jax.Array) -> jax.Array:
        # Rows of the basis not yet filled are zero and contribute nothing.
        return w - jnp.dot(jnp.dot(basis, w, precision=_HIGHEST), basis, precision=_HIGHEST)

    def reorthogonalise(basis: jax.Array, w: jax.Array) -> jax.Array:
        # One pass of classical Gram-Schmidt against the basis; a second one only when the first removed most of w
        # (Daniel-Gragg-Kaufman-Stewart criterion: cancellation may have left a component along the basis). After
        # the three-term recurrence w is nearly orthogonal already, so the second pass is rare.
        before = jnp.linalg.norm(w)
        w = project_out(basis, w)
        return lax.cond(jnp.linalg.norm(w) < _DGKS * before, project_out, lambda b, x: x, basis, w)

    def step(j, carry):
        bases, q, q_prev, beta_prev, alphas, betas, valid, active, scale = carry
        bases = tuple(basis.at[j].set(q[i]) for i, basis in enumerate(bases))
        w = matvec(q).astype(dtype)
        scale = jnp.maximum(scale, jnp.linalg.norm(w, axis=-1))
        alpha = jnp.sum(q * w, axis=-1)
        w = w - alpha[:, None] * q - beta_prev[:, None] * q_prev  # the three-term recurrence
        w = jnp.stack([reorthogonalise(basis, w[i]) for i, basis in enumerate(bases)])
        beta = jnp.linalg.norm(w, axis=-1)
        grows = active & (beta > tol * scale)
        q_next = jnp.where(grows[:, None], w / jnp.where(grows, beta, 1)[:, None], 0)
        beta = jnp.where(grows, beta, 0)
        alphas = alphas.at[:, j].set(jnp.where(active, alpha, 0))
        betas = betas.at[:, j].set(beta)
        valid = valid.at[:, j].set(active)
        return bases, q_next, q, beta, alphas, betas, valid, grows, scale

    init = (
        tuple(jnp.zeros((m, dim), dtype) for _ in range(k)),
        q0,
        jnp.zeros((k, dim), dtype),
        jnp.zeros((k,), dtype),
        jnp.zeros((k, m), dtype),
        jnp.zeros((k, m), dtype),  # β_m (the residual of the last step) is dropped below
        jnp.zeros((k, m), bool),
        jnp.ones((k,), bool),
        jnp.zeros((k,), dtype),
    )
    _, _, _, _, alphas, betas, valid, _, _ = lax.fori_loop(0, m, step, init)
    return LanczosResult(alphas=alphas, betas=betas[:, : m - 1], valid=valid)


def tridiagonal(result: LanczosResult) -> jax.Array:
    r"""The dense ``(m, m)`` symmetric tridiagonal :math:`T_m` of a :class:`LanczosResult` (batched: leading axes of
    its fields are kept)."""
    alphas, betas = result.alphas, result.betas
    eye = jnp.eye(alphas.shape[-1], dtype=alphas.dtype)
    t = alphas[..., :, None] * eye
    upper = jnp.eye(alphas.shape[-1], k=1, dtype=alphas.dtype)
    lower = jnp.eye(alphas.shape[-1], k=-1, dtype=alphas.dtype)
    padded = jnp.concatenate([betas, jnp.zeros(betas.shape[:-1] + (1,), betas.dtype)], axis=-1)
    t = t + padded[..., :, None] * upper + padded[..., None, :] * lower
    return t
