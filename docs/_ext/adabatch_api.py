"""Sphinx helpers for the adabatch API reference.

* ``.. adabatch-api:: adabatch.stats`` writes the reference of one subpackage from its ``__all__``: the package
  docstring, then one section per private implementation module (its docstring: the maths, the defaults, the
  references) followed by the public names it defines, each documented once at its public home
  (``adabatch.stats.GradStats``, never ``adabatch.stats._grad_stats.GradStats``). A public submodule in ``__all__``
  (``adabatch.stats.ghost``) gets its own section. A name added to ``__all__`` appears without editing a page.
* Cross-references resolve to that public home from the other names the docstrings use: the flat names
  (``adabatch.grad_stats`` → ``adabatch.stats.grad_stats``) and short names written inside a private module
  (``:func:`merge``` in ``adabatch/stats/_grad_stats.py``). Deprecated names (``adabatch.train``,
  ``adabatch.batch_size``) do not resolve: a docstring that still names them fails the build.
* The fields of a state ``NamedTuple`` are documented by the comment that follows them in the source
  (``count: jax.Array  # int32[]: updates seen``), the project's convention for states.
* Each entry of a ``References:`` section (authors, title, year, link) becomes one bullet.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import re
import tokenize
import types
import warnings
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# Section titles of the implementation modules; a module not listed here is titled by its docstring's first line.
TITLES = {
    "adabatch.stats._grad_stats": "GradStats and the estimators",
    "adabatch.stats._per_example": "Producers: per-example statistics",
    "adabatch.stats._ghost": "Ghost statistics",
    "adabatch.stats._microbatch": "Producers: group means (micro-batches, devices)",
    "adabatch.stats._inputs": "How transformations receive statistics",
    "adabatch.stats._noise_scale": "Gradient noise scale",
    "adabatch.rules._batch_size_tests": "Batch-size tests (AdAdaGrad)",
    "adabatch.rules._noise_scale_rule": "Noise-scale rule",
    "adabatch.rules._common": "Shared by every rule",
    "adabatch.optimizers._adagrad": "AdaGrad and AdaGrad-Norm",
    "adabatch.optimizers._adadagrad": "AdAdaGrad and AdAdaGrad-Norm",
    "adabatch.optimizers._adabelief": "AdaBelief",
    "adabatch.scaling._batch_size_scaling": "Learning rate vs batch size",
    "adabatch.scaling._adascale": "AdaScale",
    "adabatch.training._step": "The training step",
    "adabatch.training._fit": "The host loop",
    "adabatch.training._data_order": "Data order",
    "adabatch.training._checkpoint": "Checkpoints",
    "adabatch.flax._loss": "Per-example losses",
    "adabatch.flax._training": "Training Flax models",
    "adabatch.flax._ghost": "Ghost statistics for linen layers",
}
# Sections follow the order of TITLES; modules not listed come after, in the order of ``__all__``.

SUBPACKAGES = ("stats", "rules", "optimizers", "scaling", "curvature", "training", "flax")


def _quiet_getattr(obj: Any, name: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return getattr(obj, name)


def _home_module(package: types.ModuleType, name: str, obj: Any) -> str:
    """The private module of ``package`` that defines public ``name``."""
    module = getattr(obj, "__module__", None)
    if isinstance(module, str) and module.startswith(package.__name__ + "._"):
        return module
    # constants (tuples, ints) carry no __module__: find the private module that assigns the name itself
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name.rpartition(".")[2].startswith("_"):
            candidate = importlib.import_module(info.name)
            if getattr(candidate, name, None) is obj and _defines(candidate, name):
                return info.name
    return package.__name__


def _defines(module: types.ModuleType, name: str) -> bool:
    """Whether ``module`` assigns ``name`` itself (not only imports it)."""
    source = inspect.getsource(module)
    return re.search(rf"^{re.escape(name)}\b\s*(:[^=]*)?=", source, flags=re.M) is not None


def _title(module: types.ModuleType) -> str:
    """A section title from a module docstring's first line: the part before its first colon (``"Eve: Adam ..."``)."""
    first = (module.__doc__ or module.__name__).strip().splitlines()[0]
    head = first.split(": ", 1)[0]
    return head if len(head) <= 60 else first


def _section(title: str, underline: str) -> list[str]:
    return ["", title, underline * len(title), ""]


class AdabatchApi(SphinxDirective):
    """The reference of one subpackage (see the module docstring)."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        package = importlib.import_module(self.arguments[0])
        groups: dict[str, list[str]] = {}
        submodules: list[str] = []
        for name in package.__all__:
            obj = _quiet_getattr(package, name)
            if isinstance(obj, types.ModuleType):
                submodules.append(obj.__name__)
            else:
                groups.setdefault(_home_module(package, name, obj), []).append(name)
        order = list(TITLES)
        lines = [f".. automodule:: {package.__name__}", ""]
        for module_name in sorted(groups, key=lambda m: order.index(m) if m in order else len(order)):
            names = groups[module_name]
            if module_name == package.__name__:
                title = "Other names"
            else:
                title = TITLES.get(module_name) or _title(importlib.import_module(module_name))
            lines += _section(title, "-")
            if module_name != package.__name__:
                # the module's docstring, without registering the private module as a documented object
                lines += [f".. automodule:: {module_name}", "   :no-index:", ""]
            lines += [f".. currentmodule:: {package.__name__}", ""]
            for name in names:
                lines += _document(package, name)
        for module_name in submodules:
            submodule = importlib.import_module(module_name)
            # names the package re-exports are documented once, above, at the package
            shared = [
                n for n in getattr(submodule, "__all__", []) if getattr(package, n, None) is getattr(submodule, n)
            ]
            lines += _section(f"``{module_name}``", "-")
            lines += [f".. automodule:: {module_name}", "   :members:"]
            lines += [f"   :exclude-members: {', '.join(shared)}", ""] if shared else [""]
            lines += (
                [f"Also here: {', '.join(f':obj:`{package.__name__}.{n}`' for n in shared)}.", ""] if shared else []
            )
        lines += [f".. currentmodule:: {package.__name__}", ""]
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=self.arguments[0]), container)
        return container.children


class AdabatchFlatNames(SphinxDirective):
    """A list of the flat names of ``adabatch.__all__``, each linked to its documentation in its subpackage."""

    def run(self) -> list[nodes.Node]:
        import adabatch

        lines = []
        for name in sorted(adabatch.__all__, key=str.lower):
            obj = _quiet_getattr(adabatch, name)
            if isinstance(obj, types.ModuleType):
                lines.append(f"* ``adabatch.{name}``: :mod:`{_CANONICAL.get(id(obj), obj.__name__)}`")
            elif inspect.isclass(obj):
                lines.append(f"* ``adabatch.{name}``: :class:`{_CANONICAL.get(id(obj), name)}`")
            elif callable(obj):
                lines.append(f"* ``adabatch.{name}``: :func:`{_CANONICAL.get(id(obj), name)}`")
            else:
                lines.append(f"* ``adabatch.{name}``")
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="adabatch"), self.content_offset, container)
        return container.children


def _document(package: types.ModuleType, name: str) -> list[str]:
    obj = _quiet_getattr(package, name)
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return [f".. autoexception:: {name}", ""]
    if inspect.isclass(obj):
        return [f".. autoclass:: {name}", "   :members:", ""]
    if callable(obj):
        return [f".. autofunction:: {name}", ""]
    return [f".. autodata:: {name}", ""]


# --- cross-references ----------------------------------------------------------------------------------------------

_CANONICAL: dict[int, str] = {}


def _collect_canonical(app: Sphinx) -> None:
    import adabatch

    for sub in SUBPACKAGES:
        package = importlib.import_module(f"adabatch.{sub}")
        _CANONICAL[id(package)] = package.__name__
        for name in package.__all__:
            obj = _quiet_getattr(package, name)
            if isinstance(obj, types.ModuleType):
                _CANONICAL[id(obj)] = obj.__name__
            elif inspect.isclass(obj) or inspect.isroutine(obj):
                _CANONICAL[id(obj)] = f"{package.__name__}.{name}"
    _CANONICAL[id(adabatch)] = "adabatch"


def _lookup(dotted: str) -> Any:
    """The object a dotted name stands for, or None (deprecated names are None too)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                obj = importlib.import_module(".".join(parts[:split]))
                for attr in parts[split:]:
                    obj = getattr(obj, attr)
            return obj
        except (ImportError, AttributeError, DeprecationWarning):
            continue
    return None


def _public_package(module: str) -> str:
    """``adabatch.stats._grad_stats`` → ``adabatch.stats``: the public package above a private module."""
    parts = module.split(".")
    while parts and any(p.startswith("_") for p in parts):
        parts.pop()
    return ".".join(parts)


def _resolve_missing(app: Sphinx, env: Any, node: Any, contnode: nodes.Node) -> nodes.Node | None:
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    context = node.get("py:module") or ""
    candidates = [target]
    if context:
        candidates += [f"{context}.{target}", f"{_public_package(context)}.{target}"]
    if not target.startswith("adabatch"):
        candidates += [f"adabatch.{target}"]
    for candidate in candidates:
        if not candidate.startswith("adabatch"):
            continue
        obj = _lookup(candidate)
        if obj is None:
            continue
        canonical = _CANONICAL.get(id(obj))
        if canonical is None and not isinstance(obj, types.ModuleType):
            # a method or attribute of a documented class: the class's home plus the rest of the name
            owner, _, attr = candidate.rpartition(".")
            owner_obj = _lookup(owner)
            if owner_obj is not None and id(owner_obj) in _CANONICAL:
                canonical = f"{_CANONICAL[id(owner_obj)]}.{attr}"
        if canonical is None or canonical == target:
            continue
        domain = env.get_domain("py")
        new = node.deepcopy()
        new["reftarget"] = canonical
        for typ in (node["reftype"], "obj"):
            resolved = domain.resolve_xref(env, node["refdoc"], app.builder, typ, canonical, new, contnode)
            if resolved is not None:
                return resolved
    return None


# --- NamedTuple fields ---------------------------------------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            match = re.match(r"\s*(\w+)\s*:", tok.line)
            if match and tok.line.lstrip().startswith(match.group(1)):
                text = re.sub(r"^type:\s*ignore(\[[^\]]*\])?\s*(#\s*)?", "", tok.string.lstrip("#").strip())
                comments[match.group(1)] = text
    return comments


def _field_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what not in ("attribute", "property") or not lines or not lines[0].startswith("Alias for field number"):
        return
    owner_name, _, field = name.rpartition(".")
    owner = _lookup(owner_name)
    comment = _field_comments(owner).get(field) if inspect.isclass(owner) else None
    lines[:] = [comment] if comment else []


# --- References sections ---------------------------------------------------------------------------------------

# an entry ends with its link, or with a sentence after the link: "..., 2021, https://arxiv.org/abs/... (note)."
_ENTRY_END = re.compile(r"https?://\S+?\.?$|https?://.*\.$")


def _reference_list(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """One bullet per entry of a ``References:`` section, before napoleon runs."""
    start = next((i for i, line in enumerate(lines) if line.strip() == "References:"), None)
    if start is None:
        return
    header_indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > header_indent):
        end += 1
    body = [line for line in lines[start + 1 : end] if line.strip()]
    if not body:
        return
    indent = " " * (len(body[0]) - len(body[0].lstrip()))
    entries: list[list[str]] = [[]]
    for line in body:
        if entries[-1] and _ENTRY_END.search(entries[-1][-1].strip()):
            entries.append([])
        entries[-1].append(line.strip())
    bullets = []
    for entry in entries:
        bullets += [f"{indent}* {entry[0]}"] + [f"{indent}  {text}" for text in entry[1:]]
    lines[start + 1 : end] = bullets + ([""] if end < len(lines) else [])


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("adabatch-api", AdabatchApi)
    app.add_directive("adabatch-flat-names", AdabatchFlatNames)
    app.connect("builder-inited", _collect_canonical)
    app.connect("missing-reference", _resolve_missing)
    app.connect("autodoc-process-docstring", _field_docstring)
    app.connect("autodoc-process-docstring", _reference_list, priority=400)  # napoleon's handler runs at 500
    return {"parallel_read_safe": True, "parallel_write_safe": True}
