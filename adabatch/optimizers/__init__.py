"""Layer 3 — optimizers: ``scale_by_*`` blocks and their aliases, optax style.

What lives here: AdaGrad and AdaGrad-Norm in the paper's form (:func:`adagrad`, :func:`adagrad_norm` and their
``scale_by_*`` blocks), AdaBelief with the options of its official implementation (:func:`adabelief`,
:func:`scale_by_belief`), and the AdAdaGrad combinations of a batch-size test and its optimizer
(:func:`adadagrad`, :func:`adadagrad_norm`). Related methods with their official semantics: Eve
(:func:`eve`, :func:`evew`, :func:`scale_by_eve`; reads examplewise statistics), Tom (:func:`tom`,
:func:`scale_by_tom`), MaxVA (:func:`maxva`, :func:`scale_by_maxva`), ActiveLR (:func:`active_lr` around any
transformation, :func:`active_adam`, :func:`active_adabelief`), AdaLomo (:func:`adalomo`,
:func:`scale_by_adalomo`), CLARS (:func:`clars`, :func:`scale_by_clars`; layer-wise rates from per-leaf examplewise
statistics) and EXTRAP-SGD (:func:`extrap_sgd`, :func:`scale_by_extrap_sgd`; steps along the gradient at an
extrapolated point, which the caller evaluates: :func:`extrapolate`, :func:`needs_extrapolated_grads`). A
``scale_by_*`` block never flips the sign nor applies the learning rate; the alias is
``optax.chain(scale_by_*(...), optax.scale_by_learning_rate(lr))``.

May import: :mod:`adabatch.rules`, :mod:`adabatch.stats` and the base modules.
"""

from adabatch import _deprecation
from adabatch.optimizers._active_lr import ActiveLRState, active_adabelief, active_adam, active_lr
from adabatch.optimizers._adabelief import ScaleByBeliefState, adabelief, scale_by_belief
from adabatch.optimizers._adadagrad import adadagrad, adadagrad_norm
from adabatch.optimizers._adagrad import (
    ScaleByAdagradNormState,
    ScaleByAdagradState,
    adagrad,
    adagrad_norm,
    scale_by_adagrad,
    scale_by_adagrad_norm,
)
from adabatch.optimizers._adalomo import ScaleByAdalomoState, adalomo, scale_by_adalomo
from adabatch.optimizers._clars import ScaleByClarsState, clars, scale_by_clars
from adabatch.optimizers._eve import ScaleByEveState, eve, evew, scale_by_eve
from adabatch.optimizers._extrap_sgd import (
    ScaleByExtrapSGDState,
    extrap_sgd,
    extrapolate,
    needs_extrapolated_grads,
    scale_by_extrap_sgd,
)
from adabatch.optimizers._maxva import ScaleByMaxVAState, maxva, scale_by_maxva
from adabatch.optimizers._tom import ScaleByTomState, scale_by_tom, tom

__all__ = [
    "ActiveLRState",
    "ScaleByAdagradNormState",
    "ScaleByAdagradState",
    "ScaleByAdalomoState",
    "ScaleByBeliefState",
    "ScaleByClarsState",
    "ScaleByEveState",
    "ScaleByExtrapSGDState",
    "ScaleByMaxVAState",
    "ScaleByTomState",
    "active_adabelief",
    "active_adam",
    "active_lr",
    "adabelief",
    "adadagrad",
    "adadagrad_norm",
    "adagrad",
    "adagrad_norm",
    "adalomo",
    "clars",
    "eve",
    "evew",
    "extrap_sgd",
    "extrapolate",
    "maxva",
    "needs_extrapolated_grads",
    "scale_by_adagrad",
    "scale_by_adagrad_norm",
    "scale_by_adalomo",
    "scale_by_belief",
    "scale_by_clars",
    "scale_by_eve",
    "scale_by_extrap_sgd",
    "scale_by_maxva",
    "scale_by_tom",
    "tom",
]

__getattr__ = _deprecation.deprecated_getattr(
    __name__, {"AdaBeliefState": ("adabatch.optimizers", "ScaleByBeliefState")}
)
