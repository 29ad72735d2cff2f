"""One process of the multi-host test (tests/test_multihost.py): short adaptive ``fit`` runs on a tiny MLP.

Run as ``python tests/multihost_worker.py OUT --devices D [--coordinator HOST:PORT --num-processes N --process-id I]
[--checkpoints DIR]``. With ``--num-processes`` above 1 it joins the others with ``jax.distributed.initialize`` (CPU
devices, gloo collectives); with one process it runs alone on ``D`` CPU devices. Every run uses the same global
configuration (a mesh over all devices of all processes) and writes what each process saw to OUT as JSON: batch
sizes, decisions, losses, the final parameters and their SHA-256, and the rows this process read.

``--checkpoints DIR`` adds the checkpoint scenario, on a ``data`` × ``model`` mesh whose ``model`` axis spans the
processes (each process holds half of every weight matrix and of the optimizer state that mirrors it):

* several processes: an uninterrupted run of ``CKPT_STEPS`` steps (``DIR/full``), a run stopped after ``CKPT_STOP``
  steps (``DIR/stopped``), a copy of that checkpoint made by process 0 (``DIR/handoff``, renamed into place when
  complete), and the stopped run resumed to ``CKPT_STEPS`` steps;
* one process: waits for ``DIR/handoff`` and resumes it (written by several processes) to ``CKPT_STEPS`` steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

CKPT_STEPS, CKPT_STOP = 5, 2


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--checkpoints", default=None)
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
        out[name] = report(result)
    if args.checkpoints is not None:
        out["checkpoint"] = checkpoint_scenario(args.checkpoints, loss, params, (x, y))
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


def report(result) -> dict:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    # A leaf split across processes is gathered (every process takes part); the others are read locally.
    final = jax.tree_util.tree_map(
        lambda v: np.asarray(v) if v.is_fully_addressable else multihost_utils.process_allgather(v, tiled=True),
        result.state.params,
    )
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(final):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return {
        "sizes": [h["batch_size"] for h in result.history],
        "next": [h["next_batch_size"] for h in result.history],
        "loss": [h["loss"] for h in result.history],
        "trace_cov": [h["trace_cov"] for h in result.history],
        "rule_statistic": [h["rule_statistic"] for h in result.history],
        "params": {k: np.asarray(v).ravel().tolist() for k, v in final.items()},
        "params_sha256": digest.hexdigest(),
        "step": int(result.state.step),
        "samples": int(result.state.samples),
        "compilations": result.compilations,
    }


def checkpoint_scenario(root: str, loss, params, data) -> dict:
    """Save/restore of a model-sharded state by every process; see the module docstring."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh

    from adabatch import rules
    from adabatch.optimizers import adagrad_norm
    from adabatch.training import fit, init_train_state, make_train_step

    # Devices are numbered process by process, so the transposed grid puts the processes along "model".
    mesh = Mesh(np.array(jax.devices()).reshape(2, -1).T, ("data", "model"))
    tx = optax.chain(rules.norm_test(0.6, max_batch_size=64, init_batch_size=6), adagrad_norm(0.5))
    step = make_train_step(loss, tx, micro_batch_size=4, mesh=mesh, model_axis="model")
    init = init_train_state(params, tx)
    run = lambda where, steps, **kw: fit(  # noqa: E731
        step, init, data, num_steps=steps, init_batch_size=6, seed=3, checkpoint_dir=os.path.join(root, where), **kw
    )
    out: dict = {}
    handoff = os.path.join(root, "handoff")
    if jax.process_count() > 1:
        full = run("full", CKPT_STEPS, checkpoint_every=CKPT_STOP)
        out["full"] = report(full)
        out["held"] = {  # [start, stop) per dimension of every shard this process's devices hold
            k: sorted(
                {tuple(i.indices(n)[:2] for i, n in zip(s.index, v.shape, strict=True)) for s in v.addressable_shards}
            )
            for k, v in full.state.params.items()
        }
        out["stopped"] = report(run("stopped", CKPT_STOP))
        if jax.process_index() == 0:  # the step-CKPT_STOP checkpoint of 2 processes, for the 1-process resume
            shutil.copytree(os.path.join(root, "stopped"), handoff + ".tmp")
            os.rename(handoff + ".tmp", handoff)
        out["resumed"] = report(run("stopped", CKPT_STEPS, resume=True))
    else:
        deadline = time.monotonic() + 200
        while not os.path.isdir(handoff):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{handoff} never appeared")
            time.sleep(0.2)
        out["resumed"] = report(run("handoff", CKPT_STEPS, resume=True))
    return out


if __name__ == "__main__":
    sys.exit(main())
