"""``adabatch train``: train a small Flax model (CNN by default) on scikit-learn's digits with one configuration.

Writes ``<out>/metrics.jsonl`` (one line per step), ``<out>/summary.json`` and PNG plots; with
``--checkpoint-dir`` the run is checkpointed and ``--resume`` continues it exactly. The helpers here (building the
transformation, running one configuration, writing outputs) are shared with ``adabatch demo``.

Several processes (one per host, or several on one host): ``--coordinator-address HOST:PORT --num-processes N
--process-id I`` are passed to ``jax.distributed.initialize`` (all three or none; where a launcher sets up JAX's
own discovery, SLURM with several tasks, Open MPI or ``JAX_COORDINATOR_ADDRESS``, none is needed; a Cloud TPU pod
slice needs none either). The batch is then sharded over the devices of every process, and only process 0 prints
and writes the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from typing import Any

import numpy as np

from adabatch.cli._args import at_least, check, choice, host_port, output_dir, positive_float

__all__ = ["OPTIMIZERS", "RULES", "build_tx", "params_sha256", "register", "run_config", "write_plots"]

RULES = (
    "norm",
    "inner_product",
    "orthogonality",
    "augmented_inner_product",
    "coordinate_norm",
    "noise_scale",
    "optimal_batch",
    "none",
)
OPTIMIZERS = (
    "adagrad_norm",
    "adagrad",
    "adabelief",
    "sgd",
    "adam",
    "eve",
    "tom",
    "maxva",
    "adalomo",
    "active_adam",
    "clars",
    "extrap_sgd",
    "slq_learner",
)
ACTIVE_PERIOD = 100  # steps between ActiveLR's gain updates on the command line
# How long a process waits for the coordinator and for the other processes before it fails (JAX's default).
INITIALIZATION_TIMEOUT_S = 300
# A process that dies (or hangs) stops sending heartbeats; after this many seconds the coordination service fails
# every other process of the run, so none waits forever in a collective (JAX's default).
HEARTBEAT_TIMEOUT_S = 100


def build_tx(
    rule: str,
    optimizer: str,
    *,
    lr: float,
    eta: float,
    max_batch_size: int,
    init_batch_size: int = 16,
    num_examples: int | None = None,
) -> Any:
    r"""``optax.chain(<rule>, <optimizer>)`` (just the optimizer for ``rule="none"``).

    ``eta`` is the rule's constant: η for the norm tests, θ and ν for the inner-product tests, and for the
    noise-scale rule the multiplier :math:`1/\eta^2` (so that every rule asks for about
    :math:`B_\text{simple}/\eta^2`); the rule starts at ``init_batch_size`` and never exceeds ``max_batch_size``.
    ``optimal_batch`` is Alfarra et al.'s learned optimal SGD batch size (:func:`adabatch.optimal_batch_rule`) over
    ``num_examples`` training examples, with the constants a network does not have set to
    :math:`L = L_{\max} = \mu = 1` and the target accuracy :math:`\epsilon` = ``eta``, so that it asks for
    :math:`\tau^\star \approx 2\hat h/\eta` examples (:math:`\hat h` the mean per-example squared gradient
    norm); it leaves the optimizer's step size alone (``apply_step_size=False``).
    ``active_adam`` updates its gains every ``ACTIVE_PERIOD`` steps. ``extrap_sgd`` (momentum 0.9, Nesterov, the
    extrapolation step equal to ``lr``) needs a second gradient per step, which the training step computes.
    ``slq_learner`` learns its step size and momentum from a Hessian spectrum of the batch every 10 steps (20
    Lanczos steps, one probe; :func:`adabatch.slq_learner`'s defaults): ``lr`` is its step size only until the
    first spectrum is accepted.
    """
    import optax

    from adabatch import optimizers as o
    from adabatch import rules
    from adabatch.curvature import slq_learner

    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid choices: {', '.join(RULES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
    opt = {
        "adagrad_norm": o.adagrad_norm,
        "adagrad": o.adagrad,
        "adabelief": o.adabelief,
        "sgd": optax.sgd,
        "adam": optax.adam,
        "eve": o.eve,
        "tom": o.tom,
        "maxva": o.maxva,
        "adalomo": o.adalomo,
        "active_adam": lambda lr: o.active_adam(lr, period=ACTIVE_PERIOD),
        "clars": o.clars,
        "extrap_sgd": o.extrap_sgd,
        "slq_learner": lambda lr: slq_learner(init_learning_rate=lr),
    }[optimizer](lr)
    if rule == "none":
        return opt
    cap = {"max_batch_size": max_batch_size, "init_batch_size": init_batch_size}
    test = {
        "norm": lambda: rules.norm_test(eta, **cap),
        "inner_product": lambda: rules.inner_product_test(eta, **cap),
        "orthogonality": lambda: rules.orthogonality_test(eta, **cap),
        "augmented_inner_product": lambda: rules.augmented_inner_product_test(eta, eta, **cap),
        "coordinate_norm": lambda: rules.coordinate_norm_test(eta, **cap),
        "noise_scale": lambda: rules.noise_scale_rule(1.0 / eta**2, **cap),
        "optimal_batch": lambda: rules.optimal_batch_rule(
            _examples(num_examples), 1.0, 1.0, 1.0, eta, max_batch_size=max_batch_size, init_batch_size=init_batch_size
        ),
    }[rule]()
    return optax.chain(test, opt)


def _examples(num_examples: int | None) -> int:
    if num_examples is None:
        raise ValueError("rule 'optimal_batch' needs num_examples (the number of training examples)")
    return num_examples


def params_sha256(params: Any) -> str:
    """SHA-256 of the parameters' bytes, leaves in tree order (equal digests = bit-identical parameters)."""
    import jax

    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run_config(
    name: str,
    tx: Any,
    *,
    data: Any,
    model: Any,
    batch_size: int,
    steps: int,
    seed: int,
    eval_every: int,
    metrics_file: Any = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    micro_batch_size: int | None = None,
    mesh: Any = None,
) -> tuple[dict, list[dict]]:
    """Train ``model`` on ``data`` (a :class:`adabatch.datasets.Split`) with ``tx``; returns (summary, history).

    The test accuracy is evaluated every ``eval_every`` steps and at the last step (key ``test_accuracy`` of those
    history records). Each history record is written as one JSON line to ``metrics_file`` (with ``run=name``).
    ``mesh`` shards the batch over its ``data`` axis (needed with several processes: a mesh over ``jax.devices()``).
    """
    import jax
    import jax.numpy as jnp

    from adabatch.flax.models import classification_loss
    from adabatch.training import fit, init_train_state, make_train_step

    params = model.init(jax.random.key(seed), data.x_train[:1])["params"]
    jitted_accuracy = jax.jit(
        lambda p: jnp.mean(jnp.argmax(model.apply({"params": p}, data.x_test), -1) == data.y_test)
    )
    # With several processes the parameters are a global (replicated) array: evaluate this process's copy locally.
    local = jax.device_get if jax.process_count() > 1 else (lambda p: p)
    accuracy = lambda p: jitted_accuracy(local(p))  # noqa: E731
    step = make_train_step(classification_loss(model.apply), tx, micro_batch_size=micro_batch_size, mesh=mesh)

    def evaluate(state, record):
        if record["step"] % eval_every == 0 or record["step"] == steps:
            record["test_accuracy"] = float(accuracy(state.params))
        record["run"] = name
        if metrics_file is not None:
            metrics_file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    start = time.perf_counter()
    result = fit(
        step,
        init_train_state(params, tx, seed=seed),
        (data.x_train, data.y_train),
        num_steps=steps,
        init_batch_size=batch_size,
        seed=seed,
        callback=evaluate,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
    )
    history = result.history
    summary = {
        "test_accuracy": float(accuracy(result.state.params)),
        "steps": int(result.state.step),
        "samples": int(result.state.samples),
        "compilations": result.compilations,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "batch_sizes": [h["batch_size"] for h in history],
        "params_sha256": params_sha256(result.state.params),
        "skipped_updates": int(result.state.skipped),
    }
    return summary, history


def _smooth(values: list[float], width: int) -> np.ndarray:
    """Centred-window moving average (the window shrinks at the ends)."""
    x = np.asarray(values, np.float64)
    half = max(width // 2, 0)
    return np.array([x[max(0, i - half) : i + half + 1].mean() for i in range(len(x))])


def write_plots(
    out: str, histories: dict[str, list[dict]], *, title: str = "", target: float | None = None, cap: int | None = None
) -> list[str]:
    """PNG plots of the runs' histories: training loss against samples and steps (smoothed, the raw values as a
    faint line), batch size (with the rule's ``cap``) and test accuracy (with the ``target``) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    panels = [
        ("loss_vs_samples.png", "samples", "loss", "training loss (batch mean)", "log"),
        ("loss_vs_steps.png", "step", "loss", "training loss (batch mean)", "log"),
        ("batch_size.png", "step", "batch_size", "batch size", "log"),
        ("test_accuracy.png", "step", "test_accuracy", "test accuracy", "linear"),
    ]
    written = []
    for filename, x_key, y_key, label, yscale in panels:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, history in histories.items():
            points = [(h[x_key], h[y_key]) for h in history if h.get(y_key) is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            if y_key == "loss":
                (line,) = ax.plot(xs, _smooth(list(ys), max(len(ys) // 25, 1)), label=name, lw=1.4)
                ax.plot(xs, ys, color=line.get_color(), lw=0.6, alpha=0.25)
            else:
                ax.plot(xs, ys, label=name, lw=1.2, drawstyle="steps-post" if y_key == "batch_size" else "default")
        if y_key == "test_accuracy" and target is not None:
            ax.axhline(target, color="k", lw=0.8, ls=":", label=f"target {target:.3f}")
        if y_key == "batch_size" and cap is not None:
            ax.axhline(cap, color="k", lw=0.8, ls="--", label=f"cap {cap}")
        ax.set_xlabel("examples seen" if x_key == "samples" else "optimizer step")
        ax.set_ylabel(label)
        ax.set_yscale(yscale)
        if yscale == "log":  # plain numbers, not powers of ten
            formatter = ScalarFormatter()
            formatter.set_scientific(False)
            ax.yaxis.set_major_formatter(formatter)
            ax.yaxis.set_minor_formatter(formatter if y_key == "batch_size" else plt.NullFormatter())
        ax.set_title(f"{title}: {label}" if title else label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, filename)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _main(args: argparse.Namespace) -> int:
    _check_flags(args)
    _start_distributed(args)  # before anything touches a JAX backend
    import jax

    from adabatch.datasets import load_digits
    from adabatch.flax.models import CNN, MLP

    lead = jax.process_index() == 0  # only process 0 prints and writes the outputs
    mesh = None
    if jax.process_count() > 1:
        from jax.sharding import Mesh

        mesh = Mesh(np.array(jax.devices()), ("data",))
    data = load_digits(seed=args.seed)
    tx = build_tx(
        args.rule,
        args.optimizer,
        lr=args.lr,
        eta=args.eta,
        max_batch_size=args.max_batch_size,
        init_batch_size=args.batch_size,
        num_examples=len(data.x_train),
    )
    name = f"{args.rule}+{args.optimizer}"
    if lead:
        os.makedirs(args.out, exist_ok=True)
    with (
        open(os.path.join(args.out, "metrics.jsonl"), "a" if args.resume else "w") if lead else open(os.devnull, "w")
    ) as metrics_file:
        try:
            summary, history = run_config(
                name,
                tx,
                data=data,
                model=CNN() if args.model == "cnn" else MLP(features=(32,)),
                batch_size=args.batch_size,
                steps=args.steps,
                seed=args.seed,
                eval_every=args.eval_every,
                metrics_file=metrics_file,
                checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every,
                resume=args.resume,
                progress=not args.quiet,
                micro_batch_size=args.micro_batch_size,
                mesh=mesh,
            )
        except ValueError as exc:  # CheckpointError included: a clear message, nothing overwritten
            print(f"adabatch train: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(
                "adabatch train: interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr
            )
            return 130
    if not lead:
        return 0
    if args.resume:  # the summary and the plots cover the whole run, as metrics.jsonl does
        history = _whole_run(os.path.join(args.out, "metrics.jsonl"), name)
        summary["batch_sizes"] = [h["batch_size"] for h in history]
    summary["process_count"], summary["device_count"] = jax.process_count(), jax.device_count()
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({name: summary}, f, indent=2)
    write_plots(args.out, {name: history})
    sizes = summary["batch_sizes"]
    print(
        f"{name}: test accuracy {summary['test_accuracy']:.4f} after {summary['steps']} steps, "
        f"{summary['samples']} samples, batch {sizes[0] if sizes else '-'}→{sizes[-1] if sizes else '-'}, "
        f"{summary['compilations']} compilations, {summary['wall_time_s']:.1f} s; wrote {args.out}"
    )
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """The checks that involve several flags (each flag alone is checked by its argparse type)."""
    if args.rule != "none":
        check(
            args.batch_size >= 2,
            f"--batch-size {args.batch_size}: a batch-size rule needs at least 2 examples to estimate a variance",
        )
        check(
            args.batch_size <= args.max_batch_size,
            f"--batch-size {args.batch_size} is above --max-batch-size {args.max_batch_size}",
        )
    check(not args.resume or args.checkpoint_dir is not None, "--resume needs --checkpoint-dir")
    _check_distributed_flags(args)
    if args.resume:
        latest = _latest_checkpoint(args.checkpoint_dir)
        check(latest is not None, f"--resume: no checkpoint found in --checkpoint-dir {args.checkpoint_dir}")
        check(
            latest < args.steps,
            f"--steps {args.steps} is not past the checkpoint's step {latest} (--resume continues to --steps)",
        )


DISTRIBUTED_FLAGS = ("--coordinator-address", "--num-processes", "--process-id")


def _check_distributed_flags(args: argparse.Namespace) -> None:
    """All three of ``--coordinator-address --num-processes --process-id``, or none; the id below the count."""
    values = (args.coordinator_address, args.num_processes, args.process_id)
    given = [flag for flag, value in zip(DISTRIBUTED_FLAGS, values, strict=True) if value is not None]
    if not given:
        return
    missing = [flag for flag in DISTRIBUTED_FLAGS if flag not in given]
    check(
        not missing,
        f"{' '.join(given)} needs {' '.join(missing)} too (give all three of {', '.join(DISTRIBUTED_FLAGS)}, or none)",
    )
    check(
        args.process_id < args.num_processes,
        f"--process-id {args.process_id} must be below --num-processes {args.num_processes} (ids are 0..N-1)",
    )


def _launcher_started_several() -> bool:
    """Whether a launcher whose settings ``jax.distributed.initialize()`` reads by itself started several processes.

    SLURM (``srun`` with several tasks), Open MPI (``mpirun``) or an explicit ``JAX_COORDINATOR_ADDRESS``. A Cloud
    TPU pod slice needs no initialisation: its runtime finds the other hosts.
    """
    env = os.environ

    def several(name: str) -> bool:
        return env.get(name, "").isdigit() and int(env[name]) > 1

    return (
        "JAX_COORDINATOR_ADDRESS" in env
        or ("SLURM_JOB_ID" in env and several("SLURM_NTASKS"))
        or ("OMPI_MCA_orte_hnp_uri" in env and several("OMPI_COMM_WORLD_SIZE"))
    )


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once ``address`` accepts a TCP connection; a clear error naming the flag after ``timeout_s``.

    ``jax.distributed.initialize`` would otherwise abort the process with a gRPC deadline message after its own
    timeout; checking first gives the user one line that says what is wrong.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, max(0.1, timeout_s))):
                return
        except socket.gaierror as exc:
            check(False, f"--coordinator-address {address}: cannot resolve host {host!r} ({exc})")
        except OSError:
            if time.monotonic() >= deadline:
                check(
                    False,
                    f"--coordinator-address {address}: no coordinator answered within {timeout_s:g} s (is process 0 "
                    "running, and is the address reachable from this host?)",
                )
            time.sleep(0.25)


def _check_port_free(address: str) -> None:
    """Process 0 serves the coordinator on the port of ``address``: a port already in use is an error now."""
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError as exc:
            check(False, f"--coordinator-address {address}: process 0 cannot serve on port {port} ({exc.strerror})")


def _start_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` with the three flags (or JAX's own discovery under a launcher), if any."""
    import jax

    if args.coordinator_address is None:
        if _launcher_started_several():
            jax.distributed.initialize(initialization_timeout=INITIALIZATION_TIMEOUT_S)
        return
    address, count, index = args.coordinator_address, args.num_processes, args.process_id
    if count > 1:
        if index == 0:
            _check_port_free(address)
        else:
            _wait_for_coordinator(address, INITIALIZATION_TIMEOUT_S)
        if not args.quiet:
            print(
                f"adabatch train: process {index} of {count}: joining {address} (each process waits up to "
                f"{INITIALIZATION_TIMEOUT_S} s for the others)",
                file=sys.stderr,
            )
    if getattr(jax.config, "jax_cpu_collectives_implementation", None) in (None, "none"):  # CPU devices need them
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=count,
        process_id=index,
        initialization_timeout=INITIALIZATION_TIMEOUT_S,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
    )


def _whole_run(path: str, name: str) -> list[dict]:
    """The records of run ``name`` in ``metrics.jsonl``, one per step (a step re-run after a resume: the last)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("run") == name:
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _latest_checkpoint(directory: str) -> int | None:
    if not os.path.isdir(directory):
        return None
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    return max(steps) if steps else None


def register(subparsers: Any) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser(
        "train",
        help="train the digits CNN with one rule/optimizer configuration",
        description="Train adabatch.flax.models.CNN on scikit-learn's digits with one configuration.",
    )
    parser.add_argument("--rule", type=choice(RULES, "rule"), default="norm", help=f"one of {', '.join(RULES)}")
    parser.add_argument(
        "--optimizer",
        type=choice(OPTIMIZERS, "optimizer"),
        default="adagrad_norm",
        help=f"one of {', '.join(OPTIMIZERS)}",
    )
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn", help="the CNN, or a small MLP")
    parser.add_argument(
        "--eta",
        type=positive_float,
        default=0.8,
        help="the rule's constant (η, or θ/ν; noise_scale: multiplier 1/η²; optimal_batch: accuracy ε)",
    )
    parser.add_argument("--lr", type=positive_float, default=0.3, help="learning rate")
    parser.add_argument("--batch-size", type=at_least(1), default=16, help="first (and smallest) batch size")
    parser.add_argument("--max-batch-size", type=at_least(1), default=48, help="the rule's cap")
    parser.add_argument("--micro-batch-size", type=at_least(1), default=None, help="physical micro-batch")
    parser.add_argument("--steps", type=at_least(1), default=200, help="optimizer steps in total")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of the initialisation and data order")
    parser.add_argument("--eval-every", type=at_least(1), default=10, help="evaluate the test accuracy every N steps")
    parser.add_argument("--out", type=output_dir, default=os.path.join("runs", "train"), help="output directory")
    parser.add_argument("--checkpoint-dir", default=None, help="checkpoint directory (orbax)")
    parser.add_argument("--checkpoint-every", type=at_least(1), default=50, help="checkpoint interval in steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--coordinator-address",
        type=host_port,
        default=None,
        help="several processes: HOST:PORT of process 0 (jax.distributed.initialize)",
    )
    parser.add_argument("--num-processes", type=at_least(1), default=None, help="several processes: how many")
    parser.add_argument(
        "--process-id", type=at_least(0), default=None, help="several processes: this one's id in 0..N-1"
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=at_least(1),
        default=HEARTBEAT_TIMEOUT_S,
        help="several processes: seconds without a heartbeat after which a lost process fails the whole run",
    )
    parser.set_defaults(func=_main)
