"""Flax integration (the only part of adabatch that imports flax). See :mod:`adabatch.flax.models`."""
