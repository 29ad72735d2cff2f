"""Front end — benchmarks, installed with the package so that ``adabatch bench`` runs installed code only.

* :mod:`adabatch.benchmarks.stats`: per-example statistics producers against a plain gradient step and PyTorch
  peers (``adabatch bench stats``; peers from the ``bench`` extra);
* :mod:`adabatch.benchmarks.train_step`: ``make_train_step`` against hand-written jitted loops
  (``adabatch bench train-step``).

Results are ratios against a baseline measured in the same run, written to ``docs/benchmarks.md`` with the command
and the machine. May import every library layer (not :mod:`adabatch.cli`).
"""

__all__: list[str] = []
