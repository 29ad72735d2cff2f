"""Experiments behind the ``adabatch experiment`` command (they need the ``cli`` extra: flax, scikit-learn, scipy,
matplotlib, tqdm).

* :mod:`adabatch.experiments.lr_vs_batch`: the optimal learning rate as a function of the batch size, fitted with
  the linear, square-root and surge laws, against the measured gradient noise scale.
* :mod:`adabatch.experiments.adadagrad`: AdAdaGrad's batch-size tests with AdaGrad and AdaGrad-Norm against fixed
  batches, a batch-size warm-up and AdaScale, at equal sample budgets (steps and samples to the small batch's
  accuracy, batch-size trajectories against the measured noise scale, the steps/samples trade-off).
* :mod:`adabatch.experiments.optimizers`: every optimizer of the library with a fixed batch and with the norm test
  (and SGD with the learned optimal batch size) at equal sample budgets, each with its tuned learning rate, against
  the claims of their papers.
* :mod:`adabatch.experiments.batch_hessian`: the extremal eigenvalues of batch Hessians and Gauss-Newton matrices
  against the full-data ones (Granziol et al.), the maximal stable learning rates they predict for SGD and Adam, and
  how those compare with lr-vs-batch's measured optima.
"""

__all__ = ["adadagrad", "batch_hessian", "lr_vs_batch", "optimizers"]
