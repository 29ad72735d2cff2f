"""Ghost statistics for plain JAX models: layer tags and capture backends.

Write a layer with :func:`dense`, :func:`conv`, :func:`embed` or :func:`layer` and
``grad_stats(..., method="ghost")`` computes its parameters' per-example statistics without materialising
per-example gradients (the maths is in :func:`adabatch.grad_stats`'s documentation and ``docs/grad_stats.md``).
Flax linen layers are captured automatically; other frameworks register a backend with
:func:`register_capture_backend`. :func:`ghost_report` (a :class:`GhostReport`) says which form each layer takes
and why a parameter falls back; ``grad_stats(..., ghost_form=...)`` forces a form (``FORMS``).
"""

from adabatch.stats import _ghost, _ghost_layers
from adabatch.stats._ghost import *  # noqa: F403  (the public names of the ghost engine)
from adabatch.stats._ghost_layers import *  # noqa: F403  (the plain-JAX layer tags)

__all__ = sorted(_ghost.__all__ + _ghost_layers.__all__)
