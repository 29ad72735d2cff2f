"""The package's layering: imports run from a higher layer to a lower one only, and no module imports itself back.

Every ``import``/``from ... import`` of an ``adabatch`` module anywhere in a file (top level or inside a function:
a lazy import is still a dependency) is an edge of the module graph. The test fails on any cycle of modules and on
any edge from a lower layer up to a higher one (or across two sibling subpackages of the same layer).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adabatch

PACKAGE = Path(adabatch.__file__).parent

# Layer of each top-level component of the package (docs/architecture.md draws the same picture).
LAYERS = {
    "_validation": 0,
    "_tree": 0,
    "_deprecation": 0,
    "stats": 1,
    "rules": 2,
    "optimizers": 3,
    "scaling": 4,
    "curvature": 3,
    "training": 5,
    "datasets": 5,
    "flax": 6,
    "experiments": 7,
    "benchmarks": 7,
    "cli": 8,
    "__init__": 9,  # the package root re-exports everything and wires the layers together
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The adabatch modules that ``path`` imports (``from pkg import name`` counts ``pkg.name`` when that is a
    module, else ``pkg``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "adabatch")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "adabatch":
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            # ``from pkg import submodule`` depends on the submodule (Python runs every parent package's
            # __init__ on any import; that is not a dependency of the importing module's design).
            found.update(submodules or {target})
    return {name for name in found if name in known and name != module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, name, known) for name, path in mods.items()}


def test_every_component_has_a_layer():
    unknown = {component(m) for m in modules()} - set(LAYERS)
    assert not unknown, f"new top-level modules or subpackages need a layer in LAYERS: {sorted(unknown)}"


def test_imports_run_from_a_higher_layer_to_a_lower_one():
    bad = []
    for source, targets in graph().items():
        for target in targets:
            a, b = component(source), component(target)
            if target == "adabatch" or a == b:
                if target == "adabatch" and source != "adabatch":
                    bad.append(f"{source} imports the package root")
                continue
            if LAYERS[a] <= LAYERS[b]:
                bad.append(f"{source} (layer {LAYERS[a]}) imports {target} (layer {LAYERS[b]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    edges = graph()
    # Subpackage __init__ modules re-export their private modules; a private module importing its own package
    # __init__ (``from adabatch.stats import X`` inside adabatch/stats/) would be a cycle, and is reported.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("source", "target", "problem"),
    [
        ("from adabatch.training import fit\n", "adabatch.stats._x", "imports adabatch.training"),
        ("import adabatch.flax\n", "adabatch.rules._x", "imports adabatch.flax"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, source, target, problem):
    """The checker itself is not vacuous: an upward import in a lower layer is found."""
    path = tmp_path / "_x.py"
    path.write_text(source)
    found = imports(path, target, set(modules()))
    assert found and all(LAYERS[component(target)] <= LAYERS[component(t)] for t in found), problem
