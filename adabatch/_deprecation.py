"""Old names kept for one release: each warns once per use with a ``DeprecationWarning`` naming its successor
(base layer: imports nothing of adabatch at import time)."""

from __future__ import annotations

import importlib
import importlib.abc
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["deprecated_getattr", "warn"]


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Emit the ``DeprecationWarning`` for ``old`` (removed in the next release), naming ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def deprecated_getattr(module: str, renamed: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving old attribute names: ``renamed[old] = ("pkg.module", "new_name")``."""

    def __getattr__(name: str) -> Any:
        if name not in renamed:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, new = renamed[name]
        warn(f"{module}.{name}", f"{where}.{new}" if new else where)
        target = importlib.import_module(where)
        return getattr(target, new) if new else target

    return __getattr__


class RenamedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A ``sys.meta_path`` finder serving the module paths of the previous release (``adabatch.train``, ...): each
    old path imports as a module whose attributes come from its new home(s), with a ``DeprecationWarning``."""

    def __init__(self, renamed: dict[str, tuple[str, ...]]):
        self.renamed = renamed

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.renamed:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> None:
        return None  # the default module object

    def exec_module(self, module: Any) -> None:
        homes = self.renamed[module.__name__]
        warn(f"module {module.__name__}", " / ".join(homes), stacklevel=2)
        targets = [importlib.import_module(home) for home in homes]

        def __getattr__(name: str) -> Any:
            for target in targets:
                if hasattr(target, name):
                    return getattr(target, name)
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__
