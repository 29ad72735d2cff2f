"""Small real data sets that ship inside installed packages (no download ever happens).

* :func:`load_digits`: scikit-learn's 1,797 8×8 handwritten digits (10 classes), split train/test.
* :func:`load_text`: CPython's ``pydoc_data.topics`` (about 0.45 MB of English technical prose) as byte tokens,
  cut into fixed-length windows for a small language model.

Loaders for large data sets (TFDS, Grain, Hugging Face) are not part of the core: they would need a network.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from adabatch._validation import check_positive_int, check_unit_interval

__all__ = ["Split", "load_digits", "load_text"]


class Split(NamedTuple):
    """A train/test split of in-memory NumPy arrays."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's digits as float32 images ``(N, 8, 8, 1)`` in [0, 1] and int32 labels, split at random.

    Args:
      test_fraction: share of the 1,797 examples held out for testing, in (0, 1).
      seed: seed of the split permutation.

    Returns:
      A :class:`Split` (1,438 train and 359 test examples with the defaults).

    Example:
      >>> from adabatch.datasets import load_digits
      >>> data = load_digits()
      >>> data.x_train.shape, data.x_test.shape, int(data.y_train.max())
      ((1438, 8, 8, 1), (359, 8, 8, 1), 9)
    """
    check_unit_interval("test_fraction", test_fraction, closed_left=False)
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install 'adabatch[cli]'") from exc
    raw = sklearn_digits()
    x = (raw.images.astype(np.float32) / 16.0)[..., None]
    return _split(x, raw.target.astype(np.int32), test_fraction, seed)


def load_text(seq_len: int = 64, test_fraction: float = 0.1, seed: int = 0) -> Split:
    """``pydoc_data.topics`` as byte tokens (vocabulary 256) in non-overlapping windows of ``seq_len + 1``.

    ``x`` holds the first ``seq_len`` tokens of each window and ``y`` the next-token targets (the window shifted by
    one), both int32 of shape ``(N, seq_len)``. Windows are split train/test at random.

    Example:
      >>> from adabatch.datasets import load_text
      >>> data = load_text(seq_len=32)
      >>> data.x_train.shape[1], data.y_train.dtype.name, bool((data.x_train[:, 1:] == data.y_train[:, :-1]).all())
      (32, 'int32', True)
    """
    check_positive_int("seq_len", seq_len)
    check_unit_interval("test_fraction", test_fraction, closed_left=False)
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    n = len(tokens) // (seq_len + 1)
    windows = tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    return _split(windows[:, :-1], windows[:, 1:], test_fraction, seed)
