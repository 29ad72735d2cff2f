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


SCRIPT_2D = textwrap.dedent(
    """
    import json
    import jax, numpy as np, optax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from adabatch import rules
    from adabatch.optimizers import adagrad, adagrad_norm
    from adabatch.stats import ghost
    from adabatch.training import fit, init_train_state, make_train_step

    def loss(params, batch):  # a two-layer MLP written with ghost layers, so that method="ghost" covers every leaf
        x, y = batch
        hidden = jnp.tanh(ghost.dense(x, params["w1"], params["b1"]))
        return optax.softmax_cross_entropy_with_integer_labels(ghost.dense(hidden, params["w2"], params["b2"]), y)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((6, 3)) + 1.5 * rng.standard_normal((300, 3)), axis=1).astype(np.int32)
    params = {"w1": (0.5 * rng.standard_normal((6, 8))).astype(np.float32), "b1": np.zeros(8, np.float32),
              "w2": (0.5 * rng.standard_normal((8, 3))).astype(np.float32), "b2": np.zeros(3, np.float32)}
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    out = {"devices": len(jax.devices())}
    configs = {  # S2 (params-sized, split along model) with micro-batches; ghost with the second, inner pass
        "vmap": (rules.coordinate_norm_test(0.6, max_batch_size=8, init_batch_size=5), adagrad(0.3), 4),
        "ghost": (rules.inner_product_test(0.05, max_batch_size=5, init_batch_size=5), adagrad_norm(0.5), None),
    }  # vmap: 5 examples padded to 8 rows, then the decision grows to 8 (one bucket: one compilation per run)
    for method, (test, opt, micro) in configs.items():
        tx = optax.chain(test, opt)
        runs = {}
        for where, kw in (("one", {}), ("mesh", {"mesh": mesh, "model_axis": "model"})):
            step = make_train_step(loss, tx, method=method, micro_batch_size=micro, **kw)
            result = fit(step, init_train_state(params, tx), (x, y), num_steps=3, init_batch_size=5, seed=3)
            state = result.state
            runs[where] = {
                "sizes": [h["batch_size"] for h in result.history],
                "next": [h["next_batch_size"] for h in result.history],
                "rule_statistic": [h["rule_statistic"] for h in result.history],
                "trace_cov": [h["trace_cov"] for h in result.history],
                "loss": [h["loss"] for h in result.history],
                "params": {k: np.asarray(v).ravel().tolist() for k, v in state.params.items()},
                "specs": {k: str(v.sharding.spec) for k, v in state.params.items()} if kw else None,
                "state_specs": sorted({str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.opt_state)
                                       if leaf.ndim >= 2}) if kw else None,
                "compilations": result.compilations,
            }
        out[method] = runs
    print("RESULT" + json.dumps(out))
    """
)


def test_model_sharded_state_on_a_2d_mesh_matches_one_device():
    """A 2 × 2 ``data`` × ``model`` mesh with the parameters and the optimizer state split along ``model``
    (FSDP-style): the statistics (vmap with S₂ and micro-batches, ghost with the inner products) are those of one
    device, so the per-example norms of split parameters are summed over the ``model`` axis too."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT_2D], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert out["devices"] == 4
    for method in ("vmap", "ghost"):
        one, mesh = out[method]["one"], out[method]["mesh"]
        # Weight matrices split along their largest axis, vectors replicated; adagrad's accumulators follow.
        assert mesh["specs"] == {"b1": "P()", "b2": "P()", "w1": "P(None, 'model')", "w2": "P('model', None)"}
        if method == "vmap":
            assert mesh["state_specs"] == ["P('model', None)", "P(None, 'model')"]
        assert mesh["sizes"] == one["sizes"] and mesh["next"] == one["next"], method
        assert one["sizes"][0] == 5 and (method == "ghost" or len(set(one["sizes"])) > 1), method
        assert mesh["compilations"] == one["compilations"] == 1, method
        for key in ("rule_statistic", "trace_cov", "loss"):
            for a, b in zip(mesh[key], one[key], strict=True):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (method, key, a, b)
        for leaf, values in one["params"].items():
            for a, b in zip(mesh["params"][leaf], values, strict=True):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (method, leaf, a, b)


def test_model_axis_arguments_are_checked():
    import jax
    import numpy as np
    import optax
    import pytest
    from jax.sharding import Mesh

    from adabatch.training import make_train_step, model_partition_spec

    loss = lambda w, x: (x @ w) ** 2  # noqa: E731
    grid = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(ValueError, match="model_axis='model' needs mesh="):
        make_train_step(loss, optax.sgd(0.1), model_axis="model")
    for axis in ("data", "other"):
        with pytest.raises(ValueError, match=f"model_axis='{axis}' must be an axis of the mesh"):
            make_train_step(loss, optax.sgd(0.1), mesh=grid, model_axis=axis)
    step = make_train_step(loss, optax.sgd(0.1), mesh=grid, model_axis="model")
    with pytest.raises(RuntimeError, match="built on the first call"):
        step.jitted  # noqa: B018
    # The largest dimension the axis size divides; vectors, scalars and indivisible matrices replicated.
    assert model_partition_spec((6, 9, 4), "m", 3) == jax.sharding.PartitionSpec(None, "m", None)
    assert model_partition_spec((6, 9), "m", 2) == jax.sharding.PartitionSpec("m", None)
    assert model_partition_spec((7, 9), "m", 2) == model_partition_spec((8,), "m", 2) == jax.sharding.PartitionSpec()
    assert model_partition_spec((8, 8), "m", 1) == jax.sharding.PartitionSpec()
