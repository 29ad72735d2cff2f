"""One process of the multi-host test (tests/test_multihost.py): a short adaptive ``fit`` on a tiny MLP.

Run as ``python tests/multihost_worker.py OUT --devices D [--coordinator HOST:PORT --num-processes N --process-id I]``.
With ``--num-processes`` above 1 it joins the others with ``jax.distributed.initialize`` (CPU devices, gloo
collectives); with one process it runs alone on ``D`` CPU devices. Every run uses the same global configuration (a
mesh over all devices of all processes), trains one configuration, and writes what each process saw to OUT as
JSON: batch sizes, decisions, losses, the final parameters and their SHA-256, and the rows this process read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=60)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.timeout,
        )

    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from adabatch import rules
    from adabatch.optimizers import adagrad_norm
    from adabatch.training import fit, init_train_state, make_train_step, process_rows

    def loss(params, batch):  # per-example softmax cross-entropy of a one-hidden-layer MLP
        x, y = batch
        hidden = jnp.tanh(x @ params["w1"] + params["b1"])
        logits = hidden @ params["w2"] + params["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    rng = np.random.default_rng(0)  # the same data set and initial parameters on every process
    x = rng.standard_normal((300, 6)).astype(np.float32)
    teacher = rng.standard_normal((6, 3))
    y = np.argmax(x @ teacher + 1.5 * rng.standard_normal((300, 3)), axis=1).astype(np.int32)
    params = {
        "w1": (0.5 * rng.standard_normal((6, 8))).astype(np.float32),
        "b1": np.zeros(8, np.float32),
        "w2": (0.5 * rng.standard_normal((8, 3))).astype(np.float32),
        "b2": np.zeros(3, np.float32),
    }
    mesh = Mesh(np.array(jax.devices()), ("data",))
    out: dict = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "rows_of_8": process_rows(NamedSharding(mesh, PartitionSpec("data")), 8).tolist(),
    }
    # 6 examples do not divide by the 4 devices: the first buffer is padded to 8 rows and the 2 extra rows are
    # masked; micro-batches of 4 (one row per device) are accumulated in the step's loop; the batch grows.
    configs = {"norm": (rules.norm_test(0.6, max_batch_size=64, init_batch_size=6), 4, 6)}
    for name, (test, micro, init) in configs.items():
        tx = optax.chain(test, adagrad_norm(0.5))
        step = make_train_step(loss, tx, micro_batch_size=micro, mesh=mesh)
        result = fit(step, init_train_state(params, tx), (x, y), num_steps=3, init_batch_size=init, seed=3)
        final = jax.device_get(result.state.params)
        digest = hashlib.sha256()
        for leaf in jax.tree_util.tree_leaves(final):
            digest.update(np.ascontiguousarray(leaf).tobytes())
        out[name] = {
            "sizes": [h["batch_size"] for h in result.history],
            "next": [h["next_batch_size"] for h in result.history],
            "loss": [h["loss"] for h in result.history],
            "trace_cov": [h["trace_cov"] for h in result.history],
            "rule_statistic": [h["rule_statistic"] for h in result.history],
            "params": {k: np.asarray(v).ravel().tolist() for k, v in final.items()},
            "params_sha256": digest.hexdigest(),
            "samples": int(result.state.samples),
            "compilations": result.compilations,
        }
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
