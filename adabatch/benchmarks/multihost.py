"""Benchmark multi-host training: the step time of 2 processes × 2 CPU devices against 1 process × 4 CPU devices.

Both configurations run the same data-parallel ``make_train_step`` (norm test + AdaGrad-Norm, statistics by
``--method``, a huge η so that every step does the same work) on the same model and the same global batch, sharded
over a ``data`` mesh of 4 devices. The 2-process run joins two local processes with ``jax.distributed`` (gloo
collectives on localhost, the recipe of ``tests/test_multihost.py``); each process builds only its half of the
batch and ``jax.make_array_from_process_local_data`` forms the global one. The configurations run one after the
other (never at the same time), each in fresh processes: after a warm-up (compilation), ``--rounds`` rounds of
``--steps`` steps each are timed (``block_until_ready``), the median round counts. Reported: the median step time of
each and the ratio 2-process / 1-process (what crossing a process boundary costs: the all-reduces go through gloo
over TCP instead of staying in one process).

Run ``adabatch bench multihost [--quick] [--model mlp] [--batch 256] [--out docs/benchmarks.md]`` or
``python -m adabatch.benchmarks.multihost``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

__all__ = ["SECTION", "add_arguments", "execute", "main", "run"]

SECTION = "## Multi-host step time"
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(args: argparse.Namespace) -> int:
    """One process of one configuration: time the step and (process 0) write the result to ``args.worker``."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from adabatch import rules
    from adabatch.benchmarks.stats import make_problem
    from adabatch.optimizers import adagrad_norm
    from adabatch.training import init_train_state, make_train_step, process_rows

    problem = make_problem(args.model, args.batch, args.quick)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    # A huge η keeps the decision at the batch itself: every step does the same work.
    tx = optax.chain(rules.norm_test(100.0, max_batch_size=args.batch), adagrad_norm(0.1))
    step = make_train_step(problem["loss"], tx, method=args.method, mesh=mesh)
    host = jax.device_get(init_train_state(problem["params"], tx))
    state = jax.device_put(host, NamedSharding(mesh, PartitionSpec()))
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    rows = process_rows(sharded, args.batch)
    batch = jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharded, np.asarray(x)[rows], np.shape(x)), problem["batch"]
    )
    state, metrics = step(state, batch)  # compile and warm up
    jax.block_until_ready((state, metrics))
    multihost_utils.sync_global_devices("adabatch-bench-start")
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / args.steps)
    if jax.process_index() == 0:
        result = {
            "step_s": statistics.median(times),
            "rounds_s": times,
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "batch_size": int(metrics["batch_size"]),
            "compilations": step.compilations,
        }
        with open(args.worker, "w") as f:
            json.dump(result, f)
    return 0


def _launch(args: argparse.Namespace, processes: int, devices: int, out: str) -> dict:
    """Run one configuration in ``processes`` fresh local processes; kill all of them on failure or timeout."""
    port = _free_port()
    common = [sys.executable, "-m", "adabatch.benchmarks.multihost", "--worker", out, "--devices", str(devices)]
    common += ["--model", args.model, "--batch", str(args.batch), "--method", args.method]
    common += ["--steps", str(args.steps), "--rounds", str(args.rounds)] + (["--quick"] if args.quick else [])
    commands = [
        common + ([] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                              str(processes), "--process-id", str(i)])
        for i in range(processes)
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands
    ]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs) or not os.path.exists(out):
        raise RuntimeError(f"the {processes}-process run failed:\n" + "\n".join(o[-2000:] for o in outputs))
    with open(out) as f:
        return json.load(f)


def run(args: argparse.Namespace) -> dict:
    """Both configurations, one after the other: ``{"two": result, "one": result, "ratio": two / one}``."""
    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(args, 1, 4, os.path.join(tmp, "one.json"))
        two = _launch(args, 2, 2, os.path.join(tmp, "two.json"))
    return {"one": one, "two": two, "ratio": two["step_s"] / one["step_s"]}


def render(result: dict, command: str) -> str:
    """The Markdown section."""
    one, two = result["one"], result["two"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    import jax

    rows = [
        "| run | processes × devices | batch | step (ms) | ratio |",
        "|---|---|---:|---:|---:|",
        f"| 1 process | 1 × 4 | {one['batch_size']} | {one['step_s'] * 1e3:.1f} | 1.00 |",
        f"| 2 processes (gloo, localhost) | 2 × 2 | {two['batch_size']} | {two['step_s'] * 1e3:.1f} | "
        f"{result['ratio']:.2f} |",
    ]
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`. Machine: {machine}, JAX {jax.__version__} backend CPU (simulated devices: "
            f"`jax_num_cpu_devices`), load average {load} when written.",
            "",
            "Median time of one data-parallel `make_train_step` (norm test + AdaGrad-Norm) on the same global batch "
            "sharded over 4 CPU devices: in one process, and in two local processes joined by `jax.distributed` "
            "with gloo collectives. The ratio is what crossing a process boundary costs (the all-reduces of the "
            "mean gradient and the statistics go through gloo over TCP). CPU only: no GPU/TPU figures yet (one "
            "accelerator per machine here, and two processes need a device each).",
            "",
            *rows,
            "",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``adabatch bench multihost`` (also ``python -m adabatch.benchmarks.multihost``)."""
    parser.add_argument("--quick", action="store_true", help="a tiny model, few steps (a smoke test)")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn", "lm"))
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 256; 16 with --quick)")
    parser.add_argument("--method", default="ghost", choices=("ghost", "vmap"), help="statistics producer")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round (default 10; 2 --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--out", default=None, help=f"write the '{SECTION[3:]}' section into this file")
    # One process of a configuration (started by the benchmark itself).
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)


def execute(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (the ``adabatch bench multihost`` entry point)."""
    for name, default, quick in (("batch", 256, 16), ("steps", 10, 2), ("rounds", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.batch % 4:
        raise SystemExit(f"--batch must be a multiple of the 4 devices, got {args.batch}")
    if args.worker is not None:
        return worker(args)
    result = run(args)
    command = "adabatch bench multihost" + (" --quick" if args.quick else "")
    command += f" --model {args.model} --batch {args.batch} --method {args.method}"
    text = render(result, command)
    if args.out:
        from adabatch.benchmarks._report import replace_section

        replace_section(args.out, SECTION, text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
