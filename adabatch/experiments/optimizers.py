r"""Every optimizer of the library compared, with a fixed batch and with the norm test, at equal sample budgets.

Arms: each optimizer of ``OPTIMIZERS`` (their official defaults; only the learning rate is tuned) with

* ``fixed``: a fixed batch of ``batch_size`` examples;
* ``norm``: the norm test (:func:`adabatch.rules.norm_test`, constant ``eta``) starting from that batch, capped at
  the training set;

and SGD with the learned optimal batch size (:func:`adabatch.rules.optimal_batch_rule`, arm ``optimal``) with the
paper's step size :math:`\gamma_k` times the tuned learning rate. For a network the rule's constants are knobs: with
:math:`L = L_{\max} = \mu = 1` the rule asks for :math:`\tau^\star \approx 2\hat h/\epsilon` (:math:`\hat h` the
mean per-example squared gradient norm) and its step is :math:`\gamma = 1/2` at :math:`b \ge \tau^\star`;
:math:`\epsilon` is set so that :math:`\tau^\star` at initialisation is ``optimal_batch_at_init``.

Besides the default set, ``--optimizers`` (``Protocol.optimizers``) selects any of ``LEARNING_RATES``, among
them ``EXTRA_OPTIMIZERS``: EXTRAP-SGD (its gradient at the extrapolated point computed by the engine, a second
backward pass per step) and the SLQ learner (:func:`adabatch.curvature.slq_learner`, its Hessian spectrum computed
by the engine every ``interval`` steps), whose "learning rate" is the safety factor :math:`s` of its map —
``slq_learner`` keeps the default :math:`s = 0.25` (untuned), ``slq_learner_tuned`` tunes it on the grid.

Every arm runs for exactly ``epochs`` passes over the training set (the last batch is cut to the budget), in one
compiled ``lax.scan`` per (optimizer, batching) (``adabatch.experiments._variable_batch``). The learning rate is
an argument of each optimizer's factory (a traced value inside the compiled run), so no optimizer needs to be linear
in it. Eve and CLARS read per-example statistics (``sq_sum``, ``leaf_sq_norm_sum``); the run computes the ones the
transformation declares (:func:`adabatch.stats.declared_needs`) and passes them as ``grad_stats=``.

Every arm gets the learning rate of its grid (powers of two, one grid per optimizer wide enough for both batchings)
with the lowest mean final validation loss over ``tuning_seeds`` seeds that are not evaluation seeds; it then runs
on ``seeds`` evaluation seeds. Every arm of one seed sees the same initialisation and the same example stream, so
comparisons are paired by seed. The data, the model and the validation split are those of
:mod:`adabatch.experiments.adadagrad` (:func:`~adabatch.experiments.adadagrad.problem`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adabatch import curvature, rules
from adabatch import optimizers as opt
from adabatch import stats as st
from adabatch.experiments import _optimizers_report as report
from adabatch.experiments import _protocol
from adabatch.experiments._io import machine
from adabatch.experiments._variable_batch import Problem, Run, make_run, record
from adabatch.experiments.adadagrad import problem

__all__ = [
    "BATCHINGS",
    "DATASETS",
    "EXTRA_OPTIMIZERS",
    "LEARNING_RATES",
    "OPTIMIZERS",
    "Arm",
    "Protocol",
    "arms",
    "build",
    "default_protocol",
    "optimal_accuracy",
    "reanalyse",
    "run",
    "write",
]

DATASETS = ("digits", "text")
# Adam first: its fixed-batch arm sets the common target.
OPTIMIZERS = (
    "adam",
    "adagrad",
    "adagrad_norm",
    "adabelief",
    "sgd_momentum",
    "sgd",
    "eve",
    "tom",
    "maxva",
    "active_adam",
    "adalomo",
    "clars",
)
BATCHINGS = ("fixed", "norm", "optimal")  # "optimal" (the learned optimal batch size) only with plain SGD


def _grid(lo: int, hi: int) -> tuple[float, ...]:
    return tuple(float(v) for v in 2.0 ** np.arange(lo, hi + 1))


_ADAM_LIKE = _grid(-12, -4)
LEARNING_RATES: dict[str, tuple[float, ...]] = {
    "adam": _ADAM_LIKE,
    "adagrad": _grid(-7, 0),
    "adagrad_norm": _grid(-2, 5),
    "adabelief": _ADAM_LIKE,
    "sgd_momentum": _grid(-9, -2),
    "sgd": _grid(-6, 1),
    "eve": _ADAM_LIKE,
    "tom": _ADAM_LIKE,
    "maxva": _ADAM_LIKE,
    "active_adam": _grid(-16, -4),  # its gain grows along the run: the optimum sits far below Adam's
    "adalomo": _grid(-11, -3),
    "clars": _grid(-10, -3),
    # The SLQ learner learns its step size: its "learning rate" is the safety factor s of its map (α ≈ 4s/λ_max).
    # "slq_learner" keeps the library's default s (no tuning); "slq_learner_tuned" tunes s like a learning rate.
    "slq_learner": (0.25,),
    "slq_learner_tuned": _grid(-6, -1),
    "extrap_sgd": _grid(-9, -2),  # Nesterov momentum 0.9 like sgd_momentum: the same grid
}
# Optimizers the experiment can run besides the default set (``--optimizers``).
EXTRA_OPTIMIZERS = ("slq_learner", "slq_learner_tuned", "extrap_sgd")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One experiment's settings (see the module docstring)."""

    data: str
    epochs: float  # budget in passes over the training set, the same for every arm
    batch_size: int  # the fixed batch, and the rules' initial batch
    eta: float  # the norm test's constant
    optimal_batch_at_init: int  # τ* of the optimal-batch rule at initialisation (sets its ε)
    learning_rates: tuple[tuple[str, tuple[float, ...]], ...]  # grid per optimizer
    tuning_seeds: int
    seeds: int
    sample_evals: int
    width: int
    target_tolerance: float  # the target is Adam's fixed-batch final test metric less this (plus, for a loss)
    optimizers: tuple[str, ...] = OPTIMIZERS
    batchings: tuple[str, ...] = BATCHINGS
    active_period: int = 100  # ActiveLR's period in steps (the command line's constant)
    train_examples: int = 0  # use only the first this many training examples (0: all)
    max_batch_size: int = 0  # the rules' cap (0: the whole training set)
    only: tuple[str, ...] = ()  # run only these arms (names "optimizer/batching"; empty: every arm)

    def lrs(self, optimizer: str) -> tuple[float, ...]:
        return dict(self.learning_rates)[optimizer]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One optimizer with one way of choosing the batch size."""

    optimizer: str  # one of OPTIMIZERS
    batching: str  # one of BATCHINGS

    @property
    def name(self) -> str:
        return f"{self.optimizer}/{self.batching}"


def default_protocol(data: str = "digits", quick: bool = False) -> Protocol:
    """The full protocol (about 15 minutes on 2 CPU cores for digits) or the ``quick`` one (seconds, for tests)."""
    if data not in DATASETS:
        raise ValueError(f"data must be one of {', '.join(map(repr, DATASETS))}; got {data!r}")
    lrs = tuple(LEARNING_RATES.items())
    if quick:
        # Adam (the target), Eve (sq_sum statistics), CLARS under the norm test (per-leaf statistics and a rule) and
        # SGD with the optimal batch: every code path, four compilations.
        return Protocol(data, epochs=2, batch_size=8, eta=1.4, optimal_batch_at_init=16,
                        learning_rates=tuple((k, v[3:6:2] or v[:1]) for k, v in lrs), tuning_seeds=1, seeds=2,
                        sample_evals=4, width=8, target_tolerance=0.05,
                        only=("adam/fixed", "eve/fixed", "clars/norm", "sgd/optimal"), train_examples=128,
                        max_batch_size=32)  # fmt: skip
    if data == "digits":
        return Protocol(data, epochs=40, batch_size=8, eta=1.4, optimal_batch_at_init=32, learning_rates=lrs,
                        tuning_seeds=2, seeds=5, sample_evals=40, width=32, target_tolerance=0.01)  # fmt: skip
    return Protocol(data, epochs=1, batch_size=8, eta=1.4, optimal_batch_at_init=32,
                    learning_rates=tuple((k, v[1::2] or v[:1]) for k, v in lrs), tuning_seeds=1, seeds=3,
                    sample_evals=20, width=32, target_tolerance=0.05, max_batch_size=512)  # fmt: skip


def arms(protocol: Protocol) -> list[Arm]:
    """Every (optimizer, batching) of the protocol (only those named in ``protocol.only`` when it is not empty);
    ``optimal`` only with plain SGD. Adam's fixed arm comes first."""
    out = []
    for name in protocol.optimizers:
        for batching in protocol.batchings:
            if batching != "optimal" or name == "sgd":
                out.append(Arm(name, batching))
    return [a for a in out if not protocol.only or a.name in protocol.only]


def build(optimizer: str, learning_rate: Any, *, active_period: int = 100) -> optax.GradientTransformation:
    """The optimizer with its official defaults and ``learning_rate`` (a float or a traced scalar).

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.experiments.optimizers import build
      >>> tx = build("sgd_momentum", 0.1)
      >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> updates.tolist()
      [-0.10000000149011612, -0.10000000149011612]
    """
    lr = learning_rate
    factories: dict[str, Callable[[], optax.GradientTransformation]] = {
        "adam": lambda: optax.adam(lr),
        "adagrad": lambda: opt.adagrad(lr),
        "adagrad_norm": lambda: opt.adagrad_norm(lr),
        "adabelief": lambda: opt.adabelief(lr),
        "sgd_momentum": lambda: optax.sgd(lr, momentum=0.9),
        "sgd": lambda: optax.sgd(lr),
        "eve": lambda: opt.eve(lr),
        "tom": lambda: opt.tom(lr),
        "maxva": lambda: opt.maxva(lr),
        "active_adam": lambda: opt.active_adam(lr, period=active_period),
        "adalomo": lambda: opt.adalomo(lr),
        "clars": lambda: opt.clars(lr),
        "slq_learner": lambda: curvature.slq_learner(safety=lr),
        "slq_learner_tuned": lambda: curvature.slq_learner(safety=lr),
        "extrap_sgd": lambda: opt.extrap_sgd(lr),
    }
    if optimizer not in factories:
        choices = ", ".join(map(repr, OPTIMIZERS + EXTRA_OPTIMIZERS))
        raise ValueError(f"optimizer must be one of {choices}; got {optimizer!r}")
    return factories[optimizer]()


def optimal_accuracy(h: float, n: int, tau: float) -> float:
    r"""The rule's :math:`\epsilon` for which :math:`\tau^\star(h) = \tau` when :math:`L = L_{\max} = \mu = 1`:
    :math:`\tau^\star = 2hn/(2h + \epsilon(n-1))`, so :math:`\epsilon = 2h(n-\tau)/(\tau(n-1))`.

    Example:
      >>> from adabatch.experiments.optimizers import optimal_accuracy
      >>> from adabatch.rules import optimal_batch_size
      >>> eps = optimal_accuracy(13.0, 1000, 32)
      >>> kw = dict(num_examples=1000, smoothness=1.0, max_smoothness=1.0, strong_convexity=1.0, accuracy=eps)
      >>> round(float(optimal_batch_size(13.0, **kw)), 3)
      32.0
    """
    return 2.0 * h * (n - tau) / (tau * (n - 1))


def _rule(arm: Arm, protocol: Protocol, n: int, cap: int, accuracy: float) -> optax.GradientTransformationExtraArgs:
    if arm.batching == "norm":
        return rules.norm_test(protocol.eta, max_batch_size=cap, init_batch_size=protocol.batch_size)
    return rules.optimal_batch_rule(
        n, 1.0, 1.0, 1.0, accuracy, apply_step_size=True, max_batch_size=cap, init_batch_size=protocol.batch_size
    )


def _spec(arm: Arm, protocol: Protocol, n: int, params: Any, accuracy: float) -> Run:
    cap = protocol.max_batch_size or n
    if arm.batching == "fixed":
        make_tx: Callable[[Any], optax.GradientTransformation] = lambda lr: build(  # noqa: E731
            arm.optimizer, lr, active_period=protocol.active_period
        )
    else:
        make_tx = lambda lr: optax.chain(  # noqa: E731
            _rule(arm, protocol, n, cap, accuracy), build(arm.optimizer, lr, active_period=protocol.active_period)
        )
    needs: st.GradStatsNeeds | None = st.declared_needs(make_tx(1e-3).init(params))
    if arm.batching == "fixed" and needs == st.GradStatsNeeds():
        needs = None  # the mean gradient is all the optimizer reads
    return Run(
        make_tx=make_tx,
        rule=arm.batching != "fixed",
        needs=needs,
        min_batch_size=protocol.batch_size,
        max_batch_size=cap,
        samples=int(round(protocol.epochs * n)),
        sample_evals=protocol.sample_evals,
        measure_noise_scale=False,
    )


_H_EXAMPLES = 1024  # h at initialisation is measured on the first this many training examples


def _mean_sq_norm(loss_fn: Callable, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """The mean per-example squared gradient norm over ``(x, y)`` (the optimal-batch rule's noise :math:`h`)."""
    stats = st.grad_stats(loss_fn, params, (x, y))
    assert isinstance(stats, st.GradStats)
    return stats.sq_norm_sum / stats.count


class _Runner:
    """Compiles each arm once and runs (arm, learning rate, seed) triples; the learning rate is the traced
    ``constant`` of the compiled run (its own ``lr`` multiplier stays 1)."""

    def __init__(self, protocol: Protocol, prob: Problem):
        self.protocol, self.problem = protocol, prob
        self.n = int(prob.x.shape[0])
        self.compiled: dict[str, Callable] = {}
        self.seed_data = _protocol.SeedData(prob, int(round(protocol.epochs * self.n)))
        params, _ = self.seed_data(_protocol.TUNING_SEED_OFFSET)
        k = min(self.n, _H_EXAMPLES)
        self.h_init = float(jax.jit(_mean_sq_norm, static_argnums=0)(prob.loss_fn, params, prob.x[:k], prob.y[:k]))
        self.accuracy = optimal_accuracy(self.h_init, self.n, protocol.optimal_batch_at_init)

    def __call__(self, arm: Arm, lr: float, seed: int) -> dict[str, Any]:
        params, order = self.seed_data(seed)
        if arm.name not in self.compiled:
            self.compiled[arm.name] = make_run(self.problem, _spec(arm, self.protocol, self.n, params, self.accuracy))
        one = jnp.float32(1.0)
        out = self.compiled[arm.name](
            params, order, one, jnp.float32(lr), jnp.int32(self.protocol.batch_size), jnp.int32(0), jnp.bool_(False)
        )
        return record(jax.device_get(out))


def _bind(runner: _Runner, arm: Arm) -> Callable[[float, int, bool], dict]:
    """``run_one(lr, seed, tuning)`` of :func:`adabatch.experiments._protocol.tune_and_run` for one arm."""

    def run_one(lr: float, seed: int, tuning: bool) -> dict:
        return runner(arm, lr, seed)

    return run_one


def run(
    data: str = "digits",
    *,
    quick: bool = False,
    out: str | Path | None = None,
    protocol: Protocol | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run every arm, analyse, and write ``results.json``, ``summary.md`` and PNG plots to ``out`` (when given).

    Returns the results dictionary (the same as ``results.json``).
    """
    if protocol is None:
        protocol = default_protocol(data, quick)
    start = time.time()
    prob = problem(protocol.data, protocol.width, protocol.train_examples)
    runner = _Runner(protocol, prob)
    all_arms = arms(protocol)
    journal = _protocol.journal_path(out)
    bind = lambda arm: _bind(runner, arm)  # noqa: E731
    results = _protocol.run_arms(all_arms, bind, protocol, progress, "optimizers experiment", journal)
    default = f"adabatch experiment optimizers --data {protocol.data}" + (" --quick" if quick else "")
    result: dict[str, Any] = {
        "experiment": "optimizers",
        "command": command or default,
        "protocol": dataclasses.asdict(protocol),
        "training_examples": runner.n,
        "max_batch_size": protocol.max_batch_size or runner.n,
        "metric": prob.metric,
        "higher_is_better": prob.higher_is_better,
        "optimal_rule": {
            "h_init": runner.h_init,
            "accuracy": runner.accuracy,
            "smoothness": 1.0,
            "max_smoothness": 1.0,
            "strong_convexity": 1.0,
        },  # fmt: skip
        "machine": machine(),
        "arms": results,
        "compilations": len(runner.compiled),
    }
    return _protocol.finish(result, report, start, out)


def write(result: dict[str, Any], out: str | Path) -> None:
    """Write ``results.json`` (first: plotting may fail), the PNG plots and ``summary.md`` to ``out``."""
    _protocol.write(result, out, report)


def reanalyse(out: str | Path) -> dict[str, Any]:
    """Recompute the analysis, plots and summary of an existing ``out/results.json`` without training."""
    return _protocol.reanalyse(out, report)
