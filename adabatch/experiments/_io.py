"""What every experiment writes: JSON without non-finite floats, and a description of the machine."""

from __future__ import annotations

import os
import platform
from typing import Any

import jax
import numpy as np

__all__ = ["json_safe", "machine"]


def json_safe(node: Any) -> Any:
    """Non-finite floats (a diverged run, an unbounded interval) become None; NumPy scalars become Python ones.

    Example:
      >>> from adabatch.experiments._io import json_safe
      >>> json_safe({"a": [1.0, float("nan")], "b": (float("inf"),)})
      {'a': [1.0, None], 'b': [None]}
    """
    if isinstance(node, dict):
        return {k: json_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [json_safe(v) for v in node]
    if isinstance(node, np.generic):
        node = node.item()
    return None if isinstance(node, float) and not np.isfinite(node) else node


def machine() -> dict[str, Any]:
    """Platform, processor, CPU count, JAX version and backend of this run."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }
