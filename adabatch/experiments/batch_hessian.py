r"""The batch Hessian against the full-data Hessian, and the learning rates its curvature predicts (Granziol et al.).

Granziol, Zohren and Roberts (2022) model the Hessian :math:`H_B` of the mean loss over a batch of :math:`B` examples
as the full-data Hessian :math:`H` plus a random fluctuation whose scale shrinks with :math:`B`, so that the extremal
eigenvalues of :math:`H_B` exceed those of :math:`H` in magnitude by an excess that vanishes as :math:`B` grows (the
same for the Gauss-Newton matrix). Since the largest stable SGD step is :math:`2/\lambda_{\max}(H_B)`, this gives
the linear learning-rate law for SGD while the excess dominates, and with Adam's preconditioner (which also scales
with the noise) the square-root law, both saturating once the true outliers of :math:`H` dominate.

Part ``"spectra"`` (this module) measures it on the digits MLP and the pydoc-text transformer LM of
:mod:`adabatch.experiments.lr_vs_batch` (same models, data and initialisations):

* the **points**: initialisation; after SGD training and after Adam training from it (plain, constant learning rate,
  batches drawn with replacement, as in lr-vs-batch);
* per **batch size** :math:`B = 1, 2, 4, \dots, n` (``n`` the data set: digits' whole training set; on text a fixed
  subset of training windows) several batches drawn **without replacement** (disjoint where they fit), per seed;
  :math:`B=n` is the full-data matrix :math:`H`;
* per batch the extremal Ritz values :math:`\lambda_{\max}, \lambda_{\min}` of m-step Lanczos
  (:func:`adabatch.curvature.hessian_spectrum`, full re-orthogonalisation) of the **Hessian** and the **GGN**, and
  at the Adam point of the **preconditioned** Hessian :math:`P^{-1/2}H_BP^{-1/2}`, with :math:`P=\sqrt{\hat v}+
  \epsilon` either Adam's own state after training (``adam_state``, fixed in :math:`B`) or the stationary second
  moment a batch of size :math:`B` would give at that point (``adam_batch``: :math:`\hat v_B = \bar g^2 +
  \sigma^2\,(n-B)/(B(n-1))` per coordinate, from exact per-example gradients; this is the :math:`B`-dependence of
  the preconditioner that the square-root law rests on).

``adabatch.experiments._batch_hessian_report`` analyses it: the predicted maximal stable learning rates
:math:`2/\lambda_{\max}` against :math:`B` with fitted exponents (bootstrap intervals over batches and seeds), the
random-matrix excess :math:`\lambda_{\max}(H_B)-\lambda_{\max}(H)\approx cB^{-\beta}`, and the comparison with the
optimal learning rates measured by ``adabatch experiment lr-vs-batch`` (read from ``--lr-results``, or a reduced
grid run here). A second part (``"learner"``: training with the SLQ learning-rate/momentum learner) adds its own
entry to ``result["parts"]`` and its own analysis.

To keep compilation cheap every batch size is padded (with a zero-weight ``mask``) to one of a few **buckets**, and
the batches of one batch size run together under ``vmap``: one compiled program per bucket and matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adabatch.curvature import ModelLoss, hessian_spectrum
from adabatch.experiments import _batch_hessian_report as report
from adabatch.experiments import _protocol
from adabatch.experiments import lr_vs_batch as lvb
from adabatch.experiments._io import machine
from adabatch.stats import GradStats, grad_stats

__all__ = [
    "DATASETS",
    "PARTS",
    "PRECONDITIONERS",
    "Protocol",
    "Series",
    "batch_extremes",
    "default_protocol",
    "lr_reference",
    "reanalyse",
    "run",
    "stationary_adam_preconditioner",
]

DATASETS = ("digits", "text")
PARTS = ("spectra",)  # the learner's training arm will be a second part
PRECONDITIONERS = ("adam_state", "adam_batch")
ADAM_EPS = 1e-8  # optax.adam's default ε (the optimizer lr-vs-batch tunes)
ADAM_B2 = 0.999


@dataclasses.dataclass(frozen=True)
class Series:
    """One curve of the experiment: a matrix at a point, optionally Adam-preconditioned."""

    point: str  # "init", "sgd" (after SGD training) or "adam" (after Adam training)
    matrix: str  # "hessian" or "ggn"
    preconditioner: str | None = None  # None, "adam_state" or "adam_batch"

    @property
    def name(self) -> str:
        return f"{self.matrix}/{self.point}" + (f"/{self.preconditioner}" if self.preconditioner else "")


_SERIES = (
    Series("init", "hessian"),
    Series("init", "ggn"),
    Series("sgd", "hessian"),
    Series("sgd", "ggn"),
    Series("adam", "hessian"),
    Series("adam", "hessian", "adam_state"),
    Series("adam", "hessian", "adam_batch"),
)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The measurement plan of one data set (see :func:`default_protocol`)."""

    data: str
    n: int  # examples in the data set (the full-data H); 0: the whole training set
    batch_sizes: tuple[int, ...]  # the last is n (the full-data matrix)
    buckets: tuple[tuple[int, int], ...]  # (padded size, batches per batch size), ascending: B uses the first >= B
    num_steps: int  # Lanczos steps m
    num_probes: int  # probe vectors per batch
    seeds: int  # initialisations (lr-vs-batch's seeds 0, 1, ...), each with its own batches and training
    width: int  # the model width (lr-vs-batch's)
    train_batch: int  # batch size of the training to the trained points
    train_samples: int  # examples seen by that training
    sgd_lr: float
    adam_lr: float
    series: tuple[Series, ...]
    bootstrap: int  # resamples for the intervals of the fitted exponents
    lr_grid_quick: bool  # a lr-vs-batch run made here (no --lr-results file) uses its quick grid


def default_protocol(data: str = "digits", quick: bool = False) -> Protocol:
    """The default plan (the full run takes ≤ 15 minutes on 2 loaded CPU cores for both data sets) or the ``quick``
    one (seconds, for tests)."""
    if data not in DATASETS:
        raise ValueError(f"data must be one of {', '.join(map(repr, DATASETS))}; got {data!r}")
    if quick:
        n = 64
        return Protocol(data, n, (1, 4, 16, n), ((n, 3),), num_steps=6, num_probes=1, seeds=1, width=8,
                        train_batch=16, train_samples=256, sgd_lr=0.5 if data == "digits" else 1.0, adam_lr=0.01,
                        series=_SERIES, bootstrap=50, lr_grid_quick=True)  # fmt: skip
    if data == "digits":
        sizes = (*(2**k for k in range(11)), 1438)
        return Protocol(data, 0, sizes, ((64, 16), (1438, 6)), num_steps=30, num_probes=1, seeds=3, width=64,
                        train_batch=32, train_samples=8192, sgd_lr=0.5, adam_lr=0.01, series=_SERIES, bootstrap=500,
                        lr_grid_quick=False)  # fmt: skip
    # text: the 256 windows lr-vs-batch measures its loss and noise scale on; fewer series and Lanczos steps (an HVP
    # of the transformer costs about 100x the MLP's)
    n = 256
    series = tuple(s for s in _SERIES if s.name not in ("ggn/init", "hessian/adam"))
    return Protocol(data, n, tuple(2**k for k in range(9)), ((16, 4), (n, 2)), num_steps=16, num_probes=1, seeds=1,
                    width=32, train_batch=32, train_samples=4096, sgd_lr=1.0, adam_lr=0.003, series=series,
                    bootstrap=500, lr_grid_quick=False)  # fmt: skip


def _problem(protocol: Protocol) -> Any:
    grid = dataclasses.replace(lvb.default_grid("sgd", protocol.data), width=protocol.width, eval_size=0)
    return lvb._problem(protocol.data, grid)


@functools.partial(jax.jit, static_argnames=("model_loss", "matrix", "num_steps", "num_probes"))
def _extremes(params, preconditioner, x, y, indices, mask, key, *, model_loss, matrix, num_steps, num_probes):
    def one(idx, m, key):
        s = hessian_spectrum(
            model_loss,
            params,
            (x[idx], y[idx]),
            key=key,
            num_steps=num_steps,
            num_probes=num_probes,
            matrix=matrix,
            mask=m,
            preconditioner=preconditioner,
        )
        return s.lambda_max, s.lambda_min

    return jax.vmap(one)(indices, mask, jax.random.split(key, indices.shape[0]))


def batch_extremes(
    model_loss: ModelLoss,
    params: Any,
    data: tuple[Any, Any],
    indices: Any,
    mask: Any,
    *,
    key: jax.Array,
    matrix: str = "hessian",
    num_steps: int = 30,
    num_probes: int = 1,
    preconditioner: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Extremal Ritz values of the batch matrices :math:`A_k` (Hessian or GGN of the mean loss over the examples
    ``indices[k]`` whose ``mask[k]`` is true), all batches in one compiled, ``vmap``-ed call.

    Args:
      model_loss: the per-example loss as a :class:`adabatch.curvature.ModelLoss`.
      params: the parameters.
      data: ``(inputs, targets)`` of the whole data set (leading axis: examples).
      indices: ``(batches, padded size)`` integer example indices.
      mask: ``(batches, padded size)`` bool: which entries of ``indices`` belong to the batch (the rest is padding).
      key: PRNG key for the probes (one per batch).
      matrix: ``"hessian"`` or ``"ggn"``.
      num_steps: Lanczos steps.
      num_probes: probes per batch.
      preconditioner: optional diagonal :math:`P` (params-shaped, positive): the spectrum of
        :math:`P^{-1/2}A_kP^{-1/2}`. Without it :math:`P = 1` (the same compiled program serves both).

    Returns:
      ``(lambda_max, lambda_min)``, NumPy arrays of shape ``(batches,)``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from adabatch.curvature import ModelLoss
      >>> from adabatch.experiments.batch_hessian import batch_extremes
      >>> loss = ModelLoss(lambda w, x: x @ w, lambda z, y: 0.5 * (z - y) ** 2)   # H_B = mean of x xᵀ over B
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> hi, lo = batch_extremes(loss, jnp.zeros(2), (x, jnp.zeros(3)), np.array([[1, 0], [0, 1]]),
      ...                         np.array([[True, False], [True, True]]), key=jax.random.key(0), num_steps=2)
      >>> [np.round(hi, 4).tolist(), np.round(lo, 4).tolist()]
      [[4.0, 2.0], [0.0, 0.5]]
    """
    if preconditioner is None:  # host-side ones: no eager device op (each would compile)
        preconditioner = jax.tree_util.tree_map(lambda p: np.ones(np.shape(p), np.dtype(p.dtype)), params)
    hi, lo = _extremes(
        params,
        preconditioner,
        data[0],
        data[1],
        np.asarray(indices, np.int32),
        np.asarray(mask, bool),
        key,
        model_loss=model_loss,
        matrix=matrix,
        num_steps=int(num_steps),
        num_probes=int(num_probes),
    )
    return np.asarray(hi, np.float64), np.asarray(lo, np.float64)


def _draw(n: int, batch_size: int, batches: int, padded: int, rng: np.random.Generator):
    """``batches`` batches of ``batch_size`` distinct examples (disjoint while they fit in ``n``), padded to
    ``padded`` with index 0 and mask false."""
    indices = np.zeros((batches, padded), np.int32)
    mask = np.zeros((batches, padded), bool)
    per_permutation = max(n // batch_size, 1)
    perm = rng.permutation(n)
    for k in range(batches):
        j = k % per_permutation
        if j == 0 and k > 0:
            perm = rng.permutation(n)
        indices[k, :batch_size] = perm[j * batch_size : (j + 1) * batch_size]
        mask[k, :batch_size] = True
    return indices, mask


def stationary_adam_preconditioner(stats: GradStats, batch_size: int, *, eps: float = ADAM_EPS) -> Any:
    r"""Adam's :math:`P_B=\sqrt{\hat v_B}+\epsilon` for batches of ``batch_size`` drawn without replacement from the
    ``n`` examples ``stats`` describes: :math:`\hat v_B = E[g_B^2] = \bar g^2 + \sigma^2 (n-B)/(B(n-1))` per
    coordinate, with :math:`\sigma^2 = S_2/n - \bar g^2` the population variance of the per-example gradients.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.stats import from_per_example
      >>> from adabatch.experiments.batch_hessian import stationary_adam_preconditioner
      >>> stats = from_per_example(jnp.array([[1.0], [3.0]]), sq_sum=True)   # mean 2, variance 1
      >>> [round(float(stationary_adam_preconditioner(stats, b, eps=0.0)[0]) ** 2, 4) for b in (1, 2)]
      [5.0, 4.0]
    """
    n = float(stats.count)
    factor = (n - batch_size) / (batch_size * (n - 1)) if n > 1 else 0.0

    def leaf(mean, s2):  # on the host, in float64: no device op to compile per call
        mean, s2 = np.asarray(mean, np.float64), np.asarray(s2, np.float64)
        var = np.maximum(s2 / n - mean * mean, 0)
        return (np.sqrt(mean * mean + factor * var) + eps).astype(np.float32)

    return jax.tree_util.tree_map(leaf, stats.mean, stats.sq_sum)


def _adam_state_preconditioner(state: Any) -> Any:
    nu_state = next(s for s in jax.tree_util.tree_leaves(state, is_leaf=lvb._has_nu) if lvb._has_nu(s))
    t = float(nu_state.count)
    return jax.tree_util.tree_map(
        lambda v: (np.sqrt(np.asarray(v, np.float64) / (1 - ADAM_B2**t)) + ADAM_EPS).astype(np.float32), nu_state.nu
    )


def _trainer(problem, name: str):
    """A compiled ``(params, indices, lr) -> (params, opt_state)`` (lr-vs-batch's training loop)."""
    opt = lvb.make_optimizer(name)
    train = lvb._trainer(problem, opt)
    return jax.jit(lambda params, indices, lr: train(params, opt.init(params), indices, lr))


def _train(train, problem, lr: float, params, protocol: Protocol, seed: int):
    steps = max(protocol.train_samples // protocol.train_batch, 1)
    indices = lvb._batches(int(problem.x.shape[0]), protocol.train_batch, steps, seed)
    return train(params, indices, np.float32(lr))


def _bucket(protocol: Protocol, batch_size: int) -> tuple[int, int]:
    return next((p, k) for p, k in protocol.buckets if p >= batch_size)


def _run_spectra(protocol: Protocol, tick: Callable[[], None]) -> dict[str, Any]:
    problem = _problem(protocol)
    n = protocol.n or int(problem.x.shape[0])
    data = (problem.x[:n], problem.y[:n])
    sizes = [b for b in protocol.batch_sizes if b <= n]
    if sizes[-1] != n:
        sizes.append(n)
    mean_loss = jax.jit(lambda p: jnp.mean(problem.loss_fn(p, data)))
    stats_fn = jax.jit(lambda p: grad_stats(problem.loss_fn, p, data, chunk_size=64, sq_sum=True))
    sgd_train, adam_train = _trainer(problem, "sgd"), _trainer(problem, "adam")
    params0 = jax.tree_util.tree_map(np.asarray, lvb._initial_params(problem, protocol.seeds))
    dim = int(sum(np.size(x[0]) for x in jax.tree_util.tree_leaves(params0)))
    values: dict[str, dict[str, list]] = {s.name: {"lambda_max": [], "lambda_min": []} for s in protocol.series}
    points: dict[str, list] = {"init": [], "sgd": [], "adam": []}
    for seed in range(protocol.seeds):
        init = jax.tree_util.tree_map(lambda p, seed=seed: p[seed], params0)  # NumPy: no device op
        sgd, _ = _train(sgd_train, problem, protocol.sgd_lr, init, protocol, seed)
        adam, adam_state = _train(adam_train, problem, protocol.adam_lr, init, protocol, seed)
        at = {"init": init, "sgd": sgd, "adam": adam}
        for name, p in at.items():
            points[name].append({"loss": float(mean_loss(p))})
        needs_stats = any(s.preconditioner == "adam_batch" for s in protocol.series)
        stats = jax.tree_util.tree_map(np.asarray, stats_fn(adam)) if needs_stats else None
        state_p = _adam_state_preconditioner(adam_state)
        rng = np.random.default_rng([seed, n])
        draws = {b: _draw(n, b, _bucket(protocol, b)[1], _bucket(protocol, b)[0], rng) for b in sizes}
        for index, s in enumerate(protocol.series):
            hi_rows, lo_rows = [], []
            for b in sizes:
                if s.preconditioner == "adam_batch":
                    assert stats is not None
                    pre = stationary_adam_preconditioner(stats, b)
                else:
                    pre = state_p if s.preconditioner == "adam_state" else None
                key = jax.random.key(seed * 1_000_003 + b * 101 + index)
                hi, lo = batch_extremes(
                    problem.model_loss,
                    at[s.point],
                    data,
                    *draws[b],
                    key=key,
                    matrix=s.matrix,
                    num_steps=protocol.num_steps,
                    num_probes=protocol.num_probes,
                    preconditioner=pre,
                )
                hi_rows.append(hi.tolist())
                lo_rows.append(lo.tolist())
                tick()
            values[s.name]["lambda_max"].append(hi_rows)  # (seeds, sizes, batches)
            values[s.name]["lambda_min"].append(lo_rows)
    return {
        "n": n,
        "dim": dim,
        "batch_sizes": sizes,
        "points": {
            name: {"loss": [p["loss"] for p in rows]} | _point_training(name, protocol) for name, rows in points.items()
        },
        "series": [dataclasses.asdict(s) | {"name": s.name, **values[s.name]} for s in protocol.series],
    }


def _point_training(name: str, protocol: Protocol) -> dict[str, Any]:
    if name == "init":
        return {}
    lr = protocol.sgd_lr if name == "sgd" else protocol.adam_lr
    return {"optimizer": name, "learning_rate": lr, "batch_size": protocol.train_batch,
            "samples": protocol.train_samples}  # fmt: skip


def _count(protocol: Protocol) -> int:
    return protocol.seeds * len(protocol.series) * len(protocol.batch_sizes)


def lr_reference(data: str, optimizer: str, lr_results: str | Path | None, quick: bool) -> dict[str, Any]:
    """The measured optimal learning rates of ``adabatch experiment lr-vs-batch`` for ``optimizer`` on ``data``:
    read from ``lr_results/lr-vs-batch-<optimizer>-<data>/results.json`` when that file exists, else measured here
    with a reduced grid (lr-vs-batch's quick grid when ``quick``; otherwise its default grid with every other
    learning rate and 4 seeds on digits, 1 on text). Returns the fields the comparison needs."""
    path = None if lr_results is None else Path(lr_results) / f"lr-vs-batch-{optimizer}-{data}" / "results.json"
    if path is not None and path.is_file():
        result = json.loads(path.read_text())
        source = str(path)
    else:
        grid = lvb.default_grid(optimizer, data, quick)
        if not quick:
            grid = dataclasses.replace(grid, learning_rates=grid.learning_rates[::2], bootstrap=100,
                                       seeds=4 if data == "digits" else 1)  # fmt: skip
        result = lvb.run(optimizer, data, grid=grid, progress=False)
        source = "measured here (reduced grid: " + json.dumps(dataclasses.asdict(grid)["batch_sizes"]) + ")"
    return {
        "source": source,
        "command": result.get("command"),
        "batch_sizes": result["batch_sizes"],
        "optimal": result["optimal"],
        "fits": {k: result["fits"][k] for k in ("power_law", "power_law_below_noise_scale",
                                                 "power_law_well_below_noise_scale", "mccandlish", "surge")},
        "bootstrap": {k: v for k, v in result["bootstrap"].items() if k != "learning_rate_ci"},
        "b_simple": result["noise_scale"]["geometric_mean"],
    }  # fmt: skip


def run(
    *,
    data: Sequence[str] = DATASETS,
    quick: bool = False,
    out: str | Path | None = None,
    protocols: dict[str, Protocol] | None = None,
    seeds: int | None = None,
    lr_results: str | Path | None = "results",
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run the experiment on each data set of ``data``; write ``results.json``, ``summary.md`` and the plots to
    ``out`` (when given). Returns the results dictionary (``result["parts"]["spectra"][data]``, the lr-vs-batch
    reference in ``result["lr_vs_batch"]``, the analysis in ``result["analysis"]``)."""
    start = time.time()
    protocols = dict(protocols or {})
    for d in data:
        if d not in DATASETS:
            raise ValueError(f"data must be one of {', '.join(map(repr, DATASETS))}; got {d!r}")
        protocols.setdefault(d, default_protocol(d, quick))
        if seeds is not None:
            protocols[d] = dataclasses.replace(protocols[d], seeds=seeds)
    # one tick per batch size of a series, and one per lr-vs-batch reference
    total = sum(_count(protocols[d]) for d in data) + 2 * len(data)
    tick, close = _protocol.progress(total, progress, "batch-hessian")
    spectra: dict[str, Any] = {}
    reference: dict[str, Any] = {}
    try:
        for d in data:
            t = time.time()
            spectra[d] = _run_spectra(protocols[d], tick)
            spectra[d]["elapsed_s"] = time.time() - t
        for d in data:
            reference[d] = {}
            for opt in ("sgd", "adam"):
                t = time.time()
                reference[d][opt] = lr_reference(d, opt, lr_results, protocols[d].lr_grid_quick)
                reference[d][opt]["elapsed_s"] = time.time() - t
                tick()
    finally:
        close()
    result: dict[str, Any] = {
        "experiment": "batch-hessian",
        "command": command or "adabatch experiment batch-hessian" + (" --quick" if quick else ""),
        "machine": machine(),
        "protocols": {d: dataclasses.asdict(protocols[d]) for d in data},
        "parts": {"spectra": spectra},
        "lr_vs_batch": reference,
    }
    return _protocol.finish(result, report, start, out)


def reanalyse(out: str | Path) -> dict[str, Any]:
    """Recompute the analysis, summary and plots of ``out/results.json`` without measuring anything."""
    return _protocol.reanalyse(out, report)
