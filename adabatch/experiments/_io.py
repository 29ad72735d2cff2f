"""What every experiment writes: JSON without non-finite floats, and a description of the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["json_safe", "machine", "save_figure"]


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


def save_figure(fig: Any, out: Path, name: str, files: list[str]) -> None:
    """Lay out a matplotlib ``fig``, write it to ``out / name`` (PNG, 90 dpi), append ``name`` to ``files`` (the
    plots a report lists) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    files.append(name)
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
