"""``adabatch launch``: N local processes with the distributed flags; the first failure stops the others."""

from __future__ import annotations

import json
import sys
import time

import pytest

from adabatch.cli import main
from adabatch.cli._launch import launch

# A stand-in for `python -m adabatch.cli`: records its argv and environment, then exits as told by its process id.
CHILD = """
import json, os, sys, time
args = sys.argv[1:]
pid = int(args[args.index("--process-id") + 1])
with open(os.path.join(os.environ["OUT"], f"{pid}.json"), "w") as f:
    json.dump({"argv": args, "devices": os.environ["JAX_NUM_CPU_DEVICES"],
               "collectives": os.environ["JAX_CPU_COLLECTIVES_IMPLEMENTATION"]}, f)
if os.environ.get("FAIL") == str(pid):
    sys.exit(3)
time.sleep(float(os.environ.get("SLEEP", "0")))
"""


def test_launch_passes_the_distributed_flags_to_every_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    status = launch(["train", "--steps", "3"], 2, devices_per_process=2, port=12345,
                    program=[sys.executable, "-c", CHILD])  # fmt: skip
    assert status == 0
    for pid in (0, 1):
        record = json.loads((tmp_path / f"{pid}.json").read_text())
        assert record["argv"] == ["train", "--steps", "3", "--coordinator-address", "127.0.0.1:12345",
                                  "--num-processes", "2", "--process-id", str(pid)]  # fmt: skip
        assert record["devices"] == "2" and record["collectives"] == "gloo"


def test_a_failing_process_stops_the_others_and_sets_the_exit_status(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("FAIL", "1")
    monkeypatch.setenv("SLEEP", "60")  # process 0 would wait a minute: it must be stopped at once
    start = time.monotonic()
    assert launch(["train"], 2, program=[sys.executable, "-c", CHILD], poll_s=0.05) == 3
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["launch", "--num-processes", "2", "--", "demo"], "demo"),
        (["launch", "--num-processes", "2"], "--"),
        (["launch", "--num-processes", "2", "--", "train", "--process-id", "0"], "--process-id"),
    ],
)
def test_bad_launches_are_refused_in_one_line(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
