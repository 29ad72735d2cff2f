"""Multi-host training with real processes: 2 processes × 2 CPU devices joined by ``jax.distributed`` (gloo
collectives on localhost) take the same batch-size decisions as each other and as 1 process × 4 devices; a state
sharded along a ``model`` axis that spans the processes is checkpointed by both, resumes bit-identically on 2
processes and to float tolerance on 1; and the ``adabatch train`` flags for several processes are checked before
any work.

Each process runs ``tests/multihost_worker.py`` (short adaptive ``fit`` runs of a tiny MLP); the three processes
are started once for the module (one group: the 1-process run resumes the checkpoint the pair writes). The
processes get a timeout and are all killed on failure, so a hang fails clearly. The tests share one xdist group:
their processes would otherwise compete for the same two cores with the rest of the suite's heaviest tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adabatch.cli import _train, main

pytestmark = pytest.mark.xdist_group("multihost")

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT_S = 300  # per group of processes; a healthy run takes ~50 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(commands: list[list[str]], logs: Path) -> Iterator[list[subprocess.Popen]]:
    """Start every command at once (CPU JAX, this checkout first on PYTHONPATH, output to ``logs/process<i>.log``);
    on leaving, kill whatever still runs and close the logs, whatever happened."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))
    procs: list[tuple[subprocess.Popen, Any]] = []
    try:
        for i, command in enumerate(commands):
            log = open(logs / f"process{i}.log", "w")  # noqa: SIM115 - closed below
            procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        yield [proc for proc, _ in procs]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def run_together(commands: list[list[str]], logs: Path, timeout_s: float) -> list[int]:
    """Start every command at once; wait for all of them; kill all on timeout. Returns the exit codes."""
    with started(commands, logs) as procs:
        deadline = time.monotonic() + timeout_s
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pytest.fail(f"a process did not finish within {timeout_s} s (hang?); logs in {logs}")
        return codes


def tail(logs: Path, n: int = 3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in sorted(logs.glob("*.log")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 processes × 2 devices and 1 process × 4 devices, started together (see tests/multihost_worker.py)."""
    logs = tmp_path_factory.mktemp("multihost")
    port, checkpoints = free_port(), str(logs / "checkpoints")
    two = [
        [sys.executable, str(WORKER), str(logs / f"p{i}.json"), "--devices", "2", "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), "--checkpoints", checkpoints]
        for i in range(2)
    ]  # fmt: skip
    one = [sys.executable, str(WORKER), str(logs / "one.json"), "--devices", "4", "--checkpoints", checkpoints]
    codes = run_together([*two, one], logs, TIMEOUT_S)
    assert codes == [0, 0, 0], tail(logs)
    p0, p1, single = (json.loads((logs / f"{name}.json").read_text()) for name in ("p0", "p1", "one"))
    return p0, p1, single, Path(checkpoints)


def test_two_processes_take_the_decisions_of_one_process_on_as_many_devices(runs):
    p0, p1, single, _ = runs
    assert (p0["process_index"], p1["process_index"], single["process_index"]) == (0, 1, 0)
    assert p0["process_count"] == p1["process_count"] == 2 and single["process_count"] == 1
    assert p0["device_count"] == p1["device_count"] == single["device_count"] == 4
    # Each process holds (and reads) only its half of every global batch; one process holds all of it.
    assert p0["rows_of_8"] == [0, 1, 2, 3] and p1["rows_of_8"] == [4, 5, 6, 7]
    assert single["rows_of_8"] == list(range(8))
    for name in ("norm",):
        a, b, c = p0[name], p1[name], single[name]
        # Bit-identical on both hosts: the same decisions, statistics, losses and parameters.
        assert a == b, name
        # The same decisions as one process on 4 devices; the statistics and parameters to float tolerance
        # (the all-reduce may sum the four device partials in another order).
        assert a["sizes"] == c["sizes"] and a["next"] == c["next"] and a["samples"] == c["samples"], name
        assert a["sizes"][0] == 6  # 6 examples on 4 devices: padded to 8 rows and masked, not truncated
        assert len(set(a["sizes"])) > 1, name  # the decision changed during the run
        for key in ("loss", "trace_cov", "rule_statistic"):
            np.testing.assert_allclose(a[key], c[key], rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
        for leaf in c["params"]:
            np.testing.assert_allclose(a["params"][leaf], c["params"][leaf], rtol=1e-5, atol=1e-5, err_msg=leaf)
        assert a["compilations"] == c["compilations"] == 2  # one per bucket (8 and 32 rows)


def test_checkpoints_of_a_model_sharded_state_resume_exactly_on_two_processes_and_on_one(runs):
    """Every process writes its shards, one the metadata; stop-and-resume is bit-identical; 2 → 1 process resumes."""
    p0, p1, single, root = runs
    a, b, one = p0["checkpoint"], p1["checkpoint"], single["checkpoint"]
    full, stopped, resumed = a["full"], a["stopped"], a["resumed"]
    assert all(a[run] == b[run] for run in ("full", "stopped", "resumed"))  # bit-identical on both processes
    # FSDP-style: each process holds one half of every weight matrix (along its largest axis), the vectors whole.
    assert a["held"]["w1"] == [[[0, 6], [0, 4]]] and b["held"]["w1"] == [[[0, 6], [4, 8]]]
    assert a["held"]["w2"] == [[[0, 4], [0, 3]]] and b["held"]["w2"] == [[[4, 8], [0, 3]]]
    assert a["held"]["b1"] == b["held"]["b1"] == [[[0, 8]]]
    assert len(set(full["sizes"])) > 2 and stopped["sizes"] == full["sizes"][:2]
    # Stopped after 2 steps and resumed: the same later batches and bit-identical final parameters.
    assert resumed["sizes"] == full["sizes"][2:] and resumed["next"] == full["next"][2:]
    assert resumed["params_sha256"] == full["params_sha256"]
    assert (resumed["step"], resumed["samples"]) == (full["step"], full["samples"])
    # Written by 2 processes, resumed by 1 on 4 devices: the same global state (sums may be reduced in another
    # order, so the parameters to float tolerance).
    r = one["resumed"]
    assert r["sizes"] == full["sizes"][2:] and (r["step"], r["samples"]) == (full["step"], full["samples"])
    for leaf, value in full["params"].items():
        np.testing.assert_allclose(r["params"][leaf], value, rtol=1e-5, atol=1e-6, err_msg=leaf)
    # Every process wrote its own shards (one OCDBT store each); the metadata record is one file.
    for written in (root / "full" / "5", root / "stopped" / "2"):
        assert sorted(p.name for p in (written / "state").glob("ocdbt.process_*")) == [
            "ocdbt.process_0",
            "ocdbt.process_1",
        ]
        assert json.loads((written / "meta" / "metadata").read_text())["init_batch_size"] == 6


def test_a_coordinator_that_never_comes_fails_within_the_timeout(tmp_path):
    """Process 0 alone: its peer never registers; JAX ends the process after the initialisation timeout."""
    command = [sys.executable, str(WORKER), str(tmp_path / "p0.json"), "--coordinator", f"127.0.0.1:{free_port()}",
               "--num-processes", "2", "--process-id", "0", "--timeout", "2"]  # fmt: skip
    start = time.monotonic()
    (code,) = run_together([command], tmp_path, 60)
    assert code != 0 and time.monotonic() - start < 60
    assert "DEADLINE_EXCEEDED" in tail(tmp_path) and not (tmp_path / "p0.json").exists()


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse reports a bad value by exiting
        code = exc.code
    return code, capsys.readouterr().err


BAD = [
    (["--num-processes", "2"], "--coordinator-address --process-id"),
    (["--coordinator-address", "127.0.0.1:1234", "--process-id", "0"], "--num-processes"),
    (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id 2"),
    (["--coordinator-address", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "--coordinator-address"),
    (["--coordinator-address", "h:70000", "--num-processes", "2", "--process-id", "0"], "--coordinator-address"),
    (["--num-processes", "0"], "--num-processes"),
    (["--process-id", "-1"], "--process-id"),
]


@pytest.mark.parametrize(("flags", "named"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_distributed_flags_are_rejected_before_any_work(flags, named, capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(["train", *flags, "--out", str(out), "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
    assert not out.exists()


def test_a_coordinator_that_does_not_answer_is_a_clear_error(monkeypatch, capsys, tmp_path):
    """Process 1 checks that the coordinator answers before joining: one line naming the flag, not a hang."""
    monkeypatch.setattr(_train, "INITIALIZATION_TIMEOUT_S", 1)
    out, address = tmp_path / "out", f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    code, err = run_cli(
        ["train", "--coordinator-address", address, "--num-processes", "2", "--process-id", "1", "--out", str(out)],
        capsys,
    )
    assert code == 2 and time.monotonic() - start < 10
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"--coordinator-address {address}: no coordinator answered within 1 s" in lines[0]
    assert not out.exists()


def test_launcher_environments_start_jax_discovery(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    assert not _train._launcher_started_several()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not _train._launcher_started_several()  # one task: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert _train._launcher_started_several()


def test_a_killed_process_fails_the_run_and_leaves_a_resumable_checkpoint(tmp_path, capsys):
    """``adabatch train`` on 2 processes, checkpointing every 5 steps; process 1 is killed (SIGKILL) once a checkpoint
    is complete. Process 0 must fail within the heartbeat timeout (not hang in a collective), and the checkpoint
    must resume on 1 process and finish the run."""
    ckpt, port = tmp_path / "ckpt", free_port()
    common = ["--rule", "norm", "--optimizer", "sgd", "--model", "mlp", "--lr", "0.1", "--eval-every", "1000",
              "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5", "--quiet"]  # fmt: skip
    commands = [
        [sys.executable, "-m", "adabatch.cli", "train", *common, "--steps", "100000",
         "--out", str(tmp_path / f"out{i}"), "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), "--heartbeat-timeout", "5"]
        for i in range(2)
    ]  # fmt: skip
    with started(commands, tmp_path) as procs:
        deadline = time.monotonic() + TIMEOUT_S
        while not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
            assert procs[0].poll() is None, tail(tmp_path)
            assert time.monotonic() < deadline, f"no checkpoint within {TIMEOUT_S} s\n{tail(tmp_path)}"
            time.sleep(0.2)
        procs[1].kill()
        killed = time.monotonic()
        try:
            code = procs[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still runs 90 s after its peer died (heartbeat timeout 5 s)\n{tail(tmp_path)}")
        assert code != 0 and time.monotonic() - killed < 90
    latest = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    out = tmp_path / "resumed"
    code, err = run_cli(["train", *common, "--steps", str(latest + 5), "--resume", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    (run,) = summary.values()
    assert run["steps"] == latest + 5 and run["process_count"] == 1
