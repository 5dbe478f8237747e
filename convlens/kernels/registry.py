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


def parse_method_options(methods, pairs=(), layer: str | None = None) -> dict[str, dict]:
    """``-o KEY=VALUE`` (every method with that option) and ``-o METHOD.KEY=VALUE``, plus
    ``--layer`` for every method that takes a layer of its choosing:
    ``{method: {option: text}}`` (coerced and checked later, by each method's config)."""
    import dataclasses

    from convlens.errors import OptionError
    from convlens.kernels.spec import LAYER_SPATIAL
    per: dict[str, dict] = {m: {} for m in methods}
    for pair in pairs:
        if "=" not in pair:
            raise OptionError(f"-o {pair!r} is not KEY=VALUE")
        k, v = (a.strip() for a in pair.split("=", 1))
        target, _, key = k.rpartition(".")
        key = key.replace("-", "_")
        if target:
            if target not in per:
                raise OptionError(f"-o {pair!r}: {target!r} is not one of the methods run ({', '.join(methods)})")
            per[target][key] = v
            continue
        takers = [m for m in methods if key in {f.name for f in dataclasses.fields(METHODS[m].config)}]
        if not takers:
            raise OptionError(f"-o {pair!r}: no method run here has an option {key!r} (see `convlens methods`)")
        for m in takers:
            per[m][key] = v
    if layer:
        users = [m for m in methods if METHODS[m].layer == LAYER_SPATIAL]
        if not users:
            raise OptionError("--layer: none of the methods run takes a layer")
        for m in users:
            per[m].setdefault("layer", layer)
    return per


def describe(name: str | None = None) -> str:
    """The methods and their options as text (``convlens methods``; the docs' table):
    every method on a line, or one method in full."""
    import dataclasses

    from convlens.config import field_help
    from convlens.errors import OptionError
    if name:
        if name not in METHODS:
            raise OptionError(f"{name!r} is not a method; choose from {', '.join(sorted(METHODS))}")
        spec = METHODS[name]
        helps = field_help(spec.config)
        lines = [f"{name}: {spec.doc}"]
        lines += [f"  -o {f.name}={f.default!r}: {helps.get(f.name, '')}" for f in dataclasses.fields(spec.config)
                  if not f.name.startswith("_")]
        lines.append("  outputs: " + ", ".join(f"{o.name} ({', '.join(o.dims)})" for o in spec.outputs))
        return "\n".join(lines)
    out = []
    for n in sorted(METHODS):
        spec = METHODS[n]
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(spec.config)
                         if not f.name.startswith("_"))
        out.append(f"{n:22s} {spec.doc}" + (f"  [{opts}]" if opts else ""))
    return "\n".join(out)
