"""Name -> entry registries: models, objectives, curation steps, eval tasks, tokenizers, ...

One implementation for every registry, one way to fill it: an entry registers itself with
the ``@REGISTRY.register(name)`` decorator where it is defined. A registry whose entries live
in a package of their own (``package="train.objectives"``) imports every module of that
package the first time it is queried, so a new entry is a new file in the package and no
list of imports has to name it. Registering a name twice raises, and an unknown name raises
with the closest known names, so a typo in a config fails loudly.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str = ""):
        self.kind, self.package = kind, package
        self._entries: dict[str, T] = {}
        self._filled = not package

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add if obj is None else add(obj)

    def _fill(self) -> None:
        """Import every module of ``package`` once: each registers its own entries."""
        if self._filled:
            return
        self._filled = True
        for module in pkgutil.iter_modules(importlib.import_module(self.package).__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    @property
    def entries(self) -> dict[str, T]:
        self._fill()
        return self._entries

    def get(self, name: str) -> T:
        try:
            return self.entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries))})") from None

    def config(self, name: str) -> type:
        """The ``Config`` dataclass of entry ``name``: the schema of its config section."""
        return self.get(name).Config

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries
