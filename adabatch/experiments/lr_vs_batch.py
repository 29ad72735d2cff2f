r"""How the optimal learning rate depends on the batch size, measured on small real problems.

For every batch size :math:`B` of a grid and every learning rate :math:`\eta` of a log-spaced grid, train from the
same initialisations (``seeds`` of them) on the same budget of ``samples`` examples (so :math:`\lfloor
\text{samples}/B\rfloor` steps, batches drawn uniformly with replacement) and record the final training loss (on the
whole digits training set, or a fixed set of text windows). All learning rates and seeds of one batch size train
together in one compiled, ``vmap``-ed ``lax.scan``. Then

* :math:`\eta^\star(B)`: the vertex of a parabola fitted to the seed-mean loss against :math:`\log_2\eta` within one
  octave of the grid minimum (the grid point itself when the parabola is not convex); optima on the edge of the grid
  are flagged and left out of the fits;
* fits of :math:`\log\eta^\star` against :math:`\log B` (:func:`fit_power_law`, :func:`fit_law`): free power laws
  :math:`\eta^\star\propto B^\alpha` over all :math:`B` and over :math:`B` below the measured
  :math:`B_\text{simple}` (the geometric mean of its values along the reference run) and a quarter of it, the
  linear and square-root laws there, McCandlish et al.'s SGD law and Li et al.'s surge law, with 95% t-intervals
  and percentile intervals from a bootstrap over seeds;
* the measured noise scale: :math:`B_\text{simple}` from exact per-example gradients over the evaluation set, at
  initialisation and along a training run at a reference batch size (and Adam-preconditioned, as Pollux does,
  for optimizers that keep a second moment ``nu``).

Optimizers (each with learning rate 1, so the step is :math:`\eta` times the transformation's output): ``sgd``
(``optax.sgd``, no momentum), ``adam`` (``optax.adam``), ``adabelief`` (:func:`adabatch.optimizers.adabelief` with
the official defaults) and ``sign`` (sign descent :math:`\theta\leftarrow\theta-\eta\,\operatorname{sign}\bar g`:
``optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(1.0))``, i.e. Adam with
:math:`\beta_1=\beta_2=\epsilon=0`, the optimizer of Li et al.'s analysis).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adabatch import stats as st
from adabatch.curvature import ModelLoss
from adabatch.experiments._io import json_safe, machine, save_figure
from adabatch.optimizers import ScaleByBeliefState
from adabatch.stats import grad_stats

if TYPE_CHECKING:
    from flax import linen as nn

__all__ = [
    "DATASETS",
    "OPTIMIZERS",
    "Grid",
    "default_grid",
    "fit_law",
    "fit_power_law",
    "make_optimizer",
    "optimal_learning_rates",
    "run",
]

OPTIMIZERS = ("sgd", "adam", "adabelief", "sign")
DATASETS = ("digits", "text")
LAWS = ("surge", "mccandlish")
# power-law fits of η*(B): key, largest B as a fraction of the typical B_simple (geometric mean over the reference
# run, initialisation included; None: all B), label
POWER_FITS = (
    ("power_law", None, "all B"),
    ("power_law_below_noise_scale", 1.0, "B ≤ B_simple"),
    ("power_law_well_below_noise_scale", 0.25, "B ≤ B_simple/4"),
)
# log2 learning-rate ranges of the default grids (wide enough that the optimum is inside for every batch size)
_LR_RANGES = {("digits", "sgd"): (-8.0, 4.0), ("digits", "adam"): (-13.0, -1.0), ("digits", "adabelief"): (-12.0, 3.0),
              ("digits", "sign"): (-16.0, -4.0), ("text", "sgd"): (-5.0, 5.0), ("text", "adam"): (-12.0, -2.0),
              ("text", "adabelief"): (-12.0, -2.0), ("text", "sign"): (-15.0, -5.0)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Grid:
    """One experiment's grid and budget."""

    batch_sizes: tuple[int, ...]
    learning_rates: tuple[float, ...]
    samples: int  # training examples per run (steps = samples // batch size)
    seeds: int  # initialisations / data orders, shared by all learning rates
    width: int  # hidden width (digits MLP) or model width (text transformer)
    eval_size: int  # examples the final loss and B_simple are measured on (0: the whole digits training set)
    checkpoints: int  # B_simple measurements along the reference run (besides initialisation)
    bootstrap: int  # bootstrap resamples over seeds


def default_grid(optimizer: str, data: str = "digits", quick: bool = False) -> Grid:
    """The default grid (≤ 20 minutes on 2 CPU cores) or the ``quick`` one (seconds, for tests)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}; got {optimizer!r}")
    if data not in DATASETS:
        raise ValueError(f"data must be one of {', '.join(map(repr, DATASETS))}; got {data!r}")
    lo, hi = _LR_RANGES[(data, optimizer)]
    if quick:
        lrs = 2.0 ** np.linspace(lo + 2, hi - 2, 5)
        return Grid((4, 16, 64), tuple(lrs), samples=256, seeds=2, width=8, eval_size=64, checkpoints=1, bootstrap=20)
    if data == "digits":
        lrs = 2.0 ** np.arange(lo, hi + 1e-9, 0.25)
        return Grid(tuple(2**k for k in range(11)), tuple(lrs), 8192, seeds=16, width=64, eval_size=0, checkpoints=8,
                    bootstrap=300)  # fmt: skip
    lrs = 2.0 ** np.arange(lo, hi + 1e-9, 0.5)
    return Grid(tuple(2**k for k in range(2, 9)), tuple(lrs), 4096, seeds=2, width=32, eval_size=256, checkpoints=4,
                bootstrap=300)  # fmt: skip


def make_optimizer(name: str) -> optax.GradientTransformation:
    """The optimizer with learning rate 1 (its step is linear in the learning rate; see the module docstring)."""
    if name == "sgd":
        return optax.sgd(1.0)
    if name == "adam":
        return optax.adam(1.0)
    if name == "adabelief":
        from adabatch.optimizers import adabelief

        return adabelief(1.0)
    if name == "sign":
        return optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(1.0))
    raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}; got {name!r}")


@dataclasses.dataclass(frozen=True)
class _Problem:
    loss_fn: Callable  # per-example losses
    init_fn: Callable  # key -> params
    x: jax.Array
    y: jax.Array
    eval_batch: tuple
    model_loss: ModelLoss | None = None  # the same per-example loss split into model and output loss (for the GGN)


def _problem(data: str, grid: Grid) -> _Problem:
    from adabatch.datasets import load_digits, load_text
    from adabatch.flax.models import MLP, TransformerLM, classification_loss, language_model_loss

    if data == "digits":
        split = load_digits()
        model: nn.Module = MLP(features=(grid.width,))
        make_loss = classification_loss
        output_loss = optax.softmax_cross_entropy_with_integer_labels
    else:
        split = load_text(seq_len=32)
        model = TransformerLM(d_model=grid.width, num_heads=2, num_layers=1, max_len=32)
        make_loss = language_model_loss

        def output_loss(logits, targets):
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets), axis=-1)

    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    n_eval = len(x) if grid.eval_size == 0 else min(grid.eval_size, len(x))
    model_loss = ModelLoss(functools.partial(_apply_params, model.apply), output_loss)
    return _Problem(
        make_loss(model.apply),
        lambda key: model.init(key, x[:1])["params"],
        x,
        y,
        (x[:n_eval], y[:n_eval]),
        model_loss,
    )


def _apply_params(apply_fn: Callable, params: Any, inputs: Any) -> Any:
    return apply_fn({"params": params}, inputs)


def _trainer(problem: _Problem, opt: optax.GradientTransformation):
    """``(params, opt_state, indices[steps, B], lr) -> (params, opt_state)``: one step per row of example indices."""

    def train(params, state, indices, lr):
        def step(carry, idx):
            params, state = carry
            grads = jax.grad(lambda p: jnp.mean(problem.loss_fn(p, (problem.x[idx], problem.y[idx]))))(params)
            updates, state = opt.update(grads, state, params)
            return (jax.tree_util.tree_map(lambda p, u: p + lr * u, params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, state), indices)
        return params, state

    return train


def _batches(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Example indices drawn uniformly with replacement, shape (steps, batch_size) (drawn on the host: the compiled
    training loop then holds no random-number generator, which keeps compilation fast)."""
    return np.random.default_rng([seed, batch_size]).integers(0, n, size=(steps, batch_size), dtype=np.int32)


def _initial_params(problem: _Problem, seeds: int):
    return jax.jit(jax.vmap(problem.init_fn))(jax.random.split(jax.random.key(0), seeds))


def _grid_losses(problem: _Problem, opt, batch_size: int, lrs: np.ndarray, grid: Grid, params0) -> np.ndarray:
    """Final evaluation loss, shape (seeds, learning rates); +inf where training diverged."""
    train = _trainer(problem, opt)
    steps = max(grid.samples // batch_size, 1)
    indices = np.stack([_batches(problem.x.shape[0], batch_size, steps, seed) for seed in range(grid.seeds)])

    def one(params, idx, lr):
        params, _ = train(params, opt.init(params), idx, lr)
        return jnp.mean(problem.loss_fn(params, problem.eval_batch))

    run_all = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, None, 0)), in_axes=(0, 0, None)))
    losses = np.asarray(run_all(params0, jnp.asarray(indices), jnp.asarray(lrs, jnp.float32)), np.float64)
    return np.where(np.isfinite(losses), losses, np.inf)


def optimal_learning_rates(lrs: Any, losses: Any) -> tuple[np.ndarray, np.ndarray]:
    r"""Sub-grid optimal learning rate per row of ``losses`` (batch sizes × learning rates), and edge flags.

    A parabola in :math:`\log_2\eta` is fitted by least squares to the finite losses within one octave of the grid
    minimum; its vertex is the optimum when the parabola is convex and the vertex lies in that window, else the grid
    minimum. ``at_edge`` is true where the grid minimum is the first or last learning rate (the optimum may lie
    outside the grid) or every run diverged.

    Example:
      >>> import numpy as np
      >>> from adabatch.experiments.lr_vs_batch import optimal_learning_rates
      >>> lrs = 2.0 ** np.arange(-6, 1)
      >>> lr, edge = optimal_learning_rates(lrs, [(np.log2(lrs) + 2.5) ** 2])
      >>> round(float(np.log2(lr[0])), 3), bool(edge[0])
      (-2.5, False)
    """
    x = np.log2(np.asarray(lrs, np.float64))
    losses = np.atleast_2d(np.asarray(losses, np.float64))
    best, edge = np.empty(len(losses)), np.zeros(len(losses), bool)
    for i, row in enumerate(losses):
        k = int(np.argmin(row))
        edge[i] = k in (0, len(x) - 1) or not np.isfinite(row[k])
        window = (np.abs(x - x[k]) <= 1.0 + 1e-9) & np.isfinite(row)
        best[i] = x[k]
        if window.sum() >= 3:
            a, b, _ = np.polyfit(x[window] - x[k], row[window], 2)
            if a > 0 and abs(-b / (2 * a)) <= 1.0:
                best[i] = x[k] - b / (2 * a)
    return 2.0**best, edge


def _t_quantile(dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def fit_power_law(batch_sizes: Any, lrs: Any) -> dict[str, Any]:
    r"""Least-squares fit of :math:`\log\eta^\star = c + \alpha\log B` with a 95% t-interval for :math:`\alpha`.

    Example:
      >>> from adabatch.experiments.lr_vs_batch import fit_power_law
      >>> fit = fit_power_law([1, 4, 16, 64], [0.01, 0.02, 0.04, 0.08])
      >>> round(fit["exponent"], 6)
      0.5
    """
    x, y = np.log(np.asarray(batch_sizes, float)), np.log(np.asarray(lrs, float))
    n = len(x)
    if n < 2:
        return {"exponent": None, "exponent_ci": None, "intercept": None, "rss": None, "n": n}
    design = np.stack([np.ones(n), x], 1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss = float(np.sum((y - design @ coef) ** 2))
    ci = None
    if n > 2:
        se = np.sqrt(rss / (n - 2) * np.linalg.inv(design.T @ design)[1, 1])
        half = _t_quantile(n - 2) * se
        ci = [float(coef[1] - half), float(coef[1] + half)]
    return {"exponent": float(coef[1]), "exponent_ci": ci, "intercept": float(coef[0]), "rss": rss, "n": n}


def _fixed_exponent(batch_sizes: Any, lrs: Any, exponent: float) -> dict[str, Any]:
    x, y = np.log(np.asarray(batch_sizes, float)), np.log(np.asarray(lrs, float))
    intercept = float(np.mean(y - exponent * x)) if len(x) else None
    rss = float(np.sum((y - exponent * x - intercept) ** 2)) if len(x) else None
    return {"exponent": exponent, "intercept": intercept, "rss": rss, "n": len(x)}


def _law_log(law: str, log_b: np.ndarray, log_eps: float, log_bn: float) -> np.ndarray:
    if law == "surge":
        return log_eps - np.log(0.5 * (np.exp(0.5 * (log_bn - log_b)) + np.exp(0.5 * (log_b - log_bn))))
    return log_eps - np.log1p(np.exp(log_bn - log_b))


def fit_law(law: str, batch_sizes: Any, lrs: Any) -> dict[str, Any]:
    r"""Fit ``"surge"`` (:math:`\epsilon_{\max}/\tfrac12(\sqrt{B_n/B}+\sqrt{B/B_n})`) or ``"mccandlish"``
    (:math:`\epsilon_{\max}/(1+B_n/B)`) to optimal learning rates by least squares in log space, with 95%
    t-intervals from the Jacobian (``None`` with fewer than 3 points).

    Example:
      >>> import numpy as np
      >>> from adabatch.experiments.lr_vs_batch import fit_law
      >>> b = np.array([1, 4, 16, 64, 256, 1024])
      >>> fit = fit_law("surge", b, 0.1 / (0.5 * (np.sqrt(50 / b) + np.sqrt(b / 50))))
      >>> round(fit["noise_scale"], 3), round(fit["max_learning_rate"], 5)
      (50.0, 0.1)
    """
    from scipy.optimize import least_squares

    if law not in LAWS:
        raise ValueError(f"law must be one of {', '.join(map(repr, LAWS))}; got {law!r}")
    log_b, y = np.log(np.asarray(batch_sizes, float)), np.log(np.asarray(lrs, float))
    n = len(y)
    if n < 2:
        return {"max_learning_rate": None, "noise_scale": None, "noise_scale_ci": None, "rss": None, "n": n}
    start = [float(np.max(y)), float(log_b[np.argmax(y)] if law == "surge" else np.median(log_b))]
    res = least_squares(lambda p: _law_log(law, log_b, *p) - y, start, bounds=([-50, -20], [50, 40]))
    rss = float(np.sum(res.fun**2))
    out: dict[str, Any] = {
        "max_learning_rate": float(np.exp(res.x[0])),
        "noise_scale": float(np.exp(res.x[1])),
        "rss": rss,
        "n": n,
    }
    out["max_learning_rate_ci"] = out["noise_scale_ci"] = None
    if n > 2:
        jac = res.jac
        try:
            cov = np.linalg.inv(jac.T @ jac) * rss / (n - 2)
            half = np.minimum(_t_quantile(n - 2) * np.sqrt(np.maximum(np.diag(cov), 0)), 600)  # exp stays finite
            out["max_learning_rate_ci"] = [float(np.exp(res.x[0] - half[0])), float(np.exp(res.x[0] + half[0]))]
            out["noise_scale_ci"] = [float(np.exp(res.x[1] - half[1])), float(np.exp(res.x[1] + half[1]))]
        except np.linalg.LinAlgError:
            pass
    return out


def _all_fits(batch_sizes: np.ndarray, lrs: np.ndarray, edge: np.ndarray, b_noise: float) -> dict[str, Any]:
    b, lr = batch_sizes[~edge], lrs[~edge]
    fits = {}
    for key, fraction, _ in POWER_FITS:
        keep = np.ones(len(b), bool) if fraction is None else b <= fraction * b_noise
        fits[key] = fit_power_law(b[keep], lr[keep])
    small = b <= POWER_FITS[-1][1] * b_noise  # the regime where the linear and sqrt laws are claimed
    return fits | {
        "linear": _fixed_exponent(b[small], lr[small], 1.0),
        "sqrt": _fixed_exponent(b[small], lr[small], 0.5),
        "surge": fit_law("surge", b, lr),
        "mccandlish": fit_law("mccandlish", b, lr),
    }


def _bootstrap(batch_sizes, lrs_grid, losses, b_noise, resamples, seed=0) -> dict[str, Any]:
    """Percentile 95% intervals of the fitted quantities, and of each η*(B), over resampled seeds."""
    rng = np.random.default_rng(seed)
    seeds = losses.shape[1]
    draws: dict[str, list] = {key: [] for key in [k for k, _, _ in POWER_FITS] + list(LAWS) + ["lr"]}
    for _ in range(resamples):
        mean = losses[:, rng.integers(0, seeds, seeds), :].mean(1)
        lr, edge = optimal_learning_rates(lrs_grid, mean)
        draws["lr"].append(lr)
        if (~edge).sum() < 3:
            continue
        fits = _all_fits(batch_sizes, lr, edge, b_noise)
        for key, _, _ in POWER_FITS:
            draws[key].append(fits[key]["exponent"])
        for law in LAWS:
            draws[law].append(fits[law]["noise_scale"])

    def interval(values):
        values = [v for v in values if v is not None]
        return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) >= 2 else None

    return {
        "resamples": resamples,
        **{f"{key}_exponent_ci": interval(draws[key]) for key, _, _ in POWER_FITS},
        **{f"{law}_noise_scale_ci": interval(draws[law]) for law in LAWS},
        "learning_rate_ci": np.percentile(np.array(draws["lr"]), [2.5, 97.5], axis=0).T.tolist(),
    }


def _measured_b_simple(problem: _Problem, params, opt_state, *, preconditioned: bool, population: bool) -> dict:
    """B_simple on the evaluation set from exact per-example gradients (and Adam-preconditioned, with the optimizer's
    own second moment, when asked and available). When the evaluation set is the whole training set (the population
    batches are drawn from) its mean is the true gradient and its covariance divides by n; otherwise the unbiased
    estimators of :mod:`adabatch.stats` are used."""
    # without return_losses/return_report, grad_stats returns the GradStats alone
    stats = cast(
        st.GradStats, grad_stats(problem.loss_fn, params, problem.eval_batch, chunk_size=128, sq_sum=preconditioned)
    )

    def b_simple(s):
        if population:
            n = jnp.asarray(s.count, jnp.float32)
            return st.clamp_noise_scale(st.trace_covariance(s) * (n - 1) / n, st.mean_sq_norm(s))
        return st.clamp_noise_scale(*st.estimate_from_stats(s))

    value, clamped = b_simple(stats)
    out = {"b_simple": value, "clamped": clamped}
    nu_state = next((s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_has_nu) if _has_nu(s)), None)
    if preconditioned and nu_state is not None:
        eps = 1e-16 if isinstance(nu_state, ScaleByBeliefState) else 1e-8  # AdaBelief's default ε
        inverse = st.adam_preconditioner(nu_state.nu, nu_state.count, b2=0.999, eps=eps)
        out["b_simple_preconditioned"], out["clamped_preconditioned"] = b_simple(st.precondition(stats, inverse))
    return out


def _has_nu(node) -> bool:
    return hasattr(node, "_fields") and "nu" in node._fields and "count" in node._fields


def _noise_scale_run(problem, opt, name, batch_size, lr, grid, params0) -> dict[str, Any]:
    """B_simple at initialisation and at ``checkpoints`` equally spaced points of one training run (seed 0)."""
    steps = max(grid.samples // batch_size // grid.checkpoints, 1)
    train = jax.jit(_trainer(problem, opt))
    params = jax.tree_util.tree_map(lambda p: p[0], params0)
    state = opt.init(params)
    preconditioned = name in ("adam", "adabelief")
    population = grid.eval_size == 0 or grid.eval_size >= problem.x.shape[0]
    measure = jax.jit(
        functools.partial(_measured_b_simple, problem, population=population), static_argnames="preconditioned"
    )
    first = _as_floats(measure(params, state, preconditioned=preconditioned))  # one compilation for every point
    points = [{"samples": 0, **{k: v for k, v in first.items() if "preconditioned" not in k}}]  # Adam's v is empty
    indices = _batches(problem.x.shape[0], batch_size, steps * grid.checkpoints, seed=10_000)
    for i in range(grid.checkpoints):
        params, state = train(params, state, jnp.asarray(indices[i * steps : (i + 1) * steps]), jnp.float32(lr))
        point = _as_floats(measure(params, state, preconditioned=preconditioned))
        points.append({"samples": (i + 1) * steps * batch_size, **point})
    values = np.array([p["b_simple"] for p in points])
    pre = [p["b_simple_preconditioned"] for p in points if "b_simple_preconditioned" in p]
    return {
        "range_preconditioned": [float(min(pre)), float(max(pre))] if pre else [None, None],
        "batch_size": batch_size,
        "learning_rate": lr,
        "estimator": "population (whole training set)" if population else "unbiased (sample of the training set)",
        "points": points,
        "init": float(values[0]),
        "final": float(values[-1]),
        "range": [float(values.min()), float(values.max())],
        "geometric_mean": float(np.exp(np.mean(np.log(values)))),
    }


def _as_floats(tree: dict) -> dict:
    return {k: (bool(v) if jnp.result_type(v) == jnp.bool_ else float(v)) for k, v in tree.items()}


def _verdict(fits: dict, noise: dict) -> list[str]:
    lines = []

    for key, _, label in POWER_FITS:
        ci = fits[key]["exponent_ci"]
        if ci is None:
            lines.append(f"exponent ({label}): too few points for an interval")
            continue
        tags = [name for name, a in (("linear", 1.0), ("sqrt", 0.5)) if ci[0] <= a <= ci[1]]
        lines.append(
            f"exponent ({label}) = {fits[key]['exponent']:.2f}, 95% CI [{ci[0]:.2f}, {ci[1]:.2f}]: "
            + (f"consistent with {' and '.join(tags)}" if tags else "rejects both linear (1) and sqrt (0.5)")
        )
    for law in LAWS:
        fit = fits[law]
        if fit["noise_scale_ci"] is None:
            continue
        lo, hi = fit["noise_scale_ci"]
        parts = []
        for name, (a, b) in (
            ("B_simple", noise["range"]),
            ("preconditioned", noise.get("range_preconditioned", (None, None))),
        ):
            if a is not None:
                parts.append(
                    f"measured {name} {a:.3g}..{b:.3g} ({'overlaps' if lo <= b and a <= hi else 'no overlap'})"
                )
        lines.append(f"{law} B_noise = {fit['noise_scale']:.3g}, 95% CI [{lo:.3g}, {hi:.3g}]; " + "; ".join(parts))
    return lines


def _plot(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{result['optimizer']} on {result['data']}, {result['grid']['samples']} samples"
    b = np.array(result["batch_sizes"])
    lrs = np.array(result["learning_rates"])
    mean = np.array(result["losses"]).mean(1)
    opt = result["optimal"]
    colors = plt.cm.viridis(np.linspace(0, 0.95, len(b)))
    files: list[str] = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    finite = np.where(np.isfinite(mean), mean, np.nan)
    top = min(np.nanmax(finite), 10 * np.nanmin(finite, axis=1).max())
    for i, c in enumerate(colors):
        ax.plot(
            lrs, np.where(np.isfinite(mean[i]), np.minimum(mean[i], top), np.nan), color=c, lw=1.2, label=f"B={b[i]}"
        )
        ax.axvline(opt["learning_rate"][i], color=c, lw=0.6, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final training loss", title=title)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out, "loss_vs_lr.png", files)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lr, edge = np.array(opt["learning_rate"]), np.array(opt["at_edge"])
    ci = np.array(result["bootstrap"]["learning_rate_ci"])
    yerr = np.maximum([lr[~edge] - ci[~edge, 0], ci[~edge, 1] - lr[~edge]], 0)  # a percentile CI may exclude lr
    ax.errorbar(b[~edge], lr[~edge], yerr=yerr, fmt="ko", ms=4, capsize=2, label="optimal lr (95% bootstrap)")
    if edge.any():
        ax.plot(b[edge], lr[edge], "x", color="gray", label="at grid edge (not fitted)")
    bb = np.geomspace(b.min(), b.max(), 200)
    fits = result["fits"]
    if fits["power_law"]["exponent"] is not None:
        p = fits["power_law"]
        ax.plot(bb, np.exp(p["intercept"]) * bb ** p["exponent"], "C0-", lw=1, label=f"power law α={p['exponent']:.2f}")
    for key, style in (("linear", "C1--"), ("sqrt", "C2--")):
        if fits[key]["n"] >= 2:
            ax.plot(
                bb,
                np.exp(fits[key]["intercept"]) * bb ** fits[key]["exponent"],
                style,
                lw=1,
                label=f"{key} law ({POWER_FITS[-1][2]})",
            )
    for law, style in (("surge", "C3-"), ("mccandlish", "C4-.")):
        f = fits[law]
        if f["noise_scale"] is not None:
            y = np.exp(_law_log(law, np.log(bb), np.log(f["max_learning_rate"]), np.log(f["noise_scale"])))
            ax.plot(bb, y, style, lw=1.2, label=f"{law}: B_noise={f['noise_scale']:.3g}")
    rng = result["noise_scale"]["range"]
    ax.axvspan(rng[0], rng[1], color="C3", alpha=0.12, label="measured B_simple (training)")
    pre = result["noise_scale"]["range_preconditioned"]
    if pre[0] is not None:
        ax.axvspan(pre[0], pre[1], color="C0", alpha=0.08, label="measured B_simple, Adam-preconditioned")
    ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="optimal learning rate", title=title)
    ax.set_xlim(b.min() / 1.5, b.max() * 1.5)  # a measured B_simple outside the grid is in the summary table
    ax.set_ylim(lr.min() / 4, lr.max() * 4)
    ax.legend(fontsize=7)
    save_figure(fig, out, "lr_vs_batch.png", files)
    return files


def _summary(result: dict[str, Any]) -> str:
    fits, boot, noise = result["fits"], result["bootstrap"], result["noise_scale"]

    def fmt(ci, spec=".2f"):
        return "n/a" if ci is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"

    rows = [
        f"# lr-vs-batch: {result['optimizer']} on {result['data']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} CPUs, "
        f"{result['machine']['platform']}, jax {result['machine']['jax']}; wall time {result['elapsed_s']:.0f} s",
        "",
        "| B | optimal lr | 95% bootstrap | loss | at edge |",
        "|---|---|---|---|---|",
    ]
    opt = result["optimal"]
    for i, b in enumerate(result["batch_sizes"]):
        lo, hi = boot["learning_rate_ci"][i]
        rows.append(f"| {b} | {opt['learning_rate'][i]:.4g} | [{lo:.3g}, {hi:.3g}] | {opt['loss'][i]:.4f} | "
                    f"{'yes' if opt['at_edge'][i] else ''} |")  # fmt: skip
    rows += ["", f"B_simple below is {noise['geometric_mean']:.3g}, the geometric mean of the measured values.", ""]
    rows += ["| fit | value | 95% t-interval | 95% bootstrap | RSS (log) |", "|---|---|---|---|---|"]
    for key, _, label in POWER_FITS:
        f = fits[key]
        value = "n/a" if f["exponent"] is None else f"{f['exponent']:.3f} (n={f['n']})"
        rss = "" if f["rss"] is None else round(f["rss"], 3)
        rows.append(
            f"| exponent α, {label} | {value} | {fmt(f['exponent_ci'])} | {fmt(boot[key + '_exponent_ci'])} | {rss} |"
        )
    for key, name in (("linear", "linear law (α=1)"), ("sqrt", "sqrt law (α=½)")):
        rss = fits[key]["rss"]
        rows.append(f"| {name}, {POWER_FITS[-1][2]} | | | | {'' if rss is None else round(rss, 3)} |")
    for law in LAWS:
        f = fits[law]
        if f["noise_scale"] is not None:
            rows.append(f"| {law} B_noise (ε_max={f['max_learning_rate']:.3g}) | {f['noise_scale']:.3g} | "
                        f"{fmt(f['noise_scale_ci'], '.3g')} | {fmt(boot[law + '_noise_scale_ci'], '.3g')} | "
                        f"{round(f['rss'], 3)} |")  # fmt: skip
    rows += [
        "",
        f"Measured B_simple ({noise['estimator']}; B={noise['batch_size']}, lr={noise['learning_rate']:.3g}):",
        "",
    ]
    rows += ["| samples seen | B_simple | Adam-preconditioned |", "|---|---|---|"]
    for p in noise["points"]:
        pre = p.get("b_simple_preconditioned")
        rows.append(f"| {p['samples']} | {p['b_simple']:.3g} | {'' if pre is None else f'{pre:.3g}'} |")
    rows += ["", "Verdict:", ""] + [f"- {line}" for line in result["verdict"]]
    return "\n".join(rows) + "\n"


def run(
    optimizer: str,
    data: str = "digits",
    *,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    grid: Grid | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run the grid, the fits and the noise-scale measurement; write ``results.json``, ``summary.md`` and PNG plots
    to ``out`` (when given). Returns the results dictionary."""
    grid = default_grid(optimizer, data, quick) if grid is None else grid
    start = time.time()
    problem = _problem(data, grid)
    opt = make_optimizer(optimizer)
    lrs = np.asarray(grid.learning_rates, np.float64)
    batch_sizes = np.asarray(grid.batch_sizes)
    iterator = grid.batch_sizes
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"lr-vs-batch {optimizer}/{data}", unit="batch size")
    params0 = _initial_params(problem, grid.seeds)
    losses = np.stack([_grid_losses(problem, opt, b, lrs, grid, params0) for b in iterator])  # (B, seeds, lrs)
    mean = losses.mean(1)
    lr_star, edge = optimal_learning_rates(lrs, mean)
    ref = int(batch_sizes[len(batch_sizes) // 2])
    noise = _noise_scale_run(problem, opt, optimizer, ref, float(lr_star[len(batch_sizes) // 2]), grid, params0)
    fits = _all_fits(batch_sizes, lr_star, edge, noise["geometric_mean"])
    result = {
        "optimizer": optimizer,
        "data": data,
        "command": command
        or f"adabatch experiment lr-vs-batch --optimizer {optimizer} --data {data}" + (" --quick" if quick else ""),
        "grid": dataclasses.asdict(grid),
        "machine": machine(),
        "batch_sizes": batch_sizes.tolist(),
        "learning_rates": lrs.tolist(),
        "losses": losses.tolist(),
        "optimal": {
            "learning_rate": lr_star.tolist(),
            "loss": [float(np.min(row)) for row in mean],
            "at_edge": edge.tolist(),
        },
        "fits": fits,
        "bootstrap": _bootstrap(batch_sizes, lrs, losses, noise["geometric_mean"], grid.bootstrap),
        "noise_scale": noise,
    }
    result["verdict"] = _verdict(fits, noise)
    result["elapsed_s"] = time.time() - start
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps(json_safe(result), indent=1, allow_nan=False)
        )  # first: plots may fail
        (out / "summary.md").write_text(_summary(result))
        result["plots"] = _plot(dict(result, losses=np.where(np.isfinite(losses), losses, np.inf).tolist()), out)
        (out / "results.json").write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
    return result
