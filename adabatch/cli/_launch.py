"""``adabatch launch``: run an ``adabatch`` command as N local processes of one ``jax.distributed`` job.

``adabatch launch --num-processes 2 [--devices-per-process 2] [--port P] -- train --model mlp --steps 20`` starts
``python -m adabatch.cli train ... --coordinator-address 127.0.0.1:P --num-processes 2 --process-id I`` for
``I = 0 … N-1``, each on CPU with ``--devices-per-process`` devices and the gloo collectives (the recipe of the
multi-host tests), forwards their output (process 0's progress, everyone's errors), and exits with the first non-zero
exit status. When one process fails, the others are stopped at once (a run cannot go on without one of its hosts).
It is for trying multi-host runs on one machine; on a cluster, start one ``adabatch train`` per host with the same
three flags (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from adabatch.cli._args import at_least, check

__all__ = ["launch", "register"]

LAUNCHABLE = ("train",)  # the commands that accept the distributed flags


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int = 1,
    port: int | None = None,
    program: Sequence[str] = (sys.executable, "-m", "adabatch.cli"),
    poll_s: float = 0.2,
) -> int:
    """Start ``num_processes`` copies of ``program + command + distributed flags``; return the first failure's exit
    status (0 when all succeed). Children that are still running when one fails are terminated, then killed."""
    port = _free_port() if port is None else port
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process))
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    flags = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(num_processes)]
    children = [
        subprocess.Popen([*program, *command, *flags, "--process-id", str(i)], env=env) for i in range(num_processes)
    ]
    status = 0
    try:
        while True:
            codes = [child.poll() for child in children]  # poll every child: any() would stop at the first
            failed = [code for code in codes if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                status = failed[0] if failed else 0
                break
            time.sleep(poll_s)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return status


def _main(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    check(bool(command), "give the command to launch after --, e.g. adabatch launch --num-processes 2 -- train")
    check(command[0] in LAUNCHABLE, f"cannot launch {command[0]!r}: only {', '.join(LAUNCHABLE)} takes the flags")
    given = [flag for flag in ("--coordinator-address", "--num-processes", "--process-id") if flag in command]
    check(not given, f"{', '.join(given)}: set by adabatch launch, do not pass them to the launched command")
    return launch(command, args.num_processes, devices_per_process=args.devices_per_process, port=args.port)


def register(subparsers: Any) -> None:
    """Add the ``launch`` sub-command."""
    parser = subparsers.add_parser(
        "launch",
        help="run `adabatch train` as N local processes of one jax.distributed job (CPU, gloo)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--num-processes", type=at_least(1), required=True, help="how many processes")
    parser.add_argument("--devices-per-process", type=at_least(1), default=1, help="CPU devices of each process")
    parser.add_argument("--port", type=at_least(1), default=None, help="coordinator port (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the adabatch command and its flags")
    parser.set_defaults(func=_main)
