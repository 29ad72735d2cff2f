"""The AdAdaGrad experiment: its variable-batch engine against a plain Python training loop, its analysis on
hand-built runs, and ``adabatch experiment adadagrad --quick`` end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adabatch
from adabatch import rules
from adabatch import stats as st
from adabatch.cli import main
from adabatch.experiments import _adadagrad_report as report
from adabatch.experiments._variable_batch import Problem, Run, buckets, make_run, stream

N, D, CAP, BUDGET = 40, 3, 40, 200


def _problem() -> Problem:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    y = jnp.asarray(x @ np.array([1.0, -2.0, 0.5]) + 0.5 * rng.standard_normal(N), jnp.float32)

    def loss_fn(params, batch):
        xb, yb = batch
        return 0.5 * (xb @ params["w"] + params["b"] - yb) ** 2

    def evaluate(params):
        loss = jnp.mean(loss_fn(params, (x, y)))
        return {"test": -loss, "val_loss": loss, "val_metric": loss}

    def init_fn(key):
        return {"w": 0.1 * jax.random.normal(key, (D,)), "b": jnp.zeros(())}

    return Problem("toy", loss_fn, init_fn, x, y, evaluate, True, "negative loss")


def _reference(prob, make_tx, rule, order, lr, start, period, constant):
    """A plain Python loop: unpadded batches read from the stream, grad_stats of exactly b examples."""
    params = prob.init_fn(jax.random.key(0))
    tx = make_tx(constant)
    state = tx.init(params)
    samples, t, sizes = 0, 0, []
    while samples < BUDGET:
        wanted = int(rules.next_batch_size(state)) if rule else start * 2 ** (t // period if period else 0)
        b = max(1, min(wanted, CAP, BUDGET - samples))
        idx = order[samples : samples + b]
        batch = (prob.x[idx], prob.y[idx])
        if rule:
            stats = st.grad_stats(prob.loss_fn, params, batch)
            updates, state = tx.update(stats.mean, state, params, grad_stats=stats)
        else:
            grads = jax.grad(lambda p, batch=batch: jnp.mean(prob.loss_fn(p, batch)))(params)
            updates, state = tx.update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + lr * u, params, updates)
        samples, t = samples + b, t + 1
        sizes.append(b)
    return params, sizes


@pytest.mark.parametrize(
    "kind, start, period, constant",
    [("fixed", 8, 0, 0.0), ("fixed", 13, 0, 0.0), ("warmup", 4, 3, 0.0), ("rule", 4, 0, 0.6), ("rule", 4, 0, 2.0)],
)
def test_engine_matches_a_plain_training_loop(kind, start, period, constant):
    # Padding to a bucket, masking, the switch, cutting the last batch to the budget: none may change the run.
    prob = _problem()
    rule = kind == "rule"

    def make_tx(c):
        base = adabatch.adagrad_norm(1.0)
        return optax.chain(rules.norm_test(c, max_batch_size=CAP, init_batch_size=start), base) if rule else base

    spec = Run(make_tx, rule, st.GradStatsNeeds() if rule else None, 4, CAP, BUDGET, 5, rule)
    order = stream(N, BUDGET + CAP + 1, seed=3)
    out = jax.device_get(
        make_run(prob, spec)(
            prob.init_fn(jax.random.key(0)), jnp.asarray(order), jnp.float32(0.3), jnp.float32(constant),
            jnp.int32(start), jnp.int32(period), jnp.bool_(True),
        )
    )  # fmt: skip
    want_params, want_sizes = _reference(prob, make_tx, rule, order, 0.3, start, period, constant)
    sizes = np.asarray(out["batch"])
    assert sizes[sizes > 0].tolist() == want_sizes
    assert int(out["samples"]) == BUDGET == sum(want_sizes)
    k = int(out["eval_count"])
    evals = {name: np.asarray(v)[:k] for name, v in out["evals"].items()}
    assert evals["samples"][-1] == BUDGET and evals["step"][-1] == len(want_sizes)
    final = -float(jnp.mean(prob.loss_fn(want_params, (prob.x, prob.y))))
    np.testing.assert_allclose(evals["test"][-1], final, rtol=1e-5)
    if rule:
        assert len(set(want_sizes)) > 1  # the rule moved, so the comparison covers changing buckets
        assert np.all(evals["b_simple"] > 0)


def test_stream_and_buckets():
    order = stream(10, 25, seed=1)
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:20].tolist()) == list(range(10))
    assert np.array_equal(order, stream(10, 25, seed=1)) and not np.array_equal(order, stream(10, 25, seed=2))
    assert buckets(8, 8) == (8,) and buckets(5, 64) == (8, 16, 32, 64)


def _record(steps, samples, test):
    return {"evals": {"step": steps, "samples": samples, "test": test}, "batch": [[8, steps[-1]]], "steps": steps[-1],
            "samples": samples[-1]}  # fmt: skip


def test_reach_uses_the_smoothed_metric_after_a_step():
    record = _record([0, 1, 2, 3, 4], [0, 8, 16, 24, 32], [0.9, 0.0, 0.9, 0.9, 0.9])
    assert report.reach(record, 0.89, True) == (4, 32)  # the mean of 3 reaches 0.9 only at step 4
    assert report.reach(record, 0.95, True) is None
    assert report.reach(_record([0, 1], [0, 8], [5.0, 1.0]), 2.0, False) is None  # mean of (5, 1) is 3


def test_analysis_ratios_compare_like_with_like():
    # The baseline (batch 8) reaches the target at step 100 of 200; the arm at step 25 with 2× the samples.
    steps = [0, 50, 100, 150, 200]
    base = _record(steps, [8 * s for s in steps], [0.1, 0.5, 0.9, 0.9, 0.9])
    arm = _record([0, 5, 25, 30, 35], [0, 100, 1600, 2000, 2400], [0.1, 0.5, 0.9, 0.9, 0.9])
    arm["batch"] = [[8, 1], [64, 34]]
    result = {
        "higher_is_better": True, "training_examples": 64, "metric": "accuracy",
        "protocol": {"target_tolerance": 0.0, "init_batch_size": 8, "fixed_batch_sizes": [8], "optimizers": ["o"],
                     "constants": [0.1], "rules": ["norm"]},
        "arms": [
            {"arm": {"name": "fixed-8/o", "kind": "fixed", "optimizer": "o", "batch_size": 8, "constant": 0.0},
             "learning_rate": 0.1, "lr_at_edge": False, "runs": [base, base]},
            {"arm": {"name": "warmup-5/o", "kind": "warmup", "optimizer": "o", "batch_size": 8, "constant": 0.0},
             "learning_rate": 0.1, "lr_at_edge": False, "runs": [arm, arm]},
        ],
    }  # fmt: skip
    analysis = report.analyse(result)
    assert analysis["targets"]["o"] == pytest.approx(0.9)
    row = analysis["arms"][1]
    # smoothed: base reaches 0.9 at step 200 (mean of the last three), the arm at step 35
    assert row["steps_to_target"]["mean"] == 35 and row["samples_to_target"]["mean"] == 2400
    assert row["fewer_steps"]["mean"] == pytest.approx(200 / 35)
    assert row["sample_ratio"]["mean"] == pytest.approx(2400 / 1600)
    assert row["batch"] == {"first": 8, "max": 64, "steps_to_cap": 1, "distinct_sizes": 2}


def test_mccandlish_fit_recovers_its_model():
    b = np.array([8, 16, 64, 256])
    fit = report.fit_mcCandlish(b.tolist(), (300 * (1 + 50 / b)).tolist())
    assert fit["s_min"] == pytest.approx(300) and fit["b_noise"] == pytest.approx(50)
    assert report.fit_mcCandlish([8], [10.0]) is None


def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "adadagrad"
    rc = main(["experiment", "adadagrad", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert not (out / "arms.partial.jsonl").exists()  # the journal of finished arms goes once results.json is written
    budget = result["protocol"]["epochs"] * result["training_examples"]
    kinds = {e["arm"]["kind"] for e in result["arms"]}
    assert kinds == {"fixed", "warmup", "adascale", "rule"}
    for entry in result["arms"]:
        assert len(entry["runs"]) == result["protocol"]["seeds"]
        for run in entry["runs"]:
            assert run["samples"] == budget and sum(k for _, k in run["batch"]) == run["steps"]
            assert sum(size * k for size, k in run["batch"]) == budget
    rule = next(e for e in result["arms"] if e["arm"]["kind"] == "rule")
    assert all(v > 0 for v in rule["runs"][0]["evals"]["b_simple"])
    assert result["analysis"]["verdict"] and "## Verdict" in (out / "summary.md").read_text()
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "adadagrad", "--seeds", "1"])
    assert "--seeds" in capsys.readouterr().err


def test_text_problem_is_a_language_model_with_a_held_out_loss():
    from adabatch.experiments import adadagrad

    prob = adadagrad.problem("text", 8, train_examples=64, noise_examples=32)
    metrics = jax.jit(prob.evaluate)(jax.jit(prob.init_fn)(jax.random.key(0)))  # compiled: 4× faster than eager
    assert prob.x.shape == (64, 32) and not prob.higher_is_better and prob.metric == "held-out loss"
    # an untrained byte-level model's loss is close to log(256)
    assert abs(float(metrics["test"]) - np.log(256)) < 0.5
    assert adadagrad.default_protocol("text").max_batch_size == 512
    with pytest.raises(ValueError, match="data"):
        adadagrad.default_protocol("images")


def test_cnn_problem_is_the_digits_cnn_with_a_smaller_protocol():
    from adabatch.experiments import adadagrad

    prob = adadagrad.problem("digits-cnn", 0, train_examples=32)
    params = jax.jit(prob.init_fn)(jax.random.key(0))
    assert {"Conv_0", "Conv_1", "Dense_0"} <= set(params) and prob.higher_is_better and prob.metric == "test accuracy"
    metrics = jax.jit(prob.evaluate)(params)
    assert 0.0 <= float(metrics["test"]) <= 1.0  # an accuracy
    cnn, mlp = adadagrad.default_protocol("digits-cnn"), adadagrad.default_protocol("digits")
    assert len(adadagrad.arms(cnn)) < len(adadagrad.arms(mlp)) and cnn.seeds >= 5
    assert cnn.rules == ("norm", "noise_scale") and cnn.epochs == 20


def test_an_interrupted_experiment_resumes_from_its_journal(tmp_path):
    import dataclasses

    from adabatch.experiments import _protocol

    @dataclasses.dataclass(frozen=True)
    class Toy:
        optimizer: str
        k: int

    @dataclasses.dataclass(frozen=True)
    class ToyProtocol:
        tuning_seeds: int = 1
        seeds: int = 2
        scale: float = 1.0

        def lrs(self, optimizer):
            return (0.1, 1.0)

    calls = []

    def bind(arm, fail_on=None):
        def run_one(lr, seed, tuning):
            if arm.k == fail_on:
                raise KeyboardInterrupt  # a kill in the middle of the second arm
            calls.append((arm.k, lr, seed))
            return {"evals": {"val_loss": [(lr - 0.1 * arm.k) ** 2], "val_metric": [1.0]}, "seed": seed}

        return run_one

    arms = [Toy("sgd", 1), Toy("sgd", 10)]
    journal = tmp_path / "out" / "arms.partial.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _protocol.run_arms(arms, lambda a: bind(a, fail_on=10), ToyProtocol(), False, "toy", journal)
    assert len(journal.read_text().splitlines()) == 1 and len(calls) == 4  # arm 1: 2 tuning + 2 evaluation runs
    with open(journal, "a") as f:
        f.write('{"protocol": "torn')  # a kill while writing leaves a torn line: skipped
    calls.clear()
    resumed = _protocol.run_arms(arms, bind, ToyProtocol(), False, "toy", journal)
    assert {k for k, _, _ in calls} == {10}  # only the unfinished arm ran
    fresh = _protocol.run_arms(arms, bind, ToyProtocol(), False, "toy", None)
    assert json.loads(json.dumps(resumed)) == json.loads(json.dumps(fresh)) and resumed[1]["learning_rate"] == 1.0
    calls.clear()
    _protocol.run_arms(arms, bind, ToyProtocol(scale=2.0), False, "toy", journal)  # another protocol: all run again
    assert {k for k, _, _ in calls} == {1, 10}
