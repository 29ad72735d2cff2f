r"""Do AdAdaGrad's claims hold? Every batch-size test with AdaGrad and AdaGrad-Norm against fixed batches, a
batch-size warm-up and AdaScale, at equal sample budgets.

Lau, Liu and Kolar claim that their adaptive batch-size tests, with AdaGrad or AdaGrad-Norm, grow the batch
*incrementally* and reach the accuracy of small-batch training in far fewer steps, and that the coordinate-wise
test suits coordinate-wise AdaGrad. This experiment runs the protocol of the authors' code
(``timlautk/AdAdaGrad``, ``expt.sh`` for MNIST), transposed to scikit-learn's digits:

* initial batch size 8 (the authors' CNN; 2 for their logistic regression), here 8;
* maximal batch size: the training set (60,000 for MNIST), here 1,150;
* the test runs every step, as in the authors' code;
* η = 0.1 for the norm and coordinate tests, θ = ν = 0.1 (the command-line defaults) for the inner-product tests,
  then a sweep of the constant from 0.1 to 2;
* budget: 100 epochs for the authors, here ``epochs`` (40: the small-batch baseline has converged);
* learning rate: the authors' 8e-3, constant, for AdaGrad; here tuned per arm on one grid per optimizer;
* AdaGrad with ``torch.optim.Adagrad`` semantics (v₀ = 0, ε = 1e-10 outside the square root), as
  :func:`adabatch.adagrad`.

``data="digits-cnn"`` runs it on the digits CNN of the benchmarks (the authors' MNIST model is a CNN) with fewer
arms and a budget of 20 epochs, since a rule-driven CNN run costs tens of times an MLP run: fixed batches 8, 32,
128, 512, a warm-up doubling every 64 steps, no AdaScale, the norm test and the noise-scale rule at η ∈ {0.1, 1, 2},
every other learning rate of the grid and one tuning seed. ``data="text"`` runs the pydoc-text transformer LM for
one epoch (cap 512).

The data set size does not transpose, so the cap and the budget are stated relative to it (the whole training set;
epochs). 288 of the 1,438 digits training examples are held out as a validation set that tunes the learning rates;
the 359 test examples are only reported.

Arms (each run for exactly the same number of examples; the last batch is cut to the budget):

* ``fixed-B``: a fixed batch ``B`` for every size in ``fixed_batch_sizes`` (the small baseline is the first), with
  AdaGrad and with AdaGrad-Norm;
* ``warmup-k``: the batch doubles every ``k`` steps from the initial size to the cap (the warm-up recipe of
  large language-model training), with both optimizers;
* ``adascale-B``: SGD with AdaScale's gain at a fixed batch ``B`` (base batch the initial size), against
  ``fixed-8/sgd``;
* ``<test>/<optimizer>``: the norm, inner-product, augmented inner-product and coordinate-wise tests and the
  noise-scale rule (:func:`adabatch.rules.noise_scale_rule`, multiplier :math:`c = 1/\eta^2` so that it asks for
  the same :math:`B_\text{simple}/\eta^2` as the norm test with its smoothed estimate) with both optimizers, at
  the authors' constant and at each constant of the sweep.

Every (arm, constant) gets its own learning rate: the grid value with the lowest mean final validation loss over
``tuning_seeds`` seeds that are *not* the evaluation seeds. It is then run on ``seeds`` evaluation seeds, which fix
the initialisation and the order of the examples; every arm of one seed sees the same initialisation and the same
example stream (common random numbers), so comparisons are paired by seed.
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

from adabatch import rules
from adabatch import stats as st
from adabatch.experiments import _adadagrad_report as report
from adabatch.experiments import _protocol
from adabatch.experiments._io import machine
from adabatch.experiments._variable_batch import Problem, Run, make_run, record
from adabatch.optimizers import adagrad, adagrad_norm
from adabatch.scaling import adascale

__all__ = [
    "DATASETS",
    "OPTIMIZERS",
    "RULES",
    "Arm",
    "Protocol",
    "arms",
    "default_protocol",
    "problem",
    "reanalyse",
    "run",
    "write",
]

DATASETS = ("digits", "digits-cnn", "text")
OPTIMIZERS = ("adagrad", "adagrad_norm")
RULES = ("norm", "inner_product", "augmented_inner_product", "coordinate_norm", "noise_scale")
AUTHORS_CONSTANT = 0.1  # η of expt.sh (MNIST); θ = ν = 0.1 are the command-line defaults of main.py
_BASES: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adagrad": lambda: adagrad(1.0),
    "adagrad_norm": lambda: adagrad_norm(1.0),
    "sgd": lambda: optax.sgd(1.0),
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One experiment's settings (see the module docstring)."""

    data: str
    epochs: float  # budget in passes over the training set
    init_batch_size: int
    fixed_batch_sizes: tuple[int, ...]  # the first is the small baseline
    warmup_periods: tuple[int, ...]  # steps between doublings
    adascale_batch_sizes: tuple[int, ...]
    constants: tuple[float, ...]  # η (θ = ν) of the sweep; the first is the authors'
    learning_rates: tuple[tuple[str, tuple[float, ...]], ...]  # per optimizer
    tuning_seeds: int
    seeds: int
    sample_evals: int
    width: int
    target_tolerance: float  # the target is the small baseline's final test metric minus this
    rules: tuple[str, ...] = RULES
    optimizers: tuple[str, ...] = OPTIMIZERS
    train_examples: int = 0  # use only the first this many training examples (0: all)
    max_batch_size: int = 0  # the rules' cap and the warm-up's last size (0: the whole training set)
    noise_examples: int = 0  # B_simple is measured on the first this many training examples (0: all)

    def lrs(self, optimizer: str) -> tuple[float, ...]:
        return dict(self.learning_rates)[optimizer]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: how the batch size is chosen and which optimizer steps."""

    kind: str  # "fixed", "warmup", "adascale" or "rule"
    optimizer: str  # "adagrad", "adagrad_norm" or "sgd"
    batch_size: int = 0  # fixed / adascale batch, warm-up start
    period: int = 0  # warm-up doubling period
    rule: str = ""  # one of RULES
    constant: float = 0.0  # η (θ = ν) of a rule

    @property
    def name(self) -> str:
        what = {
            "fixed": f"fixed-{self.batch_size}",
            "warmup": f"warmup-{self.period}",
            "adascale": f"adascale-{self.batch_size}",
            "rule": f"{self.rule}(η={self.constant:g})",
        }[self.kind]
        return f"{what}/{self.optimizer}"


def _lr_grid(lo: float, hi: float) -> tuple[float, ...]:
    return tuple(float(v) for v in 2.0 ** np.arange(lo, hi + 1e-9))


def default_protocol(data: str = "digits", quick: bool = False) -> Protocol:
    """The full protocol (≤ 20 minutes on 2 CPU cores for digits) or the ``quick`` one (seconds, for tests)."""
    if data not in DATASETS:
        raise ValueError(f"data must be one of {', '.join(map(repr, DATASETS))}; got {data!r}")
    lrs = (("adagrad", _lr_grid(-9, -2)), ("adagrad_norm", _lr_grid(-4, 3)), ("sgd", _lr_grid(-5, 2)))
    if quick:
        return Protocol(data, epochs=2, init_batch_size=8, fixed_batch_sizes=(8, 64), warmup_periods=(4,),
                        adascale_batch_sizes=(64,), constants=(AUTHORS_CONSTANT, 1.0),
                        learning_rates=tuple((k, v[2:6:3]) for k, v in lrs), tuning_seeds=1, seeds=2, sample_evals=4,
                        width=8, target_tolerance=0.05, rules=("norm",), optimizers=("adagrad_norm",),
                        train_examples=128)  # fmt: skip
    if data == "digits-cnn":  # a rule-driven CNN run costs ~15-30 s (an MLP run ~0.3 s): fewer arms, half the budget
        return Protocol(data, epochs=20, init_batch_size=8, fixed_batch_sizes=(8, 32, 128, 512), warmup_periods=(64,),
                        adascale_batch_sizes=(), constants=(AUTHORS_CONSTANT, 1.0, 2.0),
                        learning_rates=tuple((k, v[1::2]) for k, v in lrs), tuning_seeds=1, seeds=5, sample_evals=20,
                        width=0, target_tolerance=0.005, rules=("norm", "noise_scale"))  # fmt: skip
    if data == "digits":
        return Protocol(data, epochs=40, init_batch_size=8, fixed_batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024),
                        warmup_periods=(16, 64, 256), adascale_batch_sizes=(64, 512),
                        constants=(AUTHORS_CONSTANT, 0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0), learning_rates=lrs,
                        tuning_seeds=2, seeds=5, sample_evals=40, width=32, target_tolerance=0.005)  # fmt: skip
    return Protocol(data, epochs=1, init_batch_size=8, fixed_batch_sizes=(8, 32, 128, 512), warmup_periods=(32,),
                    adascale_batch_sizes=(), constants=(AUTHORS_CONSTANT, 0.5, 1.0, 2.0),
                    learning_rates=tuple((k, v[1::2]) for k, v in lrs), tuning_seeds=1, seeds=5, sample_evals=20,
                    width=32, target_tolerance=0.02, rules=("norm", "coordinate_norm"), max_batch_size=512,
                    noise_examples=1024)  # fmt: skip


def problem(data: str, width: int, train_examples: int = 0, noise_examples: int = 0) -> Problem:
    """The digits MLP (one hidden layer of ``width``), the digits CNN (:class:`adabatch.flax.models.CNN`, two 3×3
    convolutions of 16 and 32 channels) or the pydoc-text transformer LM, with the validation split
    (and only the first ``train_examples`` training examples when positive; B_simple measured on the first
    ``noise_examples``)."""
    from adabatch.datasets import load_digits, load_text
    from adabatch.flax.models import CNN, MLP, TransformerLM, classification_loss, language_model_loss

    digits = data.startswith("digits")
    if digits:
        split, n_val = load_digits(), 288
        model: Any = CNN() if data == "digits-cnn" else MLP(features=(width,))
        loss_fn = classification_loss(model.apply)
    else:
        split, n_val = load_text(seq_len=32), 512
        model = TransformerLM(d_model=width, num_heads=2, num_layers=1, max_len=32)
        loss_fn = language_model_loss(model.apply)
    end = n_val + train_examples if train_examples > 0 else None
    x, y = jnp.asarray(split.x_train[n_val:end]), jnp.asarray(split.y_train[n_val:end])
    val = (jnp.asarray(split.x_train[:n_val]), jnp.asarray(split.y_train[:n_val]))
    test = (jnp.asarray(split.x_test[:2048]), jnp.asarray(split.y_test[:2048]))

    def accuracy(params, batch):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, batch[0]), -1) == batch[1])

    def evaluate(params):
        val_loss = jnp.mean(loss_fn(params, val))
        if digits:
            return {"test": accuracy(params, test), "val_loss": val_loss, "val_metric": accuracy(params, val)}
        return {"test": jnp.mean(loss_fn(params, test)), "val_loss": val_loss, "val_metric": val_loss}

    return Problem(
        name=data,
        loss_fn=loss_fn,
        init_fn=lambda key: model.init(key, x[:1])["params"],
        x=x,
        y=y,
        evaluate=evaluate,
        higher_is_better=digits,
        metric="test accuracy" if digits else "held-out loss",
        noise_examples=noise_examples,
    )


def arms(protocol: Protocol) -> list[Arm]:
    """Every arm of the protocol, the small fixed baselines first; rule arms once per constant of the sweep."""
    out = [Arm("fixed", opt, b) for opt in protocol.optimizers for b in protocol.fixed_batch_sizes]
    out += [
        Arm("warmup", opt, protocol.init_batch_size, k) for opt in protocol.optimizers for k in protocol.warmup_periods
    ]
    if protocol.adascale_batch_sizes:
        out.append(Arm("fixed", "sgd", protocol.init_batch_size))
        out += [Arm("adascale", "sgd", b) for b in protocol.adascale_batch_sizes]
    out += [
        Arm("rule", opt, protocol.init_batch_size, rule=rule, constant=c)
        for rule in protocol.rules
        for opt in protocol.optimizers
        for c in protocol.constants
    ]
    return out


def _rule(name: str, constant: Any, cap: int, init: int) -> optax.GradientTransformationExtraArgs:
    shared = {"max_batch_size": cap, "init_batch_size": init}
    if name == "norm":
        return rules.norm_test(constant, **shared)
    if name == "inner_product":
        return rules.inner_product_test(constant, **shared)
    if name == "augmented_inner_product":
        return rules.augmented_inner_product_test(constant, constant, **shared)
    if name == "coordinate_norm":
        return rules.coordinate_norm_test(constant, **shared)
    return rules.noise_scale_rule(1.0 / constant**2, **shared)


def _spec(arm: Arm, protocol: Protocol, n: int, params: Any) -> Run:
    """The compiled run's static description; arms that differ only in traced arguments share one."""
    base = _BASES[arm.optimizer]
    cap = protocol.max_batch_size or n
    if arm.kind == "rule":
        make_tx: Callable[[Any], optax.GradientTransformation] = lambda c: optax.chain(  # noqa: E731
            _rule(arm.rule, c, cap, protocol.init_batch_size), base()
        )
        needs: st.GradStatsNeeds | None = st.declared_needs(make_tx(AUTHORS_CONSTANT).init(params))
    elif arm.kind == "adascale":
        make_tx = lambda c: optax.chain(base(), adascale(protocol.init_batch_size))  # noqa: E731
        needs = st.GradStatsNeeds()
    else:
        make_tx, needs = (lambda c: base()), None
    return Run(
        make_tx=make_tx,
        rule=arm.kind == "rule",
        needs=needs,
        min_batch_size=min(arm.batch_size, protocol.init_batch_size) if arm.kind != "adascale" else arm.batch_size,
        max_batch_size=cap,
        samples=int(round(protocol.epochs * n)),
        sample_evals=protocol.sample_evals,
        measure_noise_scale=arm.kind == "rule",
    )


def _structure(arm: Arm) -> tuple:
    """Arms with the same structure share one compilation."""
    if arm.kind == "rule":
        return ("rule", arm.rule, arm.optimizer)
    if arm.kind == "adascale":
        return ("adascale", arm.batch_size)
    return ("schedule", arm.optimizer)


class _Runner:
    """Compiles each structure once and runs (arm, learning rate, seed) triples."""

    def __init__(self, protocol: Protocol, prob: Problem):
        self.protocol, self.problem = protocol, prob
        self.n = int(prob.x.shape[0])
        self.compiled: dict[tuple, Callable] = {}
        self.seed_data = _protocol.SeedData(prob, int(round(protocol.epochs * self.n)))

    def __call__(self, arm: Arm, lr: float, seed: int, measure: bool = True) -> dict[str, Any]:
        params, order = self.seed_data(seed)
        key = _structure(arm)
        if key not in self.compiled:
            self.compiled[key] = make_run(self.problem, _spec(arm, self.protocol, self.n, params))
        out = self.compiled[key](
            params,
            order,
            jnp.float32(lr),
            jnp.float32(arm.constant or AUTHORS_CONSTANT),
            jnp.int32(arm.batch_size),
            jnp.int32(arm.period),
            jnp.bool_(measure),
        )
        return record(jax.device_get(out))


def _bind(runner: _Runner, arm: Arm) -> Callable[[float, int, bool], dict]:
    """``run_one(lr, seed, tuning)`` of :func:`adabatch.experiments._protocol.tune_and_run` for one arm."""

    def run_one(lr: float, seed: int, tuning: bool) -> dict:
        return runner(arm, lr, seed, measure=not tuning)

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
    prob = problem(protocol.data, protocol.width, protocol.train_examples, protocol.noise_examples)
    runner = _Runner(protocol, prob)
    all_arms = arms(protocol)
    journal = _protocol.journal_path(out)
    bind = lambda arm: _bind(runner, arm)  # noqa: E731
    results = _protocol.run_arms(all_arms, bind, protocol, progress, "adadagrad experiment", journal)
    result: dict[str, Any] = {
        "experiment": "adadagrad",
        "command": command or f"adabatch experiment adadagrad --data {protocol.data}" + (" --quick" if quick else ""),
        "protocol": dataclasses.asdict(protocol),
        "training_examples": runner.n,
        "max_batch_size": protocol.max_batch_size or runner.n,
        "metric": prob.metric,
        "higher_is_better": prob.higher_is_better,
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
