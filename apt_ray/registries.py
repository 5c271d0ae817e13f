"""What the backbone, method and task registries share: the error for a name registered twice, the message for
an unknown name, registering for the duration of a block, and importing the built-in plug-in modules once, on the
first lookup."""

from __future__ import annotations

import contextlib
import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any


class RegistryError(ValueError):
    """A name registered twice, or two declarations that disagree (raised when the second one is imported)."""


def unknown_name(kind: str, name: object, known: Iterable[str]) -> str:
    """``unknown <kind> '<name>' (did you mean '...'?): choose one of ...`` (no final full stop)."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {kind} '{name}'{hint}: choose one of {', '.join(known)}"


@contextlib.contextmanager
def registered_for_block(registry: Mapping[str, Any], name: str, register: Callable[[], Any],
                         unregister: Callable[[str], Any]) -> Iterator[Any]:
    """Run ``register()``, yield ``registry[name]``, and unregister it afterwards (unless it was replaced meanwhile)."""
    register()
    entry = registry[name]
    try:
        yield entry
    finally:
        if registry.get(name) is entry:
            unregister(name)


class Builtins:
    """The modules that register the built-in plug-ins, imported once, on the first lookup: importing a registry
    costs nothing, and a CLI that only parses arguments imports no model."""

    def __init__(self, modules: Iterable[str]) -> None:
        self.modules = tuple(modules)
        self.loaded = False

    def load(self) -> None:
        if self.loaded:
            return
        self.loaded = True  # first, so that a built-in module registering during its import does not recurse
        try:
            for module in self.modules:
                importlib.import_module(module)
        except BaseException:
            self.loaded = False
            raise
