"""Smoke test of ``adabatch bench curvature --quick``: it runs, measures ratios, and writes only its own section."""

from adabatch.cli import main


def test_bench_curvature_quick_writes_its_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Curvature\n\nold numbers\n\n## Training step\n\nkeep me\n")
    assert main(["bench", "curvature", "--quick", "--models", "mlp", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Training step\n\nkeep me\n" in text and "old numbers" not in text
    assert text.count("## Curvature") == 1
    row = next(line for line in text.split("## Curvature")[1].splitlines() if line.startswith("| MLP"))
    assert row.count("×") == 3  # HVP and two spectra, as ratios to the plain gradient
