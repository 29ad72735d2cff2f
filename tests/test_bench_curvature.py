"""``adabatch bench curvature``: the quick run measures ratios and writes only its own section; the PyHessian peer
runs when torch and pyhessian are installed (the ``bench`` extra) and is skipped with a note when they are not; the
issue's targets are judged met or missed from the numbers."""

import pytest

from adabatch.benchmarks import _pyhessian_peer, curvature
from adabatch.cli import main


def _section(text: str) -> str:
    return text.split("## Curvature")[1]


def test_bench_curvature_quick_writes_its_section(tmp_path, monkeypatch):
    # Whatever is installed here, take the path of a machine without the `bench` extra (CI's).
    monkeypatch.setattr(_pyhessian_peer, "unavailable", lambda: "torch not installed (the `bench` extra)")
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Curvature\n\nold numbers\n\n## Training step\n\nkeep me\n")
    assert main(["bench", "curvature", "--quick", "--models", "mlp", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Training step\n\nkeep me\n" in text and "old numbers" not in text
    assert text.count("## Curvature") == 1
    section = _section(text)
    row = next(line for line in section.splitlines() if line.startswith("| MLP"))
    assert row.count("×") == 3  # HVP and two spectra, as ratios to the plain gradient
    assert "PyHessian comparison: torch not installed" in section
    assert "**PyHessian**" not in section  # no peer table
    assert "no model with ≥ 100k parameters" in section  # the quick MLP is small


def test_bench_curvature_against_pyhessian(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("pyhessian")
    out = tmp_path / "benchmarks.md"
    args = ["bench", "curvature", "--quick", "--models", "mlp", "--spectra", "2x1,3x2", "--out", str(out)]
    assert main(args) == 0
    section = _section(out.read_text())
    assert "failed" not in section, section
    assert "torch.set_num_threads" in section and "PyHessian 0.1" in section
    rows = [line for line in section.splitlines() if line.startswith("| MLP")]
    assert len(rows) == 3  # adabatch, PyHessian, head to head
    assert rows[1].count("×") == 5  # HVP, two densities, top eig, trace as ratios to the PyTorch backward
    assert rows[2].count(" s / ") == 2  # adabatch spectrum / PyHessian density, for 2×1 and 3×2


def _result(plain, hvp, m20, m100, peer20=None, d=669_706):
    return {
        "model": "mlp",
        "B": 128,
        "d": d,
        "times": {"plain": plain, "HVP": hvp, "20×1": m20, "100×1": m100},
        "peer": {} if peer20 is None else {"plain": 1.0, "20×1": peer20},
        "peer_d": d,
    }


def test_targets_say_met_or_missed_with_the_numbers():
    # HVP 2× plain, Lanczos step (1.9 - 0.3) / 80 / 0.02 = 1.0× an HVP, spectrum 0.3 s vs density 0.6 s: all met.
    (line,) = curvature.targets([_result(0.01, 0.02, 0.3, 1.9, peer20=0.6)])
    assert line.count("**met**") == 3 and "2.00×" in line and "1.00×" in line and "20×1: 0.50" in line
    # HVP 4× plain, step 2× an HVP, spectrum slower than PyHessian's density: all missed.
    (line,) = curvature.targets([_result(0.01, 0.04, 0.3, 6.7, peer20=0.2)])
    assert line.count("**missed**") == 3
    (line,) = curvature.targets([_result(0.01, 0.02, 0.3, 1.9)])
    assert "not measured" in line
    assert curvature.targets([_result(0.01, 0.02, 0.3, 1.9, d=10_000)]) == []


def test_bad_spectra_are_rejected():
    assert curvature.parse_spectra("20x1,100×8") == ((20, 1), (100, 8))
    for bad in ("20", "0x1", "ax1", "20x1x2"):
        with pytest.raises(SystemExit, match="--spectra"):
            curvature.parse_spectra(bad)
