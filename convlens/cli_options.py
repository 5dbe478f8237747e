"""Command-line pieces shared by every ``convlens`` command: click options generated
from config dataclasses (`config_options`), the model, method and output options, and
turning what was given into config objects (`build`)."""

from __future__ import annotations

import dataclasses
import sys

import click

from convlens.errors import OptionError

# ---------------------------------------------------------------- options from configs


def config_options(cls, *, include: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()):
    """A decorator adding one click option per field of the config dataclass ``cls``.

    Booleans become ``--x/--no-x`` flags; everything else a string the config coerces
    and checks (so bad values get the config's own one-line error). Options not given
    arrive as ``None`` and leave the config's default."""
    from convlens.config import field_help, field_types
    helps = field_help(cls)
    chosen = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in exclude
              and not f.name.startswith("_") and (include is None or f.name in include)]

    def deco(fn):
        for f in reversed(chosen):
            name = f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            text = helps.get(f.name, "")
            if field_types(f) == {"bool"}:
                fn = click.option(f"--{name}/--no-{name}", f.name, default=None,
                                  help=f"{text} [default: {'yes' if default else 'no'}]")(fn)
                continue
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(map(str, choices))})" if choices and field_types(f) <= {"str", "None"} \
                else ""
            t = field_types(f) - {"None"}
            meta = "N" if t == {"int"} else ("X" if t <= {"int", "float"} else "TEXT")
            fn = click.option(f"--{name}", f.name, default=None, metavar=meta,
                              help=f"{text}{extra}" + ("" if default is None else f" [default: {default}]"))(fn)
        return fn
    return deco


def build(cls, kw: dict, **fixed):
    """``cls`` from the given (non-None) values of its fields in ``kw`` (taken out of it)."""
    from convlens.config import build as make
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: kw.pop(k) for k in list(kw) if k in names}
    return make(cls, {**{k: v for k, v in given.items() if v is not None}, **fixed})


def model_options(f):
    from convlens.models.registry import LoadOptions
    return config_options(LoadOptions)(f)


def method_options(f):
    f = click.option("--option", "-o", "options", multiple=True, metavar="[METHOD.]KEY=VALUE",
                     help="Method option, e.g. -o samples=25 or -o occlusion.window=32 (see `convlens methods`).")(f)
    f = click.option("--layer", help="Layer for the CAM methods (default: the last spatial non-pooling layer).")(f)
    return click.option("--method", "--methods", "-m", "methods", multiple=True,
                        help="Method(s): repeat or comma-separate (see `convlens methods`); default: Grad-CAM, or "
                             "HiRes-CAM when the head flattens the last feature maps (Grad-CAM's maps go empty "
                             "there).")(f)


def out_options(resume: bool = False):
    """``--out``, ``--overwrite`` (and ``--resume``, ``--verify-full``) of a command writing a store."""
    def deco(f):
        if resume:
            f = click.option("--verify-full", is_flag=True,
                             help="With --resume: decode every chunk, not only check its files.")(f)
            f = click.option("--resume", is_flag=True,
                             help="Continue an interrupted run into --out (its chunks verified first).")(f)
        f = click.option("--overwrite", is_flag=True,
                         help="Replace an existing --out store (only ever a convlens store).")(f)
        return click.option("--out", type=click.Path(), required=resume,
                            help="The Zarr store to write (path or fsspec URL).")(f)
    return deco


def _mode(kw: dict) -> str:
    resume, overwrite = kw.pop("resume", False), kw.pop("overwrite", False)
    if resume and overwrite:
        raise OptionError("give either --resume or --overwrite, not both")
    return "resume" if resume else ("overwrite" if overwrite else "new")


def _load(model: str, kw: dict):
    from convlens.models.registry import LoadOptions, load_model
    return load_model(**build(LoadOptions, kw, name_or_path=model).model_kwargs())


def _methods(values) -> list[str]:
    from convlens.kernels.registry import METHODS
    out = []
    for name in (p.strip() for v in values for p in v.split(",")):
        if name and name not in METHODS:
            raise OptionError(f"{name!r} is not a method; choose from {', '.join(sorted(METHODS))}")
        if name and name not in out:
            out.append(name)
    if values and not out:  # -m given but empty ("" or ","): a mistake, not "choose for me"
        raise OptionError("no method given: -m takes method names, e.g. -m gradcam,smoothgrad")
    return out


def _method_options(values, pairs, layer) -> dict[str, dict]:
    """``{method: options}`` from -m, -o and --layer; with no -m, one entry under ``None``:
    the method is chosen from the model's graph once it is loaded (`_chosen`)."""
    from convlens.kernels.registry import parse_method_options
    methods = _methods(values)
    if methods:
        return parse_method_options(methods, pairs, layer)
    # Checked as Grad-CAM until the model is loaded: both candidates take the same options.
    return {None: parse_method_options(["gradcam"], pairs, layer)["gradcam"]}


def _chosen(per: dict, model) -> dict[str, dict]:
    """``per`` with the method chosen from the graph (`convlens.choose_method`), said once."""
    if None not in per:
        return per
    from convlens.kernels.common import choose_method
    choice = choose_method(model, per[None].get("layer"))
    if choice.why:
        click.echo(f"method: {choice.method} (chosen from the graph: {choice.why}; -m names another)")
    return {choice.method: per[None]}


def _note(msg: str) -> None:
    click.echo(msg, err=True)


def _command() -> str:
    return " ".join(["convlens", *sys.argv[1:]])
