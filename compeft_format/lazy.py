"""Packages whose attributes are imported when first used (PEP 562), so that ``compeft --help``
and the commands that need no tensors start without importing torch. ``compeft_format`` and
``cpet_adapters`` both install it."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any


def install(package: str, names: Mapping[str, Sequence[str]], *, submodules: Sequence[str] = (),
            functions: Sequence[str] = ()) -> None:
    """Make ``package`` resolve each name of ``names`` (submodule -> the names it defines) and
    each of ``submodules`` on first use. A name in ``functions`` is also a submodule's name
    (``compress``, ``train``): the attribute stays the function once the submodule is imported,
    where the import system would set it to the submodule."""
    module = sys.modules[package]
    where = {name: sub for sub, defined in names.items() for name in defined}

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f".{name}", package)
        sub = where.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{sub}", package), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(getattr(module, "__all__", ())))

    class Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if name in functions and isinstance(value, types.ModuleType):
                value = getattr(value, name)
            super().__setattr__(name, value)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__dir__ = __dir__  # type: ignore[method-assign]
    module.__class__ = Package


__all__ = ["install"]
