"""Writing a benchmark's results into its section of ``docs/benchmarks.md``."""

from __future__ import annotations

__all__ = ["replace_section"]


def replace_section(path: str, heading: str, text: str) -> None:
    """Replace (or append) the section of ``path`` that starts with the line ``heading`` (up to the next ``## ``
    heading) by ``text``; other sections stay untouched. A missing file is created with a ``# Benchmarks`` title."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        lines = ["# Benchmarks\n"]
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    body = text.rstrip("\n") + "\n"
    if start is None:
        new = "".join(lines).rstrip("\n") + "\n\n" + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + body + ("\n" + rest if rest else "")
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
