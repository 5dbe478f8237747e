"""The ``convlens`` command line: options in, engine/model/render calls out.

Errors print one line (``error: what was wrong; what to do``): exit code 2 for
usage errors, 1 for failures. ``CONVLENS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from convlens.errors import ConvlensError


def _model_options(f):
    f = click.option("--preprocess", type=click.Choice(["caffe", "tf", "torch", "rescale", "none"]),
                     help="Override the model's preprocessing (files default to none).")(f)
    f = click.option("--input-size", metavar="HxW", help="Input size of a headless built-in model.")(f)
    f = click.option("--top/--no-top", default=True, show_default=True,
                     help="Built-ins: with or without the classifier (include_top).")(f)
    f = click.option("--random-init", type=int, metavar="SEED",
                     help="Use random weights on purpose (built-in models only).")(f)
    f = click.option("--weights", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Keras weights for a built-in model (.weights.h5, .h5, .keras).")(f)
    return f


def _input_shape(value: str | None):
    if not value:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HxW (e.g. 224x224)", param_hint="--input-size") from None
    return (h, w, 3)


def _load(model, weights, random_init, top, input_size, preprocess):
    from convlens.models.registry import load_model

    return load_model(model, weights=weights, random_init=random_init, include_top=top,
                      input_shape=_input_shape(input_size), preprocess=preprocess)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convlens")
def cli():
    """Batch explanations for convolutional image classifiers.

    MODEL is a built-in name (see `convlens models`) or a Keras .keras / full-model .h5 file.
    """


@cli.command()
def models():
    """List the built-in models."""
    from convlens.models.registry import MODELS

    for spec in MODELS.values():
        click.echo(f"{spec.name:10s} {spec.default_size[0]}x{spec.default_size[1]}  "
                   f"{spec.preprocess.describe():9s} {spec.description}")


@cli.command()
@click.argument("model")
@_model_options
def summary(model, weights, random_init, top, input_size, preprocess):
    """Print MODEL's layers, output shapes and parameter counts (like Keras's model.summary())."""
    from convlens.models.summary import summary as table

    m, _ = _load(model, weights, random_init, top, input_size, preprocess)
    click.echo(table(m))
    click.echo(f" Preprocessing: {m.preprocess_spec.describe()}; weights: {m.source}"
               + (f" (sha256 {m.weights_sha256[:12]})" if m.weights_sha256 else ""))


def main(argv=None):
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="convlens")
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()} (see convlens {e.ctx.command.name if e.ctx else ''} --help)"
                   .replace("  ", " "), err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except ConvlensError as e:
        if os.environ.get("CONVLENS_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the CLI never shows a traceback
        if os.environ.get("CONVLENS_DEBUG"):
            raise
        click.echo(f"error: unexpected {type(e).__name__}: {e} (a convlens bug: rerun with CONVLENS_DEBUG=1 "
                   "and report the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
