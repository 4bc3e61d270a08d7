"""Name -> class registries for tasks, methods and backends.

Adding a task/method/backend is one module that calls ``REGISTRY.register("name")`` plus one yaml in
``conf/<group>/``; a new file is picked up without editing any list.

Lazy by convention: the module of name ``X`` is ``<package>.X`` (``lm/hf.py`` registers generator ``hf``,
``rm/openai.py`` reward ``openai``, ``methods/qalign.py`` method ``qalign``), so ``get("X")`` imports that one
module and nothing else, and a stage imports only the backends, methods and tasks it names (evaluate, predict
and plot on a stored run import no torch, vLLM or httpx; ``tests/test_lazy_imports.py``). A module may register
other names too (``tasks/gsm_symbolic.py`` registers ``gsm_symbolic_p1`` and ``_p2``): those are found by the
fallback, which imports every module of the package, as do ``names()`` and the error listing what is allowed.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists what is allowed."""


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def _load_all(self) -> None:
        if self._loaded:
            return
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")
        self._loaded = True

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._entries)

    def _load_named(self, name: str) -> None:
        """Import ``<package>.<name>`` when such a module exists (the naming convention of the module doc)."""
        if not name.isidentifier() or name.startswith("_"):
            return
        module = f"{self.package}.{name}"
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            importlib.import_module(module)

    def get(self, name: str) -> T:
        if name not in self._entries:
            self._load_named(name)
        if name not in self._entries:
            self._load_all()
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            )
        return self._entries[name]
