"""Smoke tests of ``adabatch demo --quick`` and ``adabatch train`` (in-process, tiny sizes)."""

from __future__ import annotations

import json
import shutil

import pytest

from adabatch.cli import main

SUMMARY_KEYS = {"test_accuracy", "steps", "samples", "compilations", "wall_time_s", "batch_sizes", "params_sha256"}


def test_demo_quick_writes_metrics_summary_and_plots(tmp_path, capsys):
    # The smallest demo: 4 steps of the small-batch run, 1 of the others (each distinct batch size compiles a step).
    argv = ["demo", "--quick", "--quiet", "--steps", "4", "--eval-every", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"small", "adaptive", "large"}
    for name, run in summary.items():
        assert SUMMARY_KEYS <= set(run), name
        assert run["steps"] == len(run["batch_sizes"]) and run["samples"] == sum(run["batch_sizes"])
        assert 1 <= run["compilations"] <= 3 and len(run["params_sha256"]) == 64
    assert summary["small"]["steps"] == 4 * summary["adaptive"]["steps"]
    base = summary["small"]["reached_target"]
    for run in summary.values():  # every ratio compares steps and samples to the target on both sides
        if run["reached_target"] is not None and base is not None:
            assert run["fewer_steps_to_target"] == base["steps"] / run["reached_target"]["steps"]
            assert run["samples_to_target_ratio"] == run["reached_target"]["samples"] / base["samples"]
        else:
            assert run["fewer_steps_to_target"] is None
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == sum(run["steps"] for run in summary.values())
    assert {line["run"] for line in lines} == set(summary)
    for plot in ("loss_vs_samples.png", "loss_vs_steps.png", "batch_size.png", "test_accuracy.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "adaptive" in table and "target at step" in table and "× fewer steps" in table


def train(tmp_path, out, *extra):
    argv = [
        "train",
        "--quiet",
        "--model",
        "mlp",
        "--batch-size",
        "16",
        "--max-batch-size",
        "16",
        "--out",
        str(tmp_path / out),
        *extra,
    ]
    assert main(argv) == 0
    (run,) = json.loads((tmp_path / out / "summary.json").read_text()).values()
    return run


def test_train_resumes_bit_identically_refuses_steps_not_past_the_checkpoint_and_summarises_the_whole_run(
    tmp_path, capsys
):
    # Each training costs its compilations and plots, so one full run and one resume make all the checks of resuming
    # (those of the --steps refusal and of the whole-run summary included, which test_cli_flags.py would otherwise
    # repeat with trainings of their own).
    ckpt = tmp_path / "ckpt"
    full = train(
        tmp_path, "full", "--steps", "4", "--eval-every", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"
    )
    assert SUMMARY_KEYS <= set(full) and full["steps"] == 4 and full["compilations"] == 1
    assert full["batch_sizes"] == [16, 16, 16, 16]
    # --steps not past the latest checkpoint (step 4): refused in one line, nothing overwritten.
    before = (tmp_path / "full" / "summary.json").read_text()
    argv = ["train", "--quiet", "--model", "mlp", "--batch-size", "16", "--max-batch-size", "16", "--steps", "4"]
    argv += ["--checkpoint-dir", str(ckpt), "--resume", "--out", str(tmp_path / "full")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--steps 4" in err and "step 4" in err
    assert (tmp_path / "full" / "summary.json").read_text() == before
    # A run stopped after step 2 has exactly the step-2 checkpoint and the metrics of steps 1 and 2: resume from
    # copies of them.
    stopped = tmp_path / "stopped"
    shutil.copytree(ckpt, stopped, ignore=lambda d, names: ["4"] if d == str(ckpt) else [])
    (tmp_path / "part").mkdir()
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "part" / "metrics.jsonl").write_text("".join(lines[:2]))
    assert [json.loads(line)["step"] for line in lines[:2]] == [1, 2]
    resumed = train(tmp_path, "part", "--steps", "4", "--checkpoint-dir", str(stopped), "--resume")
    assert resumed["steps"] == 4 and resumed["params_sha256"] == full["params_sha256"]
    # The resumed run appended steps 3 and 4; its summary covers the whole run.
    assert [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    assert resumed["batch_sizes"] == full["batch_sizes"]


def test_train_refuses_to_overwrite_checkpoints_and_reports_missing_ones(tmp_path, capsys):
    ckpt = tmp_path / "empty"
    argv = ["train", "--quiet", "--model", "mlp", "--steps", "2", "--out", str(tmp_path / "o"), "--checkpoint-dir"]
    assert main([*argv, str(ckpt), "--resume"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err and not ckpt.exists()


@pytest.mark.parametrize("flag, value", [("--rule", "nope"), ("--optimizer", "adamw2")])
def test_unknown_names_list_the_valid_choices(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert value in err and "valid choices" in err and ("norm" in err if flag == "--rule" else "adagrad_norm" in err)
