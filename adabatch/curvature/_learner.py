r"""The SLQ learning-rate and momentum learner: heavy-ball momentum whose step size and momentum come from the
batch Hessian's extremal eigenvalues, estimated during training by stochastic Lanczos quadrature.

Granziol, Zohren and Roberts (JMLR 2022) propose setting the learning rate and momentum *on the fly* from the
spectrum of the batch Hessian. How their learner maps eigenvalues to hyperparameters is not published with code, so
adabatch takes the classical map for the method it drives (heavy-ball momentum) and names it; see
:func:`curvature_hyperparams` for both rules offered and why.

The protocol, as for a batch-size rule reading :class:`~adabatch.GradStats`:

1. the state :class:`ScaleBySLQLearnerState` *declares* what spectrum it needs (its static field
   ``curvature_request``, a :class:`CurvatureRequest`: every how many updates, how many Lanczos steps and probes,
   Hessian or Gauss-Newton) and whether the *coming* update absorbs one (``due``, an array);
2. the caller computes a :class:`~adabatch.curvature.Spectrum` of the current batch when ``due`` is true;
3. the caller passes it: ``tx.update(grads, state, params, curvature=spectrum)``. Without ``curvature=`` (or when
   not ``due``) the update keeps the current learning rate and momentum.

:func:`adabatch.make_train_step` (and so :func:`adabatch.fit` and ``adabatch train --optimizer slq_learner``) does
steps 2 and 3 inside the jitted step: the spectrum of the first micro-batch, under ``lax.cond`` so the Lanczos
iterations run only on the steps that need them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabatch._tree import find_state
from adabatch._validation import (
    check_choice,
    check_floating_tree,
    check_positive,
    check_positive_int,
    check_state_dtype,
    check_unit_interval,
    is_concrete,
    state_leaf_dtype,
    tree_accumulation_dtype,
)
from adabatch.curvature._spectrum import MATRICES, Spectrum, hessian_spectrum, lambda_max, lambda_min

__all__ = [
    "LEARNER_RULES",
    "CurvatureRequest",
    "ScaleBySLQLearnerState",
    "curvature_due",
    "curvature_hyperparams",
    "declared_curvature",
    "requested_spectrum",
    "scale_by_slq_learner",
    "slq_learner",
]

LEARNER_RULES = ("heavy_ball", "stability")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CurvatureRequest:
    """The spectrum a curvature learner reads (static: no array leaves, so it survives ``jit``, ``optax.chain``,
    ``optax.inject_hyperparams`` and checkpoints unchanged).

    Attributes:
      interval: estimate every ``interval`` updates (the first update included).
      num_steps: Lanczos steps per probe.
      num_probes: probe vectors.
      matrix: ``"hessian"`` or ``"ggn"`` (:func:`adabatch.curvature.hessian_spectrum`).
    """

    interval: int = 10
    num_steps: int = 20
    num_probes: int = 1
    matrix: str = "hessian"


class ScaleBySLQLearnerState(NamedTuple):
    """State of :func:`scale_by_slq_learner`."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) int32[]: updates so far
    due: jax.Array  # bool[]: the coming update absorbs a spectrum (count % interval == 0)
    learning_rate: jax.Array  # float[]: the step size α of the coming update
    momentum: jax.Array  # float[]: the momentum ρ of the coming update
    lambda_max: jax.Array  # float[]: the smoothed, debiased λ_max that α and ρ come from (0 before the first)
    lambda_min: jax.Array  # float[]: the smoothed, debiased clipped λ_min (μ) that α and ρ come from
    ema_lambda_max: jax.Array  # float[]: EMA (not debiased) of the accepted λ_max estimates
    ema_lambda_min: jax.Array  # float[]: EMA (not debiased) of the accepted, clipped λ_min estimates (μ)
    estimates: jax.Array  # int32[]: spectra accepted
    rejected: jax.Array  # int32[]: spectra refused (λ_max not finite or not > 0; λ_min not finite)
    trace: optax.Updates  # params-shaped momentum buffer v
    curvature_request: CurvatureRequest  # static declaration (read by the training step)


def curvature_hyperparams(
    lam_max: Any,
    lam_min: Any,
    *,
    rule: str = "heavy_ball",
    safety: float = 0.25,
    max_condition: float = 1e3,
    max_momentum: float = 0.9,
) -> tuple[jax.Array, jax.Array]:
    r"""Learning rate :math:`\alpha` and momentum :math:`\rho` from the extremal eigenvalues of a Hessian.

    The quadratic model :math:`\frac12\theta^\top H\theta` has eigenvalues in :math:`[\mu, L]`. Away from a minimum
    a network's Hessian has negative or near-zero eigenvalues, where no step size is optimal, so :math:`\lambda_\min`
    is clipped to a positive floor set by a largest condition number :math:`\kappa_{\max}`:

    .. math::

        L = \lambda_{\max},\quad \mu = \min\!\big(\max(\lambda_{\min}, L/\kappa_{\max}),\ L\big),\quad
        \kappa = L/\mu,\quad
        \rho = \min\!\Big(\Big(\frac{\sqrt\kappa-1}{\sqrt\kappa+1}\Big)^2,\ \rho_{\max}\Big).

    ``"heavy_ball"`` (the default) is Polyak's optimum for heavy-ball momentum on that quadratic,
    :math:`\alpha^\star = 4/(\sqrt L+\sqrt\mu)^2` with the :math:`\rho` above (its contraction factor
    :math:`\sqrt\rho` per step is the best any constant-step first-order method achieves on the quadratic), kept
    inside the stability region of the possibly capped momentum, :math:`\alpha L < 2(1+\rho)`:

    .. math:: \alpha = s\cdot\min\!\Big(\frac{4}{(\sqrt L+\sqrt\mu)^2},\ \frac{2(1+\rho)}{L}\Big).

    ``"stability"`` is the step-size bound of plain gradient descent, :math:`\alpha = s\cdot 2/L`
    (:math:`s = 1` is the edge of stability :math:`2/\lambda_{\max}` of Granziol et al.'s argument), with the
    same momentum; it ignores :math:`\mu` in the step size, so it is the more cautious rule when the clipped
    :math:`\mu` is unreliable. With :math:`\kappa\to\infty` both give :math:`\rho\to\rho_{\max}` and differ in
    :math:`\alpha L` only (:math:`\to 4s` against :math:`2s`).

    Why :math:`s < 1` by default: the estimate of :math:`L` comes from one batch and a few Lanczos steps (Ritz
    values approach :math:`\lambda_{\max}` from below), and :math:`\alpha L` near :math:`2(1+\rho)` sits on the
    stability boundary.

    Args:
      lam_max: :math:`\lambda_{\max}` estimate (> 0 for a meaningful result; callers reject the others).
      lam_min: :math:`\lambda_{\min}` estimate (any sign).
      rule: ``"heavy_ball"`` or ``"stability"``.
      safety: the factor :math:`s > 0`.
      max_condition: :math:`\kappa_{\max} \ge 1`.
      max_momentum: :math:`\rho_{\max}` in [0, 1).

    Returns:
      ``(alpha, rho)`` as arrays of the promoted dtype of the inputs (at least float32).

    Example:
      >>> from adabatch.curvature import curvature_hyperparams
      >>> alpha, rho = curvature_hyperparams(4.0, 1.0, safety=1.0)  # κ = 4: α = 4/(2+1)², ρ = (1/3)²
      >>> round(float(alpha), 6), round(float(rho), 6)
      (0.444444, 0.111111)
    """
    check_choice("rule", rule, LEARNER_RULES)
    check_positive("safety", safety)
    _check_condition(max_condition)
    check_unit_interval("max_momentum", max_momentum)
    dtype = jnp.promote_types(jnp.result_type(lam_max, lam_min), jnp.float32)
    big = jnp.asarray(lam_max, dtype)
    small = _clipped_min(big, jnp.asarray(lam_min, dtype), max_condition)
    root = jnp.sqrt(jnp.where(small > 0, big / jnp.where(small > 0, small, 1), 1))  # √κ, 1 when degenerate
    rho = jnp.minimum(jnp.square((root - 1) / (root + 1)), max_momentum)
    positive = big > 0
    safe_big = jnp.where(positive, big, 1)
    if rule == "heavy_ball":
        optimum = 4 / jnp.square(jnp.sqrt(safe_big) + jnp.sqrt(jnp.maximum(small, 0)))
        alpha = safety * jnp.minimum(optimum, 2 * (1 + rho) / safe_big)
    else:
        alpha = safety * 2 / safe_big
    return jnp.where(positive, alpha, 0).astype(dtype), rho.astype(dtype)


def _clipped_min(lam_max: jax.Array, lam_min: jax.Array, max_condition: Any) -> jax.Array:
    r""":math:`\mu = \min(\max(\lambda_{\min}, \lambda_{\max}/\kappa_{\max}), \lambda_{\max})`: the positive floor
    of the smallest eigenvalue (the one place it is formed: the map and the learner's smoothing both use it)."""
    return jnp.minimum(jnp.maximum(lam_min, lam_max / max_condition), lam_max)


def _check_condition(max_condition: Any) -> None:
    check_positive("max_condition", max_condition)
    if is_concrete(max_condition) and float(max_condition) < 1:
        raise ValueError(f"max_condition must be >= 1 (a condition number), got {max_condition!r}")


def scale_by_slq_learner(
    *,
    interval: int = 10,
    num_steps: int = 20,
    num_probes: int = 1,
    matrix: str = "hessian",
    rule: str = "heavy_ball",
    safety: float = 0.25,
    max_condition: float = 1e3,
    max_momentum: float = 0.9,
    smoothing: float = 0.9,
    init_learning_rate: float = 0.0,
    init_momentum: float = 0.0,
    max_learning_rate: float | None = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Heavy-ball momentum scaled by a step size and momentum learned from SLQ spectra (not negated).

    On an update that absorbs a spectrum (``due``, every ``interval`` updates from the first) with
    :math:`\hat L = \lambda_{\max}` and :math:`\hat\lambda = \lambda_{\min}` of the
    :class:`~adabatch.curvature.Spectrum` passed as ``curvature=``, and :math:`\hat\mu` the clipped
    :math:`\hat\lambda` of :func:`curvature_hyperparams`, after :math:`k` accepted estimates:

    .. math::

        \bar L_k = \beta\bar L_{k-1} + (1-\beta)\hat L,\quad \bar\mu_k = \beta\bar\mu_{k-1} + (1-\beta)\hat\mu,
        \quad (\alpha, \rho) = \texttt{curvature\_hyperparams}\Big(\frac{\bar L_k}{1-\beta^k},
        \frac{\bar\mu_k}{1-\beta^k}\Big),

    (:math:`\alpha` capped at ``max_learning_rate``); a spectrum with a non-finite or non-positive
    :math:`\hat L` (or a non-finite :math:`\hat\lambda`) is refused: :math:`\alpha,\rho` stay and ``rejected``
    counts it. Every update then steps heavy-ball momentum,

    .. math:: v_t = \rho\, v_{t-1} + g_t,\qquad d_t = \alpha\, v_t,

    and returns :math:`d_t` (the step is :math:`\theta_{t+1} = \theta_t - d_t`: :func:`slq_learner`). Before the
    first accepted estimate :math:`\alpha` = ``init_learning_rate`` (0: no step) and :math:`\rho` =
    ``init_momentum``.

    Args:
      interval: absorb a spectrum every ``interval`` updates (>= 1); the training step computes one only then.
      num_steps, num_probes, matrix: the spectrum the training step computes (:class:`CurvatureRequest`).
      rule, safety, max_condition, max_momentum: the map of :func:`curvature_hyperparams`.
      smoothing: :math:`\beta` in [0, 1) of the debiased moving averages (0: the latest estimate alone).
      init_learning_rate: :math:`\alpha` before the first accepted estimate (>= 0).
      init_momentum: :math:`\rho` before the first accepted estimate, in [0, 1).
      max_learning_rate: optional cap on :math:`\alpha` (> 0).
      state_dtype: dtype of the momentum buffer and scalars; default each parameter's dtype promoted to at least
        float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`ScaleBySLQLearnerState`; its ``update`` reads
      the extra argument ``curvature`` (a :class:`~adabatch.curvature.Spectrum`, or None).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adabatch.curvature import hessian_spectrum, scale_by_slq_learner
      >>> loss = lambda w, x: 0.5 * (x @ w) ** 2            # H = diag(1, 4, 9)
      >>> x = jnp.sqrt(3.0) * jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> w = jnp.ones(3)
      >>> tx = scale_by_slq_learner(num_steps=3, safety=1.0, smoothing=0.0)
      >>> state = tx.init(w)
      >>> spectrum = hessian_spectrum(loss, w, x, key=jax.random.key(0), num_steps=3)
      >>> _, state = tx.update(jax.grad(lambda v: loss(v, x).mean())(w), state, w, curvature=spectrum)
      >>> round(float(state.learning_rate), 4), round(float(state.momentum), 4)  # 4/(3+1)², (2/4)²
      (0.25, 0.25)

    References:
      Granziol, Zohren, Roberts, "Learning Rates as a Function of Batch Size: A Random Matrix Theory Approach to
      Neural Network Training", JMLR 2022, https://arxiv.org/abs/2006.09092 (the learner).
      Polyak, "Some methods of speeding up the convergence of iteration methods", 1964 (heavy-ball optimum).
    """
    check_positive_int("interval", interval)
    check_positive_int("num_steps", num_steps)
    check_positive_int("num_probes", num_probes)
    check_choice("matrix", matrix, MATRICES)
    check_unit_interval("smoothing", smoothing)
    check_positive("init_learning_rate", init_learning_rate, allow_zero=True)
    check_unit_interval("init_momentum", init_momentum)
    if max_learning_rate is not None:
        check_positive("max_learning_rate", max_learning_rate)
    check_state_dtype(state_dtype)
    hyper: dict[str, Any] = dict(rule=rule, safety=safety, max_condition=max_condition, max_momentum=max_momentum)
    curvature_hyperparams(1.0, 1.0, **hyper)  # validates the map's arguments now, naming them
    request = CurvatureRequest(int(interval), int(num_steps), int(num_probes), matrix)

    def init_fn(params: optax.Params) -> ScaleBySLQLearnerState:
        check_floating_tree("params", params)
        scalar = jnp.dtype(state_dtype) if state_dtype is not None else tree_accumulation_dtype(params)
        zero = jnp.zeros([], scalar)
        return ScaleBySLQLearnerState(
            count=jnp.zeros([], jnp.int32),
            due=jnp.asarray(True),
            learning_rate=jnp.asarray(init_learning_rate, scalar),
            momentum=jnp.asarray(init_momentum, scalar),
            lambda_max=zero,
            lambda_min=zero,
            ema_lambda_max=zero,
            ema_lambda_min=zero,
            estimates=jnp.zeros([], jnp.int32),
            rejected=jnp.zeros([], jnp.int32),
            trace=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_leaf_dtype(p, state_dtype)), params),
            curvature_request=request,
        )

    def absorb(state: ScaleBySLQLearnerState, spectrum: Spectrum) -> ScaleBySLQLearnerState:
        dtype = state.learning_rate.dtype
        big, low = lambda_max(spectrum).astype(dtype), lambda_min(spectrum).astype(dtype)
        ok = jnp.isfinite(big) & jnp.isfinite(low) & (big > 0)
        accept, refuse = state.due & ok, state.due & ~ok
        safe_big = jnp.where(ok, big, 1)
        small = _clipped_min(safe_big, jnp.where(ok, low, 1), max_condition)
        beta = jnp.asarray(smoothing, dtype)
        ema_max = jnp.where(accept, beta * state.ema_lambda_max + (1 - beta) * safe_big, state.ema_lambda_max)
        ema_min = jnp.where(accept, beta * state.ema_lambda_min + (1 - beta) * small, state.ema_lambda_min)
        estimates = state.estimates + accept.astype(jnp.int32)
        debias = 1 - beta ** jnp.maximum(estimates, 1).astype(dtype)
        smooth_max, smooth_min = ema_max / debias, ema_min / debias
        alpha, rho = curvature_hyperparams(smooth_max, smooth_min, **hyper)
        if max_learning_rate is not None:
            alpha = jnp.minimum(alpha, max_learning_rate)
        return state._replace(
            learning_rate=jnp.where(accept, alpha.astype(dtype), state.learning_rate),
            momentum=jnp.where(accept, rho.astype(dtype), state.momentum),
            lambda_max=jnp.where(accept, smooth_max, state.lambda_max),
            lambda_min=jnp.where(accept, smooth_min, state.lambda_min),
            ema_lambda_max=ema_max,
            ema_lambda_min=ema_min,
            estimates=estimates,
            rejected=state.rejected + refuse.astype(jnp.int32),
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleBySLQLearnerState,
        params: optax.Params | None = None,
        *,
        curvature: Spectrum | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleBySLQLearnerState]:
        del params, extra_args
        check_floating_tree("updates", updates)
        if curvature is not None:
            if not isinstance(curvature, Spectrum):
                raise ValueError(f"curvature must be an adabatch.curvature.Spectrum, got {type(curvature).__name__}")
            state = absorb(state, curvature)
        alpha, rho = state.learning_rate, state.momentum

        def leaf(g: Any, v: jax.Array) -> tuple[jax.Array, jax.Array]:
            v = rho.astype(v.dtype) * v + jnp.asarray(g).astype(v.dtype)
            return (alpha.astype(v.dtype) * v).astype(jnp.result_type(g)), v

        results = jax.tree.map(leaf, updates, state.trace)
        treedef = jax.tree.structure(state.trace)
        out, trace = jax.tree.transpose(treedef, jax.tree.structure((0, 0)), results)
        count = optax.safe_increment(state.count)
        return out, state._replace(count=count, due=count % interval == 0, trace=trace)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def slq_learner(
    *,
    interval: int = 10,
    num_steps: int = 20,
    num_probes: int = 1,
    matrix: str = "hessian",
    rule: str = "heavy_ball",
    safety: float = 0.25,
    max_condition: float = 1e3,
    max_momentum: float = 0.9,
    smoothing: float = 0.9,
    init_learning_rate: float = 0.0,
    init_momentum: float = 0.0,
    max_learning_rate: float | None = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The SLQ learner as an optimizer: :math:`\theta_{t+1} = \theta_t - \alpha_t v_t` with
    :math:`v_t = \rho_t v_{t-1} + g_t` and :math:`(\alpha_t, \rho_t)` learned from Hessian spectra
    (``optax.chain(scale_by_slq_learner(...), optax.scale(-1))``; arguments as :func:`scale_by_slq_learner`).

    No learning rate to tune: the step size comes from :math:`\lambda_{\max}` of the batch Hessian,
    :math:`\alpha\approx s\cdot 4/\lambda_{\max}` when the curvature is ill-conditioned. Use it with
    :func:`adabatch.make_train_step` / :func:`adabatch.fit`, which compute the spectrum every ``interval`` steps.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.curvature import slq_learner
      >>> from adabatch.training import init_train_state, make_train_step
      >>> loss = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
      >>> tx = slq_learner(interval=5, num_steps=2, safety=1.0)
      >>> step = make_train_step(loss, tx)
      >>> state = init_train_state(jnp.zeros(2), tx)
      >>> for _ in range(30):
      ...     state, metrics = step(state, (x, x @ jnp.array([1.0, -1.0])))
      >>> bool(metrics["loss"] < 1e-4), bool(metrics["lambda_max"] > 0)
      (True, True)
    """
    return optax.chain(
        scale_by_slq_learner(
            interval=interval,
            num_steps=num_steps,
            num_probes=num_probes,
            matrix=matrix,
            rule=rule,
            safety=safety,
            max_condition=max_condition,
            max_momentum=max_momentum,
            smoothing=smoothing,
            init_learning_rate=init_learning_rate,
            init_momentum=init_momentum,
            max_learning_rate=max_learning_rate,
            state_dtype=state_dtype,
        ),
        optax.scale(-1.0),
    )


def _learner(opt_state: Any) -> ScaleBySLQLearnerState | None:
    return find_state(opt_state, lambda node: isinstance(node, ScaleBySLQLearnerState))


def declared_curvature(opt_state: Any) -> CurvatureRequest | None:
    """The :class:`CurvatureRequest` of the curvature learner in ``opt_state`` (any nesting; the first one), or None.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from adabatch.curvature import declared_curvature, slq_learner
      >>> declared_curvature(slq_learner(interval=5).init(jnp.zeros(3)))
      CurvatureRequest(interval=5, num_steps=20, num_probes=1, matrix='hessian')
      >>> declared_curvature(optax.sgd(0.1).init(jnp.zeros(3))) is None
      True
    """
    learner = _learner(opt_state)
    return None if learner is None else learner.curvature_request


def curvature_due(opt_state: Any) -> jax.Array:
    """Whether the coming update of a curvature learner in ``opt_state`` absorbs a spectrum (a bool array; False
    without a learner)."""
    learner = _learner(opt_state)
    return jnp.asarray(False) if learner is None else learner.due


def requested_spectrum(
    loss_fn: Any, params: Any, batch: Any, opt_state: Any, *, key: jax.Array, mask: Any = None
) -> Any:
    """The spectrum the curvature learner in ``opt_state`` asks for, ready to pass as ``curvature=``: None without a
    learner; otherwise :func:`~adabatch.curvature.hessian_spectrum` of ``batch`` with its request, computed under
    ``lax.cond`` when :func:`curvature_due` holds and zeros when it does not (traceable; the one place where a
    training loop turns a declaration into a spectrum).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adabatch.curvature import requested_spectrum, slq_learner
      >>> loss = lambda w, x: 0.5 * (x @ w) ** 2
      >>> state = slq_learner(num_steps=2).init(jnp.zeros(2))
      >>> s = requested_spectrum(loss, jnp.zeros(2), jnp.eye(2), state, key=jax.random.key(0))
      >>> round(float(s.lambda_max), 4)
      0.5
    """
    request = declared_curvature(opt_state)
    if request is None:
        return None

    def estimate(_: Any) -> Spectrum:
        return hessian_spectrum(
            loss_fn,
            params,
            batch,
            key=key,
            num_steps=request.num_steps,
            num_probes=request.num_probes,
            matrix=request.matrix,
            mask=mask,
        )

    blank = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(estimate, None))
    return jax.lax.cond(curvature_due(opt_state), estimate, lambda _: blank, None)
