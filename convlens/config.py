"""Declared options: frozen config dataclasses whose fields say their range and meaning.

Every option a user can set (a method's, occlusion's, an ascent recipe's, a run's) is a
field of a frozen dataclass deriving from `Config`. A field declares its bounds with
`option` (``min``, ``max``, ``choices``; floats must be finite), and its meaning in the
class docstring's ``Attributes:`` section. From that one declaration:

* `Config.__post_init__` validates every value (one-line errors naming the option), so a
  config cannot exist with ``noise=nan`` or ``samples=-3``;
* `coerce` turns command-line strings into the field's type;
* `field_help` gives the command line's help text;

so no option is checked, parsed or documented in a second place.
"""

from __future__ import annotations

import dataclasses
import math
import re
import os
import re
from pathlib import Path
from typing import Any

from convlens.errors import OptionError


def option(default, *, min: float | None = None, max: float | None = None, choices: tuple | None = None,
           above: float | None = None, cli: bool = True) -> Any:
    """A config field with declared bounds.

    Args:
      default: the default value.
      min, max: inclusive bounds for numbers; above: an exclusive lower bound.
      choices: the allowed strings (a numeric value is still allowed where the field's
        type admits numbers, e.g. a baseline pixel value).
      cli: whether the command line offers the option.
    """
    meta = {"min": min, "max": max, "choices": choices, "above": above, "cli": cli}
    if isinstance(default, (list, dict, set)):
        import copy
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _describe(name: str, f: dataclasses.Field) -> str:
    m = f.metadata
    parts = []
    if m.get("above") is not None:
        parts.append(f"> {m['above']:g}")
    if m.get("min") is not None and m.get("max") is not None:
        parts.append(f"{m['min']:g}..{m['max']:g}")
    elif m.get("min") is not None:
        parts.append(f">= {m['min']:g}")
    elif m.get("max") is not None:
        parts.append(f"<= {m['max']:g}")
    if m.get("choices"):
        parts.append("one of " + ", ".join(map(str, m["choices"])))
    return " and ".join(parts)


def check_value(owner: str, name: str, value, f: dataclasses.Field) -> None:
    """Raises a one-line `ConvlensError` if ``value`` breaks the field's declaration."""
    m = f.metadata
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"{owner}: {name}={value} is not a finite number; give a value "
                                f"{_describe(name, f) or 'that is finite'}")
        lo, hi, above = m.get("min"), m.get("max"), m.get("above")
        if (lo is not None and value < lo) or (hi is not None and value > hi) or (above is not None
                                                                                  and value <= above):
            raise OptionError(f"{owner}: {name}={value} is out of range; give a value {_describe(name, f)}")
        return
    if isinstance(value, str) and m.get("choices") and value not in m["choices"] and not _open_string(f, value):
        raise OptionError(f"{owner}: {name}={value!r} is not valid; {_describe(name, f)}")
    if isinstance(value, tuple):
        for v in value:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                check_value(owner, name, v, f)


def _open_string(f: dataclasses.Field, value: str) -> bool:
    # Strings with a prefix syntax (``image:PATH``) are checked by the config itself.
    return ":" in value and any(str(c).endswith(":") for c in f.metadata.get("choices") or ())


class Config:
    """Base of every declared config: validates its fields after construction.

    Subclasses are frozen dataclasses; a subclass with its own ``__post_init__`` (to
    normalise a value) calls ``super().__post_init__()`` at its end."""

    _owner: str = ""

    def __post_init__(self):
        owner = self._owner or type(self).__name__
        for f in dataclasses.fields(self):
            check_value(owner, f.name, getattr(self, f.name), f)


def field_help(cls) -> dict[str, str]:
    """Each field's description from the class docstring's ``Attributes:`` section
    (Google style), joined into one line."""
    doc = cls.__doc__ or ""
    m = re.search(r"Attributes:\n(.*)", doc, re.S)
    if not m:
        return {}
    out: dict[str, str] = {}
    current = None
    for line in m.group(1).splitlines():
        hit = re.match(r"\s{2,8}(\w+(?:,\s*\w+)*):\s*(.*)", line)
        if hit and not line.startswith(" " * 10):
            names = [n.strip() for n in hit.group(1).split(",")]
            current = names
            for n in names:
                out[n] = hit.group(2).strip()
        elif current and line.strip():
            for n in current:
                out[n] = (out[n] + " " + line.strip()).strip()
        elif not line.strip() and current:
            continue
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in out.items() if k in fields}


def field_types(f: dataclasses.Field) -> set[str]:
    """The simple types a field's annotation admits: ``int``, ``float``, ``str``, ``bool``,
    ``tuple``, ``None``."""
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    out = set()
    for part in re.split(r"\s*\|\s*", str(ann)):
        base = part.split("[")[0].strip()
        out.add({"NoneType": "None"}.get(base, base))
    return out


def coerce(owner: str, f: dataclasses.Field, text):
    """A command-line string as the field's type (``"25"`` -> 25 for an int field,
    ``"true"`` -> True for a bool); strings a config parses itself pass through."""
    if not isinstance(text, str):
        return text
    types = field_types(f)
    if "Any" in types:
        return text  # the config parses it itself (e.g. a target spec)
    s = text.strip()
    if "bool" in types:
        low = s.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{owner}: {f.name}={text!r} is not true or false")
    if "None" in types and s.lower() in ("none", "null", ""):
        return None
    if "int" in types:
        try:
            return int(s)
        except ValueError:
            pass
    if "float" in types:
        try:
            return float(s)
        except ValueError:
            pass
    if "tuple" in types and "str" not in types:  # "10/50/90" -> (10, 50, 90); a size also as "8x6"
        out = []
        for part in (v.strip() for v in re.split(r"[/x×]", s) if v.strip()):
            try:
                out.append(int(part))
            except ValueError:
                try:
                    out.append(float(part))
                except ValueError:
                    raise OptionError(f"{owner}: {f.name}={text!r} is not numbers separated by / (e.g. 10/50/90, or 8x6 for a size)") \
                        from None
        return tuple(out)
    if "str" in types or "tuple" in types or "Pixels" in types:
        return s
    raise OptionError(f"{owner}: {f.name}={text!r} is not a {' or '.join(sorted(types - {'None'}))}")


def build(cls, options: dict, owner: str | None = None):
    """``cls(**options)`` with command-line strings coerced and unknown names refused."""
    owner = owner or getattr(cls, "_owner", "") or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(options) - set(fields)
    if unknown:
        raise OptionError(f"{owner} has no option {', '.join(sorted(unknown))}; its options: "
                            f"{', '.join(sorted(fields)) or 'none'}")
    kw = {k: coerce(owner, fields[k], v) for k, v in options.items()}
    try:
        return cls(**kw)
    except TypeError as e:  # a value of a type the config cannot take at all
        raise OptionError(f"{owner}: {e}") from None


def cache_root() -> Path:
    """Where convlens keeps what it learns about this machine: ``$CONVLENS_CACHE``
    (default ``~/.cache/convlens``): the XLA options measured per computation, and the
    command line's compiled programs."""
    root = os.environ.get("CONVLENS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "convlens")
    return Path(root)


def use_compile_cache() -> None:
    """Lets this process keep its compiled programs on disk (JAX's persistent compilation
    cache, under `cache_root`, at most 1 GiB), so the next command that compiles the same
    program loads it instead: the command line's second ``convlens explain`` on a model
    starts in a fraction of the first's time. Call before JAX is imported; a cache the user
    set (``JAX_COMPILATION_CACHE_DIR``) is kept, and ``CONVLENS_COMPILE_CACHE=off`` turns it
    off. The Python API leaves this to the user (it is a process-wide setting)."""
    if os.environ.get("CONVLENS_COMPILE_CACHE", "").lower() in ("0", "off", "no", "false"):
        return
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache_root() / "xla-programs")
        # JAX bounds the cache only with filelock installed (a dependency): without it,
        # every read of the cache warns and fails.
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))
