"""Every explanation method, assembled from the method modules' declarations.

Every module of ``convlens.kernels`` that declares a tuple ``SPECS`` of `MethodSpec` s
(see `convlens.kernels.spec`) contributes its methods; nothing registers itself at
import, and no method module imports this one, so there is no import cycle. The CLI's
choices, the store's arrays, the conformance tests, the audit and the renderer are all
generated from `METHODS`.

Adding a method family: write its module in ``convlens/kernels/`` with its kernels,
config and ``SPECS``. Nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from convlens.kernels.spec import (COMMON, INPUT_ATTR, INPUT_MAP, LAYER_MAP, SAMPLE, TARGET,  # noqa: F401
                                   MethodSpec, Output)


def method_modules() -> tuple[str, ...]:
    """The kernel modules (every module of ``convlens.kernels`` but this one and ``spec``)."""
    import convlens.kernels as pkg
    return tuple(sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                        if m.name not in ("registry", "spec") and not m.name.startswith("_")))


def _assemble(modules=None) -> dict[str, MethodSpec]:
    out: dict[str, MethodSpec] = {}
    for name in modules or method_modules():
        for spec in getattr(importlib.import_module(f"convlens.kernels.{name}"), "SPECS", ()):
            if spec.name in out:
                raise ValueError(f"method {spec.name!r} declared twice ({name})")
            out[spec.name] = spec
    return out


METHODS: dict[str, MethodSpec] = _assemble()


def resolve(model, method: str, options: dict | None = None):
    """``method``'s config for ``model`` from keyword options (checked, layer resolved)."""
    from convlens.errors import ConvlensError
    if method not in METHODS:
        raise ConvlensError(f"unknown method {method!r}; methods: {', '.join(sorted(METHODS))}")
    return METHODS[method].resolve(model, options or {})


def heatmap_methods() -> list[str]:
    """Methods with a map at input resolution (what live, render and audit draw)."""
    return sorted(m for m, s in METHODS.items() if s.heatmap)
