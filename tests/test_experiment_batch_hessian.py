"""Smoke test of ``adabatch experiment batch-hessian --quick``; its batch spectra against dense Hessians."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adabatch.cli import main
from adabatch.curvature import ModelLoss
from adabatch.experiments.batch_hessian import batch_extremes
from adabatch.experiments.lr_vs_batch import fit_power_law


def _fake_lr_results(folder, data):
    """lr-vs-batch results files (the fields batch-hessian reads) with η* ∝ B (SGD) and ∝ √B (Adam)."""
    b = np.array([1, 2, 4, 8, 16, 32, 64])
    for optimizer, alpha in (("sgd", 1.0), ("adam", 0.5)):
        lr = 0.01 * b**alpha * np.exp(np.random.default_rng(0).normal(0, 0.05, b.size))
        fit = fit_power_law(b, lr)
        law = {"max_learning_rate": 1.0, "noise_scale": 30.0, "noise_scale_ci": [20.0, 40.0], "rss": 0.1, "n": 7}
        result = {
            "command": f"adabatch experiment lr-vs-batch --optimizer {optimizer} --data {data}",
            "batch_sizes": b.tolist(),
            "optimal": {"learning_rate": lr.tolist(), "loss": [1.0] * b.size, "at_edge": [False] * b.size},
            "fits": {
                "power_law": fit,
                "power_law_below_noise_scale": fit,
                "power_law_well_below_noise_scale": fit,
                "mccandlish": law,
                "surge": law,
            },  # fmt: skip
            "bootstrap": {"power_law_exponent_ci": fit["exponent_ci"], "learning_rate_ci": []},
            "noise_scale": {"geometric_mean": 40.0},
        }
        path = folder / f"lr-vs-batch-{optimizer}-{data}"
        path.mkdir(parents=True)
        (path / "results.json").write_text(json.dumps(result))


def test_quick_run_writes_results(tmp_path):
    out, lr = tmp_path / "out", tmp_path / "lr"
    _fake_lr_results(lr, "digits")
    argv = ["experiment", "batch-hessian", "--data", "digits", "--quick", "--out", str(out), "--no-progress"]
    assert main([*argv, "--lr-results", str(lr)]) == 0
    result = json.loads((out / "results.json").read_text())
    part = result["parts"]["spectra"]["digits"]
    sizes = part["batch_sizes"]
    assert sizes[0] == 1 and sizes[-1] == part["n"] == 64
    names = {s["name"] for s in part["series"]}
    assert {"hessian/init", "ggn/sgd", "hessian/adam/adam_state", "hessian/adam/adam_batch"} <= names
    for s in part["series"]:
        hi, lo = np.array(s["lambda_max"], float), np.array(s["lambda_min"], float)
        assert hi.shape[:2] == (1, len(sizes)) and np.isfinite(hi).all() and np.isfinite(lo).all()
        assert (hi >= lo).all()
        if s["matrix"] == "ggn":
            assert lo.min() > -1e-3 * hi.max()  # positive semi-definite up to rounding
    analysis = result["analysis"]["digits"]
    sgd = analysis["series"]["hessian/sgd"]
    assert sgd["full"]["lambda_max"] > 0 and len(sgd["predicted_lr"]) == len(sizes)
    assert all(np.isfinite(p["mean"]) and p["mean"] > 0 for p in sgd["predicted_lr"])
    assert {"small_b", "all"} <= set(sgd["lr_fits"]) and "excess_max_fit" in sgd
    assert result["lr_vs_batch"]["digits"]["sgd"]["source"].endswith("results.json")
    assert {"sgd", "adam"} <= set(analysis["comparison"])
    assert analysis["claims"] and all(c["verdict"] for c in analysis["claims"])
    for name in ("eigenvalues_digits.png", "learning_rates_digits.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## digits" in (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    assert main(["experiment", "batch-hessian", "--out", str(out), "--reanalyse"]) == 0
    assert (out / "summary.md").is_file()


def test_reanalyse_without_results(tmp_path, capsys):
    assert main(["experiment", "batch-hessian", "--out", str(tmp_path / "none"), "--reanalyse"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_batch_extremes_match_dense_hessian():
    # A tiny tanh MLP (4 -> 5 -> 3, 38 parameters): the Lanczos extremes of each masked batch's Hessian equal the
    # eigenvalues of the dense Hessian of that batch's mean loss, and the preconditioned ones those of P^-1/2 H P^-1/2.
    jax.config.update("jax_enable_x64", True)
    try:
        k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
        params = {"w1": jax.random.normal(k1, (4, 5)), "w2": jax.random.normal(k2, (5, 3)), "b": jnp.zeros(3)}
        x, y = jax.random.normal(k3, (12, 4)), jax.random.randint(k4, (12,), 0, 3)
        model = ModelLoss(
            lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"], optax.softmax_cross_entropy_with_integer_labels
        )
        indices = np.array([[3, 0, 0, 0, 0, 0], [1, 5, 7, 0, 0, 0], [0, 2, 4, 6, 8, 10]])
        mask = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
        precond = jax.tree_util.tree_map(lambda p: 0.5 + jnp.abs(p), params)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        p_flat = jax.flatten_util.ravel_pytree(precond)[0]
        w = jnp.asarray(mask, x.dtype)

        @jax.jit  # one compilation for the three batches: the batch is a 0/1 weighting of the 12 examples
        def dense_hessian(weights):
            return jax.hessian(lambda f: jnp.sum(weights * model(unravel(f), (x, y))) / jnp.sum(weights))(flat)

        dense = [np.asarray(dense_hessian(jnp.zeros(12).at[indices[k]].add(w[k]))) for k in range(3)]
        s = 1 / np.sqrt(np.asarray(p_flat))
        for pre in (None, precond):
            hi, lo = batch_extremes(model, params, (x, y), indices, mask, key=jax.random.key(1), num_steps=38,
                                    preconditioner=pre)  # fmt: skip
            for k in range(3):
                matrix = dense[k] if pre is None else s[:, None] * dense[k] * s[None, :]
                eig = np.linalg.eigh(matrix)[0]
                np.testing.assert_allclose([hi[k], lo[k]], [eig[-1], eig[0]], rtol=1e-6, atol=1e-8)
    finally:
        jax.config.update("jax_enable_x64", False)
