"""Data parallelism: the step with the batch sharded along a ``data`` mesh axis of 8 simulated CPU devices gives
the updates and batch-size decisions of one device.

``--xla_force_host_platform_device_count`` must be set before JAX starts, so the comparison runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np, optax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from adabatch import rules
    from adabatch.optimizers import adagrad_norm
    from adabatch.training import fit, init_train_state, make_train_step

    def loss(params, batch):
        x, y = batch
        return 0.5 * (x @ params["w"] + params["b"] - y) ** 2

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 3)).astype(np.float32)
    y = (x @ np.array([1.0, 2.0, 3.0]) + 2.0 * rng.standard_normal(600)).astype(np.float32)
    params = {"b": np.zeros((), np.float32), "w": np.zeros(3, np.float32)}
    mesh = Mesh(np.array(jax.devices()), ("data",))
    out = {"devices": len(jax.devices())}
    for name, test, micro in (("norm", rules.norm_test(0.3, max_batch_size=512), 16),
                              ("inner_product", rules.inner_product_test(0.3, max_batch_size=512), None)):
        tx = optax.chain(test, adagrad_norm(0.5))
        runs = {}
        for where, m in (("one", None), ("mesh", mesh)):
            step = make_train_step(loss, tx, micro_batch_size=micro, mesh=m)
            result = fit(step, init_train_state(params, tx), (x, y), num_steps=5, init_batch_size=16)
            leaf = result.state.params["w"]
            runs[where] = {
                "sizes": [h["batch_size"] for h in result.history],
                "next": [h["next_batch_size"] for h in result.history],
                "loss": [h["loss"] for h in result.history],
                "w": np.asarray(leaf).tolist(),
                "b": float(result.state.params["b"]),
                "shards": len(leaf.sharding.device_set),
                "compilations": result.compilations,
            }
        # The mesh run's first step, lowered as fit called it: its compiled program is reused, not compiled again.
        batch = jax.device_put((x[:16], y[:16]), NamedSharding(mesh, PartitionSpec("data")))
        hlo = step.jitted.lower(result.state, batch, jnp.asarray(16, jnp.int32)).compile().as_text()
        runs["mesh"]["all_reduce"] = "all-reduce" in hlo
        out[name] = runs
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_step_matches_one_device():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert out["devices"] == 8
    for name in ("norm", "inner_product"):
        one, mesh = out[name]["one"], out[name]["mesh"]
        assert mesh["shards"] == 8 and one["shards"] == 1
        assert mesh["all_reduce"]  # the statistics really are reduced across the 8 devices
        assert mesh["sizes"] == one["sizes"] and mesh["next"] == one["next"]
        assert len(set(one["sizes"])) > 1  # the decision changed during the run
        for key in ("loss", "w"):
            for a, b in zip(mesh[key], one[key], strict=True):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (name, key, a, b)
        assert abs(mesh["b"] - one["b"]) <= 1e-5 * max(1.0, abs(one["b"]))
