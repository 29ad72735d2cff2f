"""Layer 3 — curvature: Hessian and Gauss-Newton vector products, Lanczos, and spectra by stochastic Lanczos quadrature.

What lives here: the products :func:`hvp` (Hessian of the mean per-example loss, forward-over-reverse) and
:func:`ggn_vp` (Generalised Gauss-Newton :math:`J^\\top H_\\ell J`, from a model and a loss of its outputs, bundled
as a :class:`ModelLoss` where a single ``loss_fn`` is expected) and their linearised form :func:`curvature_matvec`;
:func:`lanczos` (full re-orthogonalisation, one ``lax.fori_loop``, breakdown-safe) and :func:`tridiagonal`; the
:class:`Spectrum` pytree (Ritz nodes and quadrature weights per probe) from :func:`hessian_spectrum` (Hessian or
GGN of a batch, optionally preconditioned) or :func:`operator_spectrum` (any symmetric operator), read with
:func:`lambda_max`, :func:`lambda_min`, :func:`density` and :func:`trace_moment`. A :class:`Spectrum` reaches a
transformation as the ``curvature`` extra argument, as a :class:`adabatch.stats.GradStats` reaches a rule: the
learner :func:`slq_learner` / :func:`scale_by_slq_learner` (heavy-ball momentum with its step size and momentum
from the spectrum, :func:`curvature_hyperparams`) declares the spectrum it needs (:func:`declared_curvature`,
:func:`curvature_due`) and :func:`adabatch.make_train_step` computes it.

May import: :mod:`adabatch.stats` and the base modules.
"""

from adabatch.curvature._hvp import ModelLoss, ggn_vp, hvp
from adabatch.curvature._lanczos import LanczosResult, lanczos, tridiagonal
from adabatch.curvature._learner import (
    LEARNER_RULES,
    CurvatureRequest,
    ScaleBySLQLearnerState,
    curvature_due,
    curvature_hyperparams,
    declared_curvature,
    requested_spectrum,
    scale_by_slq_learner,
    slq_learner,
)
from adabatch.curvature._spectrum import (
    MATRICES,
    Spectrum,
    curvature_matvec,
    density,
    hessian_spectrum,
    lambda_max,
    lambda_min,
    operator_spectrum,
    quadrature,
    trace_moment,
)

__all__ = [
    "LEARNER_RULES",
    "MATRICES",
    "CurvatureRequest",
    "ScaleBySLQLearnerState",
    "curvature_due",
    "curvature_hyperparams",
    "declared_curvature",
    "requested_spectrum",
    "scale_by_slq_learner",
    "slq_learner",
    "LanczosResult",
    "ModelLoss",
    "Spectrum",
    "curvature_matvec",
    "density",
    "ggn_vp",
    "hessian_spectrum",
    "hvp",
    "lambda_max",
    "lambda_min",
    "lanczos",
    "operator_spectrum",
    "quadrature",
    "trace_moment",
    "tridiagonal",
]
