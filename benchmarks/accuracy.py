"""Accuracy of the float32 statistics and decisions against float64 NumPy brute force.

For random per-example gradients (several seeds, batch sizes and signal-to-noise ratios) it reports the largest
relative error of every estimator computed by adabatch in float32, and how many batch-size decisions of each rule
equal the formula of the AdAdaGrad paper (the practical tests) evaluated in float64. Writes docs/accuracy.md.

Run: ``python benchmarks/accuracy.py``
"""

from __future__ import annotations

import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import adabatch  # noqa: E402
from adabatch import stats as st  # noqa: E402
from tests import reference as ref  # noqa: E402

ESTIMATORS = ["mean_sq_norm", "trace_covariance", "unbiased_grad_sq_norm", "inner_product_variance",
              "orthogonal_variance"]  # fmt: skip
RULES = {
    "norm": lambda: adabatch.norm_test(0.3, max_batch_size=10**6),
    "inner_product": lambda: adabatch.inner_product_test(0.4, max_batch_size=10**6),
    "orthogonality": lambda: adabatch.orthogonality_test(0.6, max_batch_size=10**6),
    "augmented_inner_product": lambda: adabatch.augmented_inner_product_test(0.4, 0.6, max_batch_size=10**6),
    "coordinate_norm": lambda: adabatch.coordinate_norm_test(0.3, max_batch_size=10**6),
}
CONSTANTS = {"eta": 0.3, "theta": 0.4, "nu": 0.6}
SHAPES = {"w": (16, 8), "b": (8,), "v": (5, 3, 2)}


def main() -> None:
    worst = dict.fromkeys(ESTIMATORS + ["coordinate_variance"], 0.0)
    worst_scaled = dict.fromkeys(worst, 0.0)
    agree = dict.fromkeys(RULES, 0)
    cases = 0
    for seed in range(20):
        for b in (2, 16, 256):
            for offset in (0.0, 0.3, 1.0):
                rng = np.random.default_rng(seed)
                grads = {k: (offset + rng.standard_normal((b, *s))).astype(np.float32) for k, s in SHAPES.items()}
                G = ref.flatten_per_example([grads[k] for k in sorted(grads)])
                expected = ref.estimators(G)
                tree = jax.tree_util.tree_map(jnp.asarray, grads)
                s = st.from_per_example(tree, sq_sum=True, inner_sq_sum=True)
                # The size of the terms each estimator subtracts: its error is bounded by float32's epsilon times this.
                e = expected
                scale = {
                    "mean_sq_norm": e["mean_sq_norm"],
                    "trace_covariance": e["sq_norm_sum"] / (b - 1),
                    "unbiased_grad_sq_norm": e["mean_sq_norm"] + e["sq_norm_sum"] / (b * (b - 1)),
                    "inner_product_variance": e["inner_sq_sum"] / (b - 1),
                    "orthogonal_variance": e["sq_norm_sum"] / (b - 1),
                }
                for name in ESTIMATORS:
                    err = abs(float(getattr(st, name)(s)) - expected[name])
                    worst[name] = max(worst[name], err / abs(expected[name]))
                    worst_scaled[name] = max(worst_scaled[name], err / scale[name])
                cv = np.concatenate([np.ravel(st.coordinate_variance(s)[k]) for k in sorted(grads)])
                err = np.abs(cv - expected["coordinate_variance"])
                worst["coordinate_variance"] = max(
                    worst["coordinate_variance"], float(np.max(err / expected["coordinate_variance"]))
                )
                worst_scaled["coordinate_variance"] = max(
                    worst_scaled["coordinate_variance"], float(np.max(err / (expected["sq_sum"] / (b - 1))))
                )
                for test, make in RULES.items():
                    tx = make()
                    decision = int(tx.update(tree, tx.init(jax.tree_util.tree_map(lambda x: x[0], tree)))[1].batch_size)
                    required = ref.required_batch(test, G, **CONSTANTS)
                    agree[test] += decision == ref.next_batch_size(required, 1, b, 10**6)
                cases += 1
    lines = [
        "# Accuracy of the statistics",
        "",
        "Float32 statistics from `adabatch.stats.from_per_example` against a float64 NumPy brute force",
        "(`tests/reference.py`) on random per-example gradients: 20 seeds × b ∈ {2, 16, 256} × common mean",
        f"∈ {{0, 0.3, 1}} (d = {sum(int(np.prod(s)) for s in SHAPES.values())}), {cases} cases.",
        "",
        f"Command: `python benchmarks/accuracy.py` — machine: {platform.machine()}, {platform.processor() or 'CPU'},"
        f" jax {jax.__version__}.",
        "",
        "Each variance is a difference of two sums (for example trΣ̂ = (q − n‖ḡ‖²)/(n − 1)). The second column is",
        "the error relative to the size of those sums (q/(n − 1) for trΣ̂): float32 keeps it near its epsilon",
        "(6e-8) in every case. The first column, relative to the estimate itself, is large only where the variance is",
        "tiny next to the squared mean (b = 2 with two nearly equal gradients, or a common mean far above the",
        "spread): there b* is far below b, the test passes either way, and the decisions (last table) agree.",
        "Use float64 gradients (`jax.enable_x64`) where such variances themselves matter.",
        "",
        "A decision can differ by one example where b* (here up to ~1e5 for the coordinate-wise test, whose",
        "ratios are heavy-tailed) falls within float32 rounding (~1e-6 relative) of an integer.",
        "",
        "| estimator | largest error relative to the estimate | largest error relative to the subtracted sums |",
        "|---|---|---|",
        *(f"| `{name}` | {value:.2e} | {worst_scaled[name]:.2e} |" for name, value in worst.items()),
        "",
        "| rule | decisions equal to the float64 formula |",
        "|---|---|",
        *(f"| `{test}` | {agree[test]} / {cases} |" for test in RULES),
        "",
    ]
    (ROOT / "docs" / "accuracy.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
