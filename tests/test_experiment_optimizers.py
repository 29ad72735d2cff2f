"""The optimizer comparison: its analysis on hand-built runs, the learning rate passed into every factory, and
``adabatch experiment optimizers --quick`` end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adabatch import rules
from adabatch import stats as st
from adabatch.cli import main
from adabatch.experiments import _optimizers_report as report
from adabatch.experiments import optimizers


def _record(steps, samples, test, val_loss=0.1):
    return {"evals": {"step": steps, "samples": samples, "test": test, "val_loss": [val_loss] * len(steps)},
            "batch": [[8, steps[-1]]], "steps": steps[-1], "samples": samples[-1]}  # fmt: skip


def _entry(optimizer, batching, runs, lr=0.01, lrs=(0.005, 0.01, 0.02), metric=(0.5, 0.9, 0.5)):
    return {"arm": {"optimizer": optimizer, "batching": batching, "name": f"{optimizer}/{batching}"},
            "learning_rate": lr, "lr_at_edge": False, "learning_rates": list(lrs), "tuning_val_metric": list(metric),
            "tuning_val_loss": [1.0] * len(lrs), "runs": runs}  # fmt: skip


def _result(arms):
    return {"higher_is_better": True, "training_examples": 64, "max_batch_size": 64, "metric": "accuracy",
            "protocol": {"target_tolerance": 0.01}, "arms": arms}  # fmt: skip


def test_lr_span_counts_the_contiguous_stretch_around_the_optimum():
    lrs = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert report.lr_span(lrs, [0.1, 0.9, 0.1, 0.9, 0.9], 0.05, True, 1) == {
        "low": 2.0, "high": 2.0, "ratio": 1.0, "at_edge": False}  # fmt: skip
    assert report.lr_span(lrs, [0.1, 0.5, 0.88, 0.9, 0.89], 0.05, True, 3)["ratio"] == 4.0
    assert report.lr_span(lrs, [0.1, 0.5, 0.88, 0.9, 0.89], 0.05, True, 3)["at_edge"]
    # a loss (lower is better) and a diverged run that breaks the stretch
    span = report.lr_span(lrs, [2.0, 1.02, 1.0, float("nan"), 1.0], 0.05, False, 2)
    assert (span["low"], span["high"], span["at_edge"]) == (2.0, 4.0, False)
    assert report.lr_span(lrs, [float("nan")] * 5, 0.05, True, 0)["ratio"] is None


def test_paired_difference_pairs_by_seed():
    d = report.paired_difference([0.91, 0.95, 0.93], [0.90, 0.93, 0.90])
    assert d["mean"] == pytest.approx(0.02) and d["n"] == 3
    assert d["ci"][0] < 0.02 < d["ci"][1]
    assert report.paired_difference([float("nan")], [0.9]) == {"mean": None, "ci": None, "n": 0}


def test_analysis_targets_adam_and_compares_like_with_like():
    steps = [0, 50, 100, 150, 200]
    adam = _record(steps, [8 * s for s in steps], [0.1, 0.5, 0.91, 0.91, 0.91])
    # Tom: better than Adam by 0.02, 0.03, 0.04 on the three seeds; both reach the target (0.90) at step 200
    tom = [_record(steps, [8 * s for s in steps], [0.1, 0.1, 0.93 + d, 0.93 + d, 0.93 + d]) for d in (0, 0.01, 0.02)]
    # the norm test with Adam: the mean of the last three evaluations reaches 0.90 at step 30, with 3200 samples
    norm = _record([0, 10, 20, 30, 40], [0, 400, 1600, 3200, 4000], [0.1, 0.91, 0.91, 0.91, 0.91])
    result = _result([_entry("adam", "fixed", [adam] * 3), _entry("tom", "fixed", tom),
                      _entry("adam", "norm", [norm] * 3)])  # fmt: skip
    analysis = report.analyse(result)
    assert analysis["target"] == pytest.approx(0.90)
    rows = {a["name"]: a for a in analysis["arms"]}
    assert "vs_adam" not in rows["adam/fixed"] and "vs_fixed" not in rows["adam/fixed"]
    assert rows["tom/fixed"]["vs_adam"]["mean"] == pytest.approx(0.03)
    assert rows["tom/fixed"]["vs_adam"]["fewer_steps"]["mean"] == pytest.approx(1.0)
    assert rows["adam/norm"]["steps_to_target"]["mean"] == 30
    assert rows["adam/norm"]["vs_fixed"]["fewer_steps"]["mean"] == pytest.approx(200 / 30)
    assert rows["adam/norm"]["vs_fixed"]["sample_ratio"]["mean"] == pytest.approx(3200 / 1600)
    assert rows["adam/norm"]["mean_batch"] == pytest.approx(100)
    assert rows["adam/fixed"]["lr_span"]["ratio"] == 1.0
    claim = next(c for c in analysis["claims"] if c["optimizer"] == "tom")
    assert claim["verdict"] == "shows" and "tom/fixed − adam/fixed" in claim["evidence"]


def _rows(finals: dict[str, list[float]], spans: dict[str, tuple[float, bool]] | None = None) -> dict:
    rows = []
    for name, values in finals.items():
        ratio, edge = (spans or {}).get(name, (2.0, False))
        rows.append({"name": name, "finals": values, "reached": len(values), "seeds": len(values),
                     "lr_span": {"ratio": ratio, "at_edge": edge}, "mean_batch": 8.0})  # fmt: skip
    return {"arms": rows, "tolerance": 0.01}


def test_claims_read_the_side_of_the_interval():
    adam = [0.95, 0.96, 0.97]
    worse = {"adam/fixed": adam, "maxva/fixed": [a - 0.05 + 0.001 * i for i, a in enumerate(adam)]}
    (claim,) = report.claims(_rows(worse))
    assert claim["optimizer"] == "maxva" and claim["verdict"] == "opposite"
    noisy = {"adam/fixed": adam, "maxva/fixed": [0.96, 0.95, 0.975]}
    assert report.claims(_rows(noisy))[0]["verdict"] == "not resolved"
    # AdaLomo "matches" Adam: non-inferiority at the 0.01 margin
    close = {"adam/fixed": adam, "adalomo/fixed": [a - 0.002 + 0.0001 * i for i, a in enumerate(adam)]}
    assert report.claims(_rows(close))[0]["verdict"] == "shows"
    # ActiveLR's learning-rate span against Adam's: a lower bound on the edge cannot be beaten
    spans = {"adam/fixed": adam, "active_adam/fixed": adam}
    assert report.claims(_rows(spans, {"active_adam/fixed": (16.0, False)}))[0]["verdict"] == "shows"
    assert report.claims(_rows(spans, {"adam/fixed": (32.0, True), "active_adam/fixed": (16.0, True)}))[0][
        "verdict"] == "not resolved"  # fmt: skip
    assert report.claims(_rows(spans, {"adam/fixed": (32.0, False), "active_adam/fixed": (16.0, False)}))[0][
        "verdict"] == "opposite"  # fmt: skip


def test_optimal_accuracy_puts_the_rules_first_decision_where_asked():
    eps = optimizers.optimal_accuracy(13.0, 1150, 32)
    kw = {"num_examples": 1150, "smoothness": 1.0, "max_smoothness": 1.0, "strong_convexity": 1.0, "accuracy": eps}
    assert float(rules.optimal_batch_size(13.0, **kw)) == pytest.approx(32.0, rel=1e-5)


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_every_optimizer_takes_a_traced_learning_rate(name):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    examples = {"w": jnp.arange(24.0).reshape(4, 3, 2) / 24 - 0.3, "b": jnp.arange(8.0).reshape(4, 2) / 8}

    def loss_fn(p, x):  # per-example loss, linear: example i's gradient is x[i]
        return jnp.sum(p["w"] * x["w"], (1, 2)) + jnp.sum(p["b"] * x["b"], 1)

    stats = st.grad_stats(loss_fn, params, examples, sq_sum=True, leaf_sq_norm_sum=True)

    @jax.jit
    def step(lr):
        tx = optax.with_extra_args_support(optimizers.build(name, lr))
        return tx.update(stats.mean, tx.init(params), params, grad_stats=stats)[0]

    small, large = step(jnp.float32(1e-3)), step(jnp.float32(2e-3))
    # twice the learning rate, twice the first step (every optimizer here is linear in it at step 1)
    for a, b in zip(jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(large), strict=True):
        assert np.abs(np.asarray(a)).max() > 0
        np.testing.assert_allclose(2 * np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="optimizer"):
        optimizers.build("lion", 0.1)


def test_arms_and_protocols():
    names = [a.name for a in optimizers.arms(optimizers.default_protocol("digits"))]
    assert names[0] == "adam/fixed" and len(names) == 2 * len(optimizers.OPTIMIZERS) + 1
    assert "sgd/optimal" in names and "adam/optimal" not in names
    quick = optimizers.default_protocol("digits", quick=True)
    assert sorted(a.name for a in optimizers.arms(quick)) == sorted(quick.only)
    with pytest.raises(ValueError, match="data"):
        optimizers.default_protocol("mnist")


def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "optimizers"
    rc = main(["experiment", "optimizers", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    budget = result["protocol"]["epochs"] * result["training_examples"]
    assert sorted(e["arm"]["name"] for e in result["arms"]) == ["adam/fixed", "clars/norm", "eve/fixed", "sgd/optimal"]
    for entry in result["arms"]:
        assert len(entry["runs"]) == result["protocol"]["seeds"]
        assert entry["learning_rate"] in entry["learning_rates"]
        for run in entry["runs"]:
            assert run["samples"] == budget and sum(k for _, k in run["batch"]) == run["steps"]
            assert sum(size * k for size, k in run["batch"]) == budget
            assert np.isfinite(run["evals"]["val_loss"]).all()
    rows = {a["name"]: a for a in result["analysis"]["arms"]}
    assert rows["sgd/optimal"]["batch"]["first"] == 8  # then the rule's decisions
    assert result["optimal_rule"]["accuracy"] > 0
    summary = (out / "summary.md").read_text()
    assert "## Claims" in summary and "eve/fixed" in summary
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["experiment", "optimizers", "--reanalyse", "--out", str(out)]) == 0


def test_command_rejects_bad_flags(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["experiment", "optimizers", "--seeds", "1"])
    assert "--seeds" in capsys.readouterr().err
    assert main(["experiment", "optimizers", "--reanalyse", "--out", str(tmp_path / "none")]) == 2


@pytest.mark.parametrize(("optimizer", "lr"), [("slq_learner", 0.25), ("extrap_sgd", 0.05)])
def test_optimizers_with_a_second_input_train_inside_the_experiment_engine(optimizer, lr):
    """The variable-batch engine computes the SLQ learner's spectrum (``requested_spectrum``) on its due steps and
    EXTRAP-SGD's gradient at the extrapolated point: both must lower the validation loss (without its spectrum the
    learner's α stays 0; without the second gradient EXTRAP-SGD raises)."""
    protocol = optimizers.Protocol(
        "digits", epochs=1, batch_size=16, eta=1.4, optimal_batch_at_init=16,
        learning_rates=tuple(optimizers.LEARNING_RATES.items()), tuning_seeds=1, seeds=1, sample_evals=2, width=8,
        target_tolerance=0.05, optimizers=(optimizer,), batchings=("fixed",), train_examples=128,
    )  # fmt: skip
    runner = optimizers._Runner(protocol, optimizers.problem("digits", protocol.width, protocol.train_examples))
    run = runner(optimizers.Arm(optimizer, "fixed"), lr, seed=0)
    val = np.asarray(run["evals"]["val_loss"])
    assert np.isfinite(val).all() and val[-1] < val[0] - 0.05


def test_optimizers_flag_selects_and_validates(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "optimizers", "--optimizers", "adam,lion"])
    assert "lion" in capsys.readouterr().err
