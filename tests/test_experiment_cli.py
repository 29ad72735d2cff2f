"""Smoke test of ``adabatch experiment lr-vs-batch --quick`` and checks of the experiment's fitting helpers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adabatch.cli import main
from adabatch.experiments.lr_vs_batch import (
    OPTIMIZERS,
    fit_law,
    fit_power_law,
    make_optimizer,
    optimal_learning_rates,
)


def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "adam"
    rc = main(["experiment", "lr-vs-batch", "--optimizer", "adam", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    n_b, n_lr = len(result["batch_sizes"]), len(result["learning_rates"])
    assert np.array(result["losses"], dtype=float).shape == (n_b, result["grid"]["seeds"], n_lr)
    assert len(result["optimal"]["learning_rate"]) == n_b
    assert all(
        min(result["learning_rates"]) <= lr <= max(result["learning_rates"])
        for lr in result["optimal"]["learning_rate"]
    )
    points = result["noise_scale"]["points"]
    assert points[0]["samples"] == 0 and all(np.isfinite(p["b_simple"]) and p["b_simple"] > 0 for p in points)
    assert "b_simple_preconditioned" in points[-1]  # Adam's own second moment is used after training
    for key in ("power_law", "power_law_below_noise_scale", "linear", "sqrt", "surge", "mccandlish"):
        assert key in result["fits"]
    assert result["verdict"]
    for name in ("loss_vs_lr.png", "lr_vs_batch.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000
    assert "| B | optimal lr" in (out / "summary.md").read_text()


def test_command_errors(capsys):
    assert main(["experiment"]) == 2
    assert main(["experiment", "lr-vs-batch", "--optimizer", "sgd", "--quick", "--seeds", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["experiment", "lr-vs-batch", "--optimizer", "lion"])
    assert "lion" in capsys.readouterr().err


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_are_linear_in_the_learning_rate(name):
    # The grid multiplies the unit-learning-rate step by lr, so each step must be a descent direction of size O(1).
    opt = make_optimizer(name)
    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    grads = {"w": jnp.array([0.3, -0.2, 0.1])}

    @jax.jit  # one compiled program instead of one per eager operation
    def three_updates(params, grads):
        state = opt.init(params)
        for _ in range(3):
            updates, state = opt.update(grads, state, params)
        return updates

    u = np.asarray(three_updates(params, grads)["w"])
    assert np.all(np.sign(u) == -np.sign(np.asarray(grads["w"])))
    if name == "sign":
        np.testing.assert_allclose(u, -np.sign(np.asarray(grads["w"])))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("lion")


def test_optimal_learning_rate_recovers_vertex_and_flags_edges():
    lrs = 2.0 ** np.arange(-8, 0.01, 0.25)
    x = np.log2(lrs)
    losses = np.stack([(x + 3.3) ** 2 + 1, (x + 5.1) ** 2, -x])
    lr, edge = optimal_learning_rates(lrs, losses)
    np.testing.assert_allclose(np.log2(lr[:2]), [-3.3, -5.1], atol=1e-9)
    assert edge.tolist() == [False, False, True]


def test_power_law_fit_interval_covers_truth():
    rng = np.random.default_rng(0)
    b = 2.0 ** np.arange(12)
    covered = 0
    for _ in range(200):
        lr = 0.01 * b**0.5 * np.exp(rng.normal(0, 0.2, b.size))
        fit = fit_power_law(b, lr)
        covered += fit["exponent_ci"][0] <= 0.5 <= fit["exponent_ci"][1]
    assert 180 <= covered <= 199  # nominal 95%: 190 expected


@pytest.mark.parametrize("law", ["surge", "mccandlish"])
def test_law_fits_recover_parameters(law):
    b = 2.0 ** np.arange(11)
    if law == "surge":
        lr = 0.05 / (0.5 * (np.sqrt(40 / b) + np.sqrt(b / 40)))
    else:
        lr = 0.05 / (1 + 40 / b)
    fit = fit_law(law, b, lr * np.exp(np.random.default_rng(1).normal(0, 0.05, b.size)))
    assert fit["noise_scale_ci"][0] <= 40 <= fit["noise_scale_ci"][1]
    assert fit["noise_scale"] == pytest.approx(40, rel=0.3)
    assert fit["max_learning_rate"] == pytest.approx(0.05, rel=0.15)
    with pytest.raises(ValueError, match="law must be one of"):
        fit_law("cubic", b, lr)
