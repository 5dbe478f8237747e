"""The ``convlens`` command line: options in, engine/model/render calls out.

Errors print one line (``error: what was wrong; what to do``): exit code 2 for
usage errors, 1 for failures. ``CONVLENS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

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


def _parse_options(pairs) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        k, v = pair.split("=", 1)
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        out[k.strip().replace("-", "_")] = v
    return out


def _method_choice():
    from convlens.kernels.registry import METHODS
    return click.Choice(sorted(METHODS))


def _images_options(f):
    f = click.option("--resize", type=click.Choice(["squash", "crop"]), default="squash", show_default=True,
                     help="Fit images to the model: squash, or shorter side + centre crop.")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")(f)
    f = click.option("--out", type=click.Path(), help="Write the results to this Zarr store (.zarr).")(f)
    return f


@cli.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--method", "-m", "methods", type=_method_choice(), multiple=True, default=["gradcam"],
              show_default=True, help="Method (repeat for several).")
@click.option("--layer", help="Layer for CAM methods (default: last spatial non-pooling layer).")
@click.option("--target", default="top1", show_default=True,
              help="top1, top5 / topk:N, or class indices (281 or 281,285).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Method option, e.g. -o samples=25 -o noise=0.1.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="PRNG seed (stochastic methods).")
@_images_options
@_model_options
def explain(model, images, methods, layer, target, options, batch_size, seed, out, overwrite, resize,
            weights, random_init, top, input_size, preprocess):
    """Explain IMAGES (files, folders or globs) with one or more methods."""
    import numpy as np

    from convlens.engine import sources, store
    from convlens.explain import explain as run
    from convlens.kernels.registry import METHODS
    from convlens.models.labels import decode_topk, probabilities

    if out and Path(out).exists() and not overwrite:
        raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    m, params = _load(model, weights, random_init, top, input_size, preprocess)
    x, ids = sources.load_images(list(images), m.input_size, resize)
    opts = _parse_options(options)
    results = {}
    for name in methods:
        kw = dict(opts)
        if layer and METHODS[name].uses_layer:
            kw["layer"] = layer
        fields = {f.name for f in dataclasses.fields(METHODS[name].config)}
        kw = {k: v for k, v in kw.items() if k in fields or len(methods) == 1}
        results[name] = run(m, params, x, name, target=target, key=seed, batch_size=batch_size, **kw)
    first = next(iter(results.values()))
    probs = probabilities(first.logits, m.output_activation)
    top = decode_topk(probs, m.class_names, k=3)
    for i, item in enumerate(ids):
        preds = ", ".join(f"{label} {p:.3f}" for _, label, p in top[i])
        click.echo(f"{item}: {preds}")
        for name, e in results.items():
            click.echo(f"  {name}" + (f" @ {e.layer}" if e.layer else "") + f": targets {e.targets[i].tolist()}")
    if out:
        root = store.create(out, overwrite=overwrite, attrs={**store.model_attrs(m), "command": "explain"})
        store.write(root, "ids", np.asarray(ids), ("sample",))
        k = min(5, probs.shape[-1])
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        store.write(root, "predictions/topk_index", order.astype(np.int32), ("sample", "rank"))
        store.write(root, "predictions/topk_prob", np.take_along_axis(probs, order, 1).astype(np.float32),
                    ("sample", "rank"))
        for name, e in results.items():
            outs = {**e.outputs, "targets": e.targets, "logits": e.logits}
            store.add_method(root, name, e.config, outs, e.dims)
        store.finish(out)
        click.echo(f"wrote {out} ({len(ids)} images, methods: {', '.join(results)})")


@cli.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--layers", default="conv", show_default=True, help="all, conv, or layer names (comma-separated).")
@_images_options
@_model_options
def activations(model, images, layers, out, overwrite, resize, weights, random_init, top, input_size, preprocess):
    """Intermediate activations of IMAGES at the chosen layers (one forward pass)."""
    import jax
    import numpy as np

    from convlens.engine import sources, store
    from convlens.kernels.activations import activations as acts_of

    if out and Path(out).exists() and not overwrite:
        raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    m, params = _load(model, weights, random_init, top, input_size, preprocess)
    names = m.resolve_layers(layers)
    x, ids = sources.load_images(list(images), m.input_size, resize)
    acts = jax.device_get(jax.jit(lambda p, x: acts_of(m, p, x, names))(params, x.astype(np.float32)))
    for name in names:
        a = acts[name]
        click.echo(f"{name:28s} {str(list(a.shape[1:])):22s} mean {a.mean():10.4g}  max {a.max():10.4g}  "
                   f"zero {100 * (a == 0).mean():5.1f}%")
    if out:
        root = store.create(out, overwrite=overwrite, attrs={**store.model_attrs(m), "command": "activations"})
        store.write(root, "ids", np.asarray(ids), ("sample",))
        for name in names:
            a = np.asarray(acts[name])
            dims = ("sample", "y", "x", "channel") if a.ndim == 4 else ("sample",) + tuple(
                f"d{i}" for i in range(1, a.ndim))
            store.write(root, f"activations/{name}", a, dims)
        store.finish(out)
        click.echo(f"wrote {out}")


@cli.command("weights")
@click.argument("model")
@click.option("--layer", "layers", multiple=True, help="Conv layer (repeat; default: every conv layer).")
@click.option("--out", type=click.Path(), help="Write kernels and filter images to this Zarr store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
@_model_options
def weights_cmd(model, layers, out, overwrite, weights, random_init, top, input_size, preprocess):
    """Raw filter weights of conv layers, as images normalised per layer."""
    import jax
    import numpy as np

    from convlens.engine import store
    from convlens.kernels.activations import filter_images

    if out and Path(out).exists() and not overwrite:
        raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    m, params = _load(model, weights, random_init, top, input_size, preprocess)
    names = list(layers) or list(m.conv_layer_names)
    res = {n: jax.device_get(filter_images(m, params, n)) for n in names}
    for n, r in res.items():
        k = r["kernel"]
        click.echo(f"{n:28s} kernel {list(k.shape)}  filters {list(r['filters'].shape)}  "
                   f"range [{k.min():.4g}, {k.max():.4g}]")
    if out:
        root = store.create(out, overwrite=overwrite, attrs={**store.model_attrs(m), "command": "weights"})
        for n, r in res.items():
            store.write(root, f"weights/{n}/kernel", np.asarray(r["kernel"]), ("kh", "kw", "c_in", "c_out"))
            f = np.asarray(r["filters"])
            dims = ("filter", "kh", "kw", "rgb") if f.shape[-1] == 3 and f.ndim == 4 and r["kernel"].shape[2] == 3 \
                else ("filter", "c_in", "kh", "kw")
            store.write(root, f"weights/{n}/filters", f, dims)
        store.finish(out)
        click.echo(f"wrote {out}")


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
