"""Smoke test of ``adabatch bench stats --quick``: it runs, and it rewrites only its own section of the output."""

from adabatch.cli import main


def test_bench_stats_quick_writes_its_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Training step\n\nkeep me\n\n## Per-example statistics\n\nold numbers\n")
    code = main(["bench", "stats", "--quick", "--models", "mlp", "--no-torch", "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert "## Training step\n\nkeep me\n" in text
    assert "old numbers" not in text
    assert text.count("## Per-example statistics") == 1
    section = text.split("## Per-example statistics")[1]
    assert "adabatch bench stats --quick" in section
    row = next(line for line in section.splitlines() if line.startswith("| 16 |"))
    assert "×" in row  # ratios to the plain step were measured


def test_bench_stats_resident_heap_has_its_own_section(tmp_path, monkeypatch):
    from adabatch.benchmarks import stats

    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\n## Per-example statistics\n\nthe default run\n")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4000000000")
    assert stats.heading() == "## Per-example statistics, resident heap"
    stats.write_section(str(out), stats.render([], [], "cmd"))
    text = out.read_text()
    assert "the default run" in text and "glibc malloc: MALLOC_TRIM_THRESHOLD_=4000000000" in text
    assert text.index("## Per-example statistics\n") < text.index("## Per-example statistics, resident heap")
