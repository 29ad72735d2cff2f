"""Layer 3 — optimizers: ``scale_by_*`` blocks and their aliases, optax style.

What lives here: AdaGrad and AdaGrad-Norm in the paper's form (:func:`adagrad`, :func:`adagrad_norm` and their
``scale_by_*`` blocks), AdaBelief with the options of its official implementation (:func:`adabelief`,
:func:`scale_by_belief`), and the AdAdaGrad combinations of a batch-size test and its optimizer
(:func:`adadagrad`, :func:`adadagrad_norm`). A ``scale_by_*`` block never flips the sign nor applies the learning
rate; the alias is ``optax.chain(scale_by_*(...), optax.scale_by_learning_rate(lr))``.

May import: :mod:`adabatch.rules`, :mod:`adabatch.stats` and the base modules.
"""

from adabatch import _deprecation
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

__all__ = [
    "ScaleByAdagradNormState",
    "ScaleByAdagradState",
    "ScaleByBeliefState",
    "adabelief",
    "adadagrad",
    "adadagrad_norm",
    "adagrad",
    "adagrad_norm",
    "scale_by_adagrad",
    "scale_by_adagrad_norm",
    "scale_by_belief",
]

__getattr__ = _deprecation.deprecated_getattr(
    __name__, {"AdaBeliefState": ("adabatch.optimizers", "ScaleByBeliefState")}
)
