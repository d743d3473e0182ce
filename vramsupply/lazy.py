"""A package's names, each loaded from its module on first use (PEP 562).

Why: a package ``__init__`` that imports its modules makes every importer of any one of them pay
for all of them. ``vramsupply.platform.state`` (a small dataclass file) imported through the package
brought aiohttp; ``vramsupply.engine.trained_context`` brought llama.cpp's grammar converter, numpy and
jsonschema. So `vramsupply status`, `earnings`, `plan` or `service status` spent a fifth to a
third of a second importing what they never use (``python -X importtime``), in each of the
hundreds of child processes of the test suite as well. With the names resolved lazily, each command
imports what it calls, and ``from vramsupply.engine import Engine`` still works as before.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, homes: Mapping[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """The ``__getattr__``, ``__dir__`` and ``__all__`` of ``package``, whose names live in the
    modules ``homes`` maps them from (module name: its names)."""
    home_of = {name: module for module, names in homes.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = home_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # found at once the next time
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(home_of))

    return __getattr__, __dir__, sorted(home_of)
