"""Lazy re-exports for package ``__init__`` files: ``from clip_pl.callbacks import Telemetry`` imports
``clip_pl.callbacks.telemetry`` only when the name is asked for, so importing one submodule of a
package never imports its siblings (tests/test_layering.py holds every ``__init__`` to this)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``; ``exports`` maps a submodule's name (relative to the
    package) to the names it provides."""
    where = {name: f"{package}.{module}" for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(where)
