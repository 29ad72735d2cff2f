"""Experiments behind the ``adabatch experiment`` command (they need the ``cli`` extra: flax, scikit-learn, scipy,
matplotlib, tqdm).

* :mod:`adabatch.experiments.lr_vs_batch`: the optimal learning rate as a function of the batch size, fitted with
  the linear, square-root and surge laws, against the measured gradient noise scale.
"""

__all__ = ["lr_vs_batch"]
