"""Shared fixtures: float64 mode and random per-example gradients."""

from __future__ import annotations

import jax
import numpy as np
import pytest

SHAPES = {"w": (3, 4), "b": (4,), "c": (2,)}


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Run a test in float32, and again in float64 with JAX's x64 mode switched on for its duration."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield np.float64
    else:
        yield np.float32


def random_per_example(rng: np.random.Generator, b: int, *, offset: float = 0.3, scale: float = 1.0, shapes=SHAPES):
    """A dict of per-example gradient leaves ``(b, *shape)``: a common mean ``offset`` plus Gaussian noise."""
    return {k: offset + scale * rng.standard_normal((b, *s)) for k, s in shapes.items()}
