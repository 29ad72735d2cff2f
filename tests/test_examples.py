"""Smoke tests of the scripts in examples/ at tiny sizes."""

from __future__ import annotations

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_grows_the_batch_and_learns(capsys):
    result = _load("digits").main(["--steps", "12", "--eta", "0.5", "--max-batch-size", "32"])
    out = capsys.readouterr().out
    assert "batch-size trajectory" in out and "test accuracy" in out
    sizes = result["batch_sizes"]
    assert sizes[0] == 16 and sizes[-1] > 16 and sizes == sorted(sizes)
    assert result["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
