"""Module attributes that load on first use (PEP 562), so light subpackages stay light."""

from __future__ import annotations

import importlib


def lazy(namespace: dict, mapping: dict[str, str]):
    """A module ``__getattr__`` that imports ``mapping[name]`` (a module path) on first use
    of ``name`` and keeps the value in ``namespace`` (the module's globals)."""
    def __getattr__(name):
        if name in mapping:
            value = getattr(importlib.import_module(mapping[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    return __getattr__
