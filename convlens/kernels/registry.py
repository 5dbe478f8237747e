"""Every explanation method, assembled from the method modules' declarations.

Each module listed in `MODULES` declares a tuple ``SPECS`` of `MethodSpec` s (see
`convlens.kernels.spec`); nothing registers itself at import, and no method module
imports this one, so there is no import cycle. The CLI's choices, the store's arrays,
the conformance tests, the audit and the renderer are all generated from `METHODS`.

Adding a method family: write its module with its kernels, config and ``SPECS``, and add
the module's name to `MODULES`.
"""

from __future__ import annotations

import importlib

from convlens.kernels.spec import (COMMON, INPUT_ATTR, INPUT_MAP, LAYER_MAP, SAMPLE, TARGET,  # noqa: F401
                                   MethodSpec, Output)

MODULES = ("cam", "cam_gradfree", "gradients", "occlusion", "sampling")


def _assemble(modules=MODULES) -> dict[str, MethodSpec]:
    out: dict[str, MethodSpec] = {}
    for name in modules:
        for spec in importlib.import_module(f"convlens.kernels.{name}").SPECS:
            if spec.name in out:
                raise ValueError(f"method {spec.name!r} declared twice ({name})")
            out[spec.name] = spec
    return out


METHODS: dict[str, MethodSpec] = _assemble()


def all_outputs(spec: MethodSpec) -> tuple[Output, ...]:
    return spec.all_outputs


def heatmap_methods() -> list[str]:
    """Methods with a map at input resolution (what live, render and audit draw)."""
    return sorted(m for m, s in METHODS.items() if s.heatmap)
