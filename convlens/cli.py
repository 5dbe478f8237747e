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


def _parse_options(pairs, methods) -> dict[str, dict]:
    """``-o KEY=VALUE`` (every method with that option) and ``-o METHOD.KEY=VALUE``."""
    import dataclasses as dc

    from convlens.kernels.registry import METHODS

    per = {m: {} for m in methods}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        k, v = (a.strip() for a in pair.split("=", 1))
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        target, _, key = k.rpartition(".")
        key = key.replace("-", "_")
        if target:
            if target not in per:
                raise click.BadParameter(f"{pair!r}: {target!r} is not one of the methods run "
                                         f"({', '.join(methods)})", param_hint="--option")
            per[target][key] = v
            continue
        takers = [m for m in methods if key in {f.name for f in dc.fields(METHODS[m].config)}]
        if not takers:
            raise click.BadParameter(f"{pair!r}: no method run here has an option {key!r}", param_hint="--option")
        for m in takers:
            per[m][key] = v
    return per


def _methods(values) -> list[str]:
    from convlens.kernels.registry import METHODS

    out = []
    for v in values:
        for name in (p.strip() for p in v.split(",")):
            if not name:
                continue
            if name not in METHODS:
                raise click.BadParameter(f"{name!r} is not a method; choose from {', '.join(sorted(METHODS))}",
                                         param_hint="--method")
            if name not in out:
                out.append(name)
    return out


def _run_options(f):
    f = click.option("--keep-inputs/--no-keep-inputs", default=True, show_default=True,
                     help="Store the resized input images (for audits, overlays and reports).")(f)
    f = click.option("--resize", type=click.Choice(["squash", "crop", "pad"]), default="squash", show_default=True,
                     help="Fit images to the model: squash, shorter side + centre crop, or pad.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="PRNG seed (stochastic methods).")(f)
    f = click.option("--batch-size", type=int, default=8, show_default=True, help="Images per compiled call.")(f)
    f = click.option("--option", "-o", "options", multiple=True, metavar="[METHOD.]KEY=VALUE",
                     help="Method option, e.g. -o samples=25 or -o occlusion.window=32.")(f)
    f = click.option("--target", default="top1", show_default=True,
                     help="top1, top5 / topk:N, class indices (281 or 281,285), or label.")(f)
    f = click.option("--layer", help="Layer for the CAM methods (default: last spatial non-pooling layer).")(f)
    f = click.option("--method", "--methods", "-m", "methods", multiple=True, default=["gradcam"], show_default=True,
                     help="Method(s): repeat or comma-separate (see `convlens methods`).")(f)
    return f


def _method_options(methods, options, layer):
    from convlens.kernels.registry import METHODS

    per = _parse_options(options, methods)
    if layer:
        users = [m for m in methods if METHODS[m].uses_layer and m != "cam"]
        if not users:
            raise click.BadParameter("none of the methods run takes a layer", param_hint="--layer")
        for m in users:
            per[m].setdefault("layer", layer)
    return per


@cli.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@_run_options
@click.option("--out", type=click.Path(), help="Write the results to this Zarr store (.zarr).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
@_model_options
def explain(model, images, methods, layer, target, options, batch_size, seed, resize, keep_inputs, out, overwrite,
            weights, random_init, top, input_size, preprocess):
    """Explain IMAGES (files, folders or globs) with one or more methods and print the
    predictions; --out keeps everything in a store (the same schema as `convlens run`)."""
    methods = _methods(methods)
    per = _method_options(methods, options, layer)
    _explain_files(model, images, per, dict(target=target, batch_size=batch_size, seed=seed, resize=resize,
                                            keep_inputs=keep_inputs), out, overwrite,
                   (weights, random_init, top, input_size, preprocess), "explain")


def _explain_files(model, images, per, opts, out, overwrite, model_args, command):
    """Runs methods ``per`` over a few image files through the engine, prints each item."""
    from convlens.engine import runner, sources, store

    if out and store.exists(out) and not overwrite:
        raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    from convlens.engine import video
    files = sources.expand(list(images))
    src = sources.open_source(files) if any(video.is_video(f) for f in files) else sources.FileSource(files)
    m, params = _load(model, *model_args)
    r = runner.Run(m, params, src, per, out, opts=runner.RunOptions(**opts, progress=False), overwrite=overwrite,
                   command=command)
    summary = r.execute()
    _print_items(store.open_store(r.out), list(per), m)
    if out:
        click.echo(f"wrote {out} ({summary.done} images, methods: {', '.join(per)})")
    if summary.failed:
        raise ConvlensError(f"{summary.failed} of {summary.items} images could not be read "
                            f"(first: {summary.failures[0][0]}: {summary.failures[0][1]})")


@cli.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--window", default="16", show_default=True, metavar="N|HxW", help="Patch size in pixels.")
@click.option("--stride", default="8", show_default=True, metavar="N|HxW", help="Step between patches.")
@click.option("--baseline", default="0", show_default=True,
              help="What the patch shows: a pixel value, mean, blur, or image:PATH.")
@click.option("--incremental", is_flag=True, help="Recompute only each patch's projective field (exact).")
@click.option("--approx", "tau", type=float, metavar="TAU",
              help="Approximate incremental mode: cap regions at TAU of each map's side (e.g. 0.5).")
@click.option("--chunk", type=int, default=0, show_default=True,
              help="Occluded images per forward pass (0: from --memory-budget).")
@click.option("--memory-budget", "memory_mb", type=int, default=1024, show_default=True, metavar="MB",
              help="Activation memory per forward pass the automatic chunk aims at.")
@click.option("--target", default="top1", show_default=True, help="top1, top5 / topk:N, or class indices.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per compiled call.")
@click.option("--resize", type=click.Choice(["squash", "crop", "pad"]), default="squash", show_default=True)
@click.option("--out", type=click.Path(), help="Write the results to this Zarr store (.zarr).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
@_model_options
def occlusion(model, images, window, stride, baseline, incremental, tau, chunk, memory_mb, target, batch_size,
              resize, out, overwrite, weights, random_init, top, input_size, preprocess):
    """Occlusion sensitivity of IMAGES: the score drop under a sliding patch."""
    opts = {"window": window, "stride": stride, "baseline": baseline, "incremental": incremental or tau is not None,
            "tau": 1.0 if tau is None else tau, "chunk": chunk, "memory_mb": memory_mb}
    _explain_files(model, images, {"occlusion": opts}, dict(target=target, batch_size=batch_size, resize=resize),
                   out, overwrite, (weights, random_init, top, input_size, preprocess), "occlusion")


def _print_items(root, methods, model):
    """One line per item: its top-3 predictions, then the targets each method explained."""
    import numpy as np

    names = model.class_names or ()
    ids = root["ids"][:]
    status = np.asarray(root["status"][:])
    errors = root["errors"][:]
    idx, prob = root["predictions/topk_index"][:], root["predictions/topk_prob"][:]
    for i, item in enumerate(ids):
        if status[i] != 1:
            click.echo(f"{item}: failed ({errors[i]})")
            continue
        preds = ", ".join(f"{names[c] if c < len(names) else c} {p:.3f}" for c, p in zip(idx[i][:3], prob[i][:3]))
        click.echo(f"{item}: {preds}")
        for meth in methods:
            layer = root.attrs["methods"][meth]["config"].get("layer")
            click.echo(f"  {meth}" + (f" @ {layer}" if layer else "") +
                       f": targets {root[f'{meth}/targets'][i].tolist()}")


@cli.command("run")
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True,
              help="tfds:NAME[/CONFIG][:SPLIT], a folder, image files / globs, or a .npy/.npz file.")
@click.option("--data-dir", type=click.Path(), help="TFDS data directory (default $TFDS_DATA_DIR or "
              "~/tensorflow_datasets).")
@click.option("--masks", type=click.Path(), help="Folder of object masks mirroring an image folder.")
@click.option("--every", type=int, metavar="N", help="Video files: explain every N-th frame (default every frame).")
@_run_options
@click.option("--out", type=click.Path(), required=True, help="The Zarr store to write (path or fsspec URL).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
@click.option("--chunk", type=int, help="Items per store chunk (default max(16, batch size)).")
@click.option("--workers", type=int, default=4, show_default=True, help="Image decoding threads.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--num-processes", type=int, help="Processes in a multi-process run (jax.distributed).")
@click.option("--process-id", type=int, help="This process's index in a multi-process run.")
@click.option("--coordinator", metavar="HOST:PORT", help="Process 0's address in a multi-process run.")
@click.option("--distributed-auto", is_flag=True, help="Join a multi-process run from the launcher's "
              "environment (Slurm and others jax.distributed recognises).")
@_model_options
def run_cmd(model, data, data_dir, masks, every, methods, layer, target, options, batch_size, seed, resize,
            keep_inputs, out, resume, overwrite, chunk, workers, no_progress, num_processes, process_id, coordinator,
            distributed_auto, weights, random_init, top, input_size, preprocess):
    """Explain a whole data set (images, TFDS, arrays or video files) into a Zarr store
    (resumable; many devices and processes)."""
    from convlens.engine import distributed, sources

    methods = _methods(methods)
    per = _method_options(methods, options, layer)
    proc = distributed.initialize(num_processes, process_id, coordinator, auto=distributed_auto)
    src = sources.open_source(list(data), data_dir=data_dir, masks=masks, every=every)  # before the model: fail fast
    m, params = _load(model, weights, random_init, top, input_size, preprocess)
    opts = dict(target=target, batch_size=batch_size, seed=seed, resize=resize, keep_inputs=keep_inputs,
                chunk=chunk, workers=workers, progress=not no_progress)
    summary = distributed.run(m, params, src, per, out, proc, resume=resume, overwrite=overwrite,
                              command=" ".join(["convlens", *sys.argv[1:]]), **opts)
    if proc.index == 0:
        click.echo(_summary_line(summary))
        for item, why in summary.failures[:10]:
            click.echo(f"  failed: {item}: {why}")
        if len(summary.failures) > 10:
            click.echo(f"  ... and {len(summary.failures) - 10} more (see `convlens info {out}`)")


def _summary_line(s) -> str:
    rate = f"{s.items_per_second:.2f} images/s" if s.computed_items else "nothing left to do"
    resumed = f", {s.skipped_chunks} chunks already done" if s.skipped_chunks else ""
    return (f"wrote {s.store}: {s.done} done, {s.failed} failed of {s.items} items "
            f"in {s.seconds:.1f} s ({rate}{resumed})")


def _atlas_options(f):
    f = click.option("--no-progress", is_flag=True, help="No progress bar.")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")(f)
    f = click.option("--resume", is_flag=True, help="Continue an interrupted run into --out.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--memory-budget", "memory_mb", type=int, default=2048, show_default=True, metavar="MB",
                     help="Memory per compiled call the automatic --batch aims at.")(f)
    f = click.option("--batch", type=int, default=0, show_default=True,
                     help="Filters optimised at once (0: from --memory-budget, at most 64).")(f)
    f = click.option("--loop", type=click.Choice(["auto", "fori", "host"]), default="auto", show_default=True,
                     help="Compiled loop or host-dispatched steps (auto: the faster on this backend).")(f)
    f = click.option("--unroll", type=int, default=0, show_default=True,
                     help="Steps per compiled loop iteration (0: all; fastest on CPU).")(f)
    f = click.option("--lr", type=float, default=0.0, help="Step size (default: the recipe's).")(f)
    f = click.option("--steps", type=int, default=0, help="Ascent steps (default: 40 classic, 256 lucid).")(f)
    f = click.option("--size", type=int, default=128, show_default=True, help="Image side in pixels.")(f)
    f = click.option("--recipe", type=click.Choice(["classic", "lucid"]), default="classic", show_default=True)(f)
    f = click.option("--filters", help="Filters of each layer: a slice (0:64, ::4) or indices (1,4,9).")(f)
    return f


def _atlas(model, out, layers, filters, recipe, size, steps, lr, unroll, loop, batch, memory_mb, seed, resume,
           overwrite, no_progress, model_args, command):
    from convlens.engine.atlas import run_atlas
    from convlens.kernels.ascent import AscentConfig

    cfg = AscentConfig(recipe=recipe, size=size, steps=steps, lr=lr, unroll=unroll)
    if store_exists(out) and not (resume or overwrite):
        raise ConvlensError(f"{out} already exists; pass --resume to continue it, --overwrite to replace it, "
                            "or choose another --out")
    m, params = _load(model, *model_args)
    s = run_atlas(m, params, out, layers=layers, filters=filters, cfg=cfg, batch=batch, memory_mb=memory_mb,
                  seed=seed, resume=resume, overwrite=overwrite, progress=not no_progress, loop=loop, command=command)
    done = f"{s.filters} filters of {s.layers} layer(s) in {s.seconds:.1f} s ({s.filters_per_second:.2f} filters/s)"
    click.echo(f"wrote {out}: {done}" + (f"; {s.skipped_chunks} chunks already done" if s.skipped_chunks else ""))


def store_exists(path) -> bool:
    from convlens.engine import store
    return store.exists(path)


@cli.command()
@click.argument("model")
@click.option("--out", type=click.Path(), required=True, help="The Zarr store to write.")
@click.option("--layers", default="conv", show_default=True, help="conv (every conv layer) or names, comma-separated.")
@_atlas_options
@_model_options
def atlas(model, out, layers, filters, recipe, size, steps, lr, unroll, loop, batch, memory_mb, seed, resume,
          overwrite, no_progress, weights, random_init, top, input_size, preprocess):
    """Visualise every filter of every conv layer (or --layers / --filters) by gradient ascent."""
    _atlas(model, out, layers, filters, recipe, size, steps, lr, unroll, loop, batch, memory_mb, seed, resume,
           overwrite, no_progress, (weights, random_init, top, input_size, preprocess), "atlas")


@cli.command()
@click.argument("model")
@click.option("--layer", required=True, help="The conv layer.")
@click.option("--out", type=click.Path(), required=True, help="The Zarr store to write.")
@_atlas_options
@_model_options
def filters(model, layer, out, filters, recipe, size, steps, lr, unroll, loop, batch, memory_mb, seed, resume,
            overwrite, no_progress, weights, random_init, top, input_size, preprocess):
    """Visualise the filters of one conv layer by gradient ascent (an atlas of one layer)."""
    _atlas(model, out, layer, filters, recipe, size, steps, lr, unroll, loop, batch, memory_mb, seed, resume,
           overwrite, no_progress, (weights, random_init, top, input_size, preprocess), "filters")


@cli.command()
@click.argument("store_path", metavar="STORE")
@click.option("--method", "-m", "methods", multiple=True, help="Audit only these methods (default: every heatmap).")
@click.option("--grid", type=int, default=4, show_default=True, help="Cells per side of the location grid.")
@click.option("--metrics/--no-metrics", default=True, show_default=True,
              help="Deletion/insertion curves, average drop and increase in confidence (needs the model).")
@click.option("--sample", type=int, default=32, show_default=True, help="Items the faithfulness metrics use.")
@click.option("--steps", type=int, default=32, show_default=True, help="Slices of the deletion/insertion curves.")
@click.option("--replacement", default="blur", show_default=True, help="Removed pixels: blur or a pixel value.")
@click.option("--sanity/--no-sanity", default=True, show_default=True,
              help="Model-randomisation sanity check (needs the model).")
@click.option("--sanity-items", type=int, default=4, show_default=True)
@click.option("--consistency", type=float, default=0.6, show_default=True,
              help="Share of a class's items that must agree for a class flag.")
@click.option("--min-items", type=int, default=8, show_default=True, help="Smallest class that can be flagged.")
def audit(store_path, methods, grid, metrics, sample, steps, replacement, sanity, sanity_items, consistency,
          min_items):
    """What the classifier looks at across STORE: statistics, shortcut flags, faithfulness."""
    from convlens.engine.audit import AuditConfig, audit as run_audit, table

    cfg = AuditConfig(grid=grid, metrics=metrics, sample=sample, steps=steps, replacement=replacement,
                      sanity=sanity, sanity_items=sanity_items, consistency=consistency, min_items=min_items)
    findings = run_audit(store_path, cfg, methods=list(methods) or None, progress=None)
    click.echo(table(findings))
    n = sum(len(e["flags"]) for e in findings.values())
    click.echo(f"audit written to {store_path} (audit/...): {n} flag(s)")


@cli.command()
@click.argument("store_path", metavar="STORE")
def compare(store_path):
    """Rank the methods of an audited STORE by faithfulness, with their cost."""
    from convlens.engine.audit import compare_table

    click.echo(compare_table(store_path))


def _look_options(f):
    f = click.option("--limit", type=int, default=64, show_default=True, help="Items drawn as overlays.")(f)
    f = click.option("--alpha", type=float, default=0.5, show_default=True, help="Overlay opacity.")(f)
    f = click.option("--style", type=click.Choice(["blend", "camshow"]), default="blend", show_default=True,
                     help="blend: on the image; camshow: on a darkened grey copy, above a threshold.")(f)
    f = click.option("--cmap", default="jet", show_default=True, help="Colour map (jet, viridis, turbo ...).")(f)
    return f


@cli.command()
@click.argument("store_path", metavar="STORE")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for the PNG files.")
@click.option("--per-row", type=int, default=16, show_default=True, help="Feature-map tiles per row.")
@click.option("--video", "video", type=click.Choice(["mp4", "webm", "gif", "png", "none"]), default="mp4",
              show_default=True, help="Video runs: write the overlays back as MP4, WebM, GIF or PNG frames (or not).")
@_look_options
def render(store_path, out, per_row, video, cmap, style, alpha, limit):
    """Draw what STORE holds: overlays, feature maps, filters, atlases, audit figures (PNG),
    and for video runs the overlays as a video."""
    from convlens.render.render import render_store

    groups = render_store(store_path, out, cmap=cmap, alpha=alpha, style=style, limit=limit, per_row=per_row,
                          video=video)
    if not groups:
        raise ConvlensError(f"{store_path} holds nothing to draw (no heatmaps with inputs, activations, weights, "
                            "atlas or audit)")
    for g, files in groups.items():
        click.echo(f"{g:12s} {len(files):5d} files in {Path(out) / g if g != 'pipeline' else out}")


@cli.command()
@click.argument("store_path", metavar="STORE")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The HTML file to write.")
@click.option("--per-page", type=int, default=48, show_default=True, help="Items per gallery page.")
@_look_options
def report(store_path, out, per_page, cmap, style, alpha, limit):
    """A browsable HTML report of STORE (no network needed to view it)."""
    from convlens.render.report import report as write_report

    pages = write_report(store_path, out, per_page=per_page, cmap=cmap, alpha=alpha, style=style, limit=limit)
    click.echo(f"wrote {out}" + (f" and {len(pages) - 1} gallery page(s)" if len(pages) > 1 else ""))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="convlens-demo", show_default=True,
              help="Folder for the demo's data, model, store and report (replaced if it exists).")
def demo(out):
    """The built-in demo, offline: train a convnet with a planted shortcut, explain, audit, report."""
    from convlens.demo import run_demo

    r = run_demo(out, log=click.echo)
    click.echo("")
    click.echo(r["text"])
    click.echo("")
    shortcut = [(m, f) for m, f in r["flags"] if f["kind"] == "class_location"]
    if shortcut:
        m, f = shortcut[0]
        click.echo(f"FOUND: the model's decisions for class {f['class_name']!r} rest on the {f['where']} — the "
                   f"planted stamp ({m}: {f['share_of_items']:.0%} of the class's items peak there).")
    else:
        click.echo("The audit did not flag the planted shortcut (unexpected: see the report).")
    click.echo(f"Report: {Path(r['report']).resolve()}  (open it in a browser; done in {r['seconds']:.0f} s)")


@cli.command()
@click.argument("model")
@click.argument("stream")
@click.option("--method", "-m", default="gradcam", show_default=True,
              help="A method with a heatmap (gradcam, cam, hirescam, eigencam ...).")
@click.option("--layer", help="Layer for the CAM methods.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE", help="Method option.")
@click.option("--target", default="top1", show_default=True, help="top1, topk:N (the first is drawn), or class indices.")
@click.option("--out", type=click.Path(), help="Write the overlays: FILE.mp4, FILE.webm, FILE.gif, or a folder "
              "of PNG frames.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--show", is_flag=True, help="Show the overlays in a window (needs a display).")
@click.option("--max-frames", type=int, help="Stop after this many explained frames.")
@click.option("--duration", type=float, metavar="SECONDS", help="Stop after this long.")
@click.option("--pace", type=click.Choice(["auto", "native", "none"]), default="auto", show_default=True,
              help="Files: auto/native play at their own speed (like a camera); none decodes as fast as it can.")
@click.option("--resize", type=click.Choice(["squash", "crop", "pad"]), default="squash", show_default=True)
@click.option("--size", "long_side", type=int, default=640, show_default=True,
              help="Longer side of the output frames in pixels.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for a stream to open.")
@click.option("--quiet", is_flag=True, help="No running status line.")
@click.option("--cmap", default="jet", show_default=True)
@click.option("--style", type=click.Choice(["blend", "camshow"]), default="blend", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True)
@_model_options
def live(model, stream, method, layer, options, target, out, overwrite, show, max_frames, duration, pace, resize,
         long_side, timeout, quiet, cmap, style, alpha, weights, random_init, top, input_size, preprocess):
    """Explain a video STREAM as it comes (camera:0, /dev/video0, rtsp://..., or a file),
    dropping frames rather than queueing them when the model is slower than the stream."""
    import time as _time

    from convlens.live import live as run_live

    per = _method_options(_methods([method]), options, layer)[method]
    if not out and not show:
        raise click.UsageError("live needs somewhere to put the overlays: --out FILE.mp4|FILE.gif|FOLDER or --show")
    if out and Path(out).exists() and not overwrite:
        raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    m, params = _load(model, weights, random_init, top, input_size, preprocess)
    last = [0.0]

    def status(stats, _frame):
        now = _time.perf_counter()
        if not quiet and now - last[0] > 1.0:
            last[0] = now
            click.echo(f"\rlive: {stats.processed} frames, {stats.fps:.1f} fps", nl=False, err=True)

    stats = run_live(m, params, stream, method=method, options=per, target=target, out=out, show=show,
                     max_frames=max_frames, duration=duration, pace=pace, resize=resize, cmap=cmap, alpha=alpha,
                     style=style, long_side=long_side, timeout=timeout, on_frame=status)
    if not quiet:
        click.echo("", err=True)
    click.echo(f"live {stream} ({stats.stopped_by}): {stats.line()}" + (f"; wrote {out}" if out else ""))


@cli.command()
@click.argument("store_path", metavar="STORE")
def info(store_path):
    """What a store holds: model, methods, progress, failures, arrays."""
    from convlens.engine.info import info_text

    click.echo(info_text(store_path))


@cli.command()
def methods():
    """List the explanation methods and their options."""
    import dataclasses as dc

    from convlens.kernels.registry import METHODS

    for name in sorted(METHODS):
        spec = METHODS[name]
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dc.fields(spec.config))
        click.echo(f"{name:22s} {spec.doc}" + (f"  [{opts}]" if opts else ""))


@cli.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--layers", default="conv", show_default=True, help="all, conv, or layer names (comma-separated).")
@click.option("--resize", type=click.Choice(["squash", "crop", "pad"]), default="squash", show_default=True,
              help="Fit images to the model: squash, shorter side + centre crop, or pad.")
@click.option("--out", type=click.Path(), help="Write the activations to this Zarr store (.zarr).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
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
        root = store.create(out, overwrite=overwrite, attrs={**store.model_attrs(m), "command": "activations",
                                                             "resize": resize})
        store.write(root, "ids", np.asarray(ids), ("sample",))
        store.write(root, "inputs", x, ("sample", "y", "x", "rgb"))
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
