"""The ``convlens`` command line: options in, engine/model/render calls out.

Options are generated from the config dataclasses (`convlens.config`): a run's from
`RunOptions`, occlusion's from `OcclusionConfig`, an atlas's from `AscentConfig` and
`AtlasOptions`, an audit's from `AuditConfig`, drawing's from `LookOptions`, loading a
model's from `LoadOptions` — names, defaults and help text from the fields and their
docs, values checked by the config's own declaration. Method options are ``-o
[METHOD.]KEY=VALUE``, checked the same way. Commands are built only when used, so
``convlens render`` and ``convlens info`` never import JAX.

Errors print one line (``error: what was wrong; what to do``): exit code 2 for usage
errors (a bad option value included), 1 for failures, 130 after Ctrl-C.
``CONVLENS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from convlens.errors import ConvlensError, OptionError

# ---------------------------------------------------------------- options from configs


def config_options(cls, *, include: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                   rename: dict[str, str] | None = None):
    """A decorator adding one click option per field of the config dataclass ``cls``.

    Booleans become ``--x/--no-x`` flags; everything else a string the config coerces
    and checks (so bad values get the config's own one-line error). Options not given
    arrive as ``None`` and leave the config's default."""
    from convlens.config import field_help, field_types
    helps = field_help(cls)
    rename = rename or {}
    chosen = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in exclude
              and not f.name.startswith("_") and (include is None or f.name in include)]

    def deco(fn):
        for f in reversed(chosen):
            name = rename.get(f.name, f.name).replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            text = helps.get(f.name, "")
            if field_types(f) == {"bool"}:
                fn = click.option(f"--{name}/--no-{name}", f.name, default=None, help=text
                                  + f" [default: {'yes' if default else 'no'}]")(fn)
                continue
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(map(str, choices))})" if choices and field_types(f) <= {"str", "None"} \
                else ""
            fn = click.option(f"--{name}", f.name, default=None, metavar=_metavar(f),
                              help=f"{text}{extra}" + ("" if default is None else f" [default: {default}]"))(fn)
        return fn
    return deco


def _metavar(f) -> str:
    from convlens.config import field_types
    t = field_types(f) - {"None"}
    if t == {"int"}:
        return "N"
    if t <= {"int", "float"}:
        return "X"
    return "TEXT"


def pick(kw: dict, cls, *, pop: bool = True) -> dict:
    """The given (non-None) values of ``cls``'s fields, taken out of ``kw``."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in kw:
            v = kw.pop(f.name) if pop else kw[f.name]
            if v is not None:
                out[f.name] = v
    return out


# ---------------------------------------------------------------- shared pieces

def _load(load: dict):
    from convlens.config import build
    from convlens.models.registry import LoadOptions, load_model
    opts = build(LoadOptions, pick(dict(load), LoadOptions))
    return load_model(**opts.model_kwargs())


def _methods(values) -> list[str]:
    from convlens.kernels.registry import METHODS
    out = []
    for v in values:
        for name in (p.strip() for p in v.split(",")):
            if not name:
                continue
            if name not in METHODS:
                raise OptionError(f"{name!r} is not a method; choose from {', '.join(sorted(METHODS))}")
            if name not in out:
                out.append(name)
    if values and not out:  # -m given but empty ("" or ","): a mistake, not "choose for me"
        raise OptionError("no method given: -m takes method names, e.g. -m gradcam,smoothgrad")
    return out


# Until the model is loaded, the method chosen from its graph is validated as Grad-CAM (the
# two candidates, Grad-CAM and HiRes-CAM, take the same options).
CHOSEN = "gradcam"


def _with_default(per: dict, model) -> dict:
    """``per`` with the stand-in for "no -m given" replaced by `default_method`'s choice
    for ``model``, and a note saying which and why."""
    if not isinstance(per, _Chosen):
        return per
    from convlens.kernels.common import default_layer, default_method, head_kind
    layer = per[CHOSEN].get("layer")
    name = default_method(model, layer)
    try:
        layer = layer or default_layer(model)
        if len(model.output_shapes()[model.graph.node(layer).name]) != 4:
            return {name: per[CHOSEN]}  # not spatial: the method's own error says so
        why = {"flatten": f"the head flattens {layer!r} position by position, where Grad-CAM's averaged "
                          "gradients cancel",
               "pooled": f"the head pools {layer!r} over its positions"}.get(
            head_kind(model, layer), f"the head does not flatten {layer!r} position by position")
        # Said once the choice stands; an error about the layer is then the only line printed.
        click.echo(f"method: {name} (chosen from the graph: {why}; -m names another)")
    except ConvlensError:
        pass  # no such layer or no spatial layer: the method's own error says so
    return {name: per[CHOSEN]}


class _Chosen(dict):
    """Method options when no method was named (see `_with_default`)."""


def _method_options(methods, pairs, layer) -> dict[str, dict]:
    if not methods:  # none given: chosen from the graph once the model is loaded (`_with_default`)
        return _Chosen(_method_options([CHOSEN], pairs, layer))
    return _options_for(methods, pairs, layer)


def _options_for(methods, pairs, layer) -> dict[str, dict]:
    """``-o KEY=VALUE`` (every method with that option) and ``-o METHOD.KEY=VALUE``, plus
    ``--layer`` for every method that takes a layer of its choosing."""
    from convlens.kernels.registry import METHODS
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


def method_options(f):
    f = click.option("--option", "-o", "options", multiple=True, metavar="[METHOD.]KEY=VALUE",
                     help="Method option, e.g. -o samples=25 or -o occlusion.window=32 (see `convlens methods`).")(f)
    f = click.option("--layer", help="Layer for the CAM methods (default: the last spatial non-pooling layer).")(f)
    f = click.option("--method", "--methods", "-m", "methods", multiple=True,
                     help="Method(s): repeat or comma-separate (see `convlens methods`); default: Grad-CAM, or "
                          "HiRes-CAM when the head flattens the last feature maps (Grad-CAM's maps go empty there).")(f)
    return f


def model_options(f):
    from convlens.models.registry import LoadOptions
    return config_options(LoadOptions)(f)


def _note(msg: str) -> None:
    click.echo(msg, err=True)


def _print_items(root, methods, model):
    """One line per item: its top-3 predictions, then the targets each method explained."""
    import numpy as np

    from convlens.models.labels import decode_stored
    status = np.asarray(root["status"][:])
    errors = root["errors"][:]
    for i, item in enumerate(root["ids"][:]):
        if status[i] != 1:
            click.echo(f"{item}: failed ({errors[i]})")
            continue
        top = decode_stored(root["predictions/topk_index"][i], root["predictions/topk_prob"][i], model.class_names)
        click.echo(f"{item}: " + ", ".join(f"{name} {p:.3f}" for _, name, p in top[:3]))
        for meth in methods:
            layer = root.attrs["methods"][meth]["config"].get("layer")
            click.echo(f"  {meth}" + (f" @ {layer}" if layer else "") +
                       f": targets {root[f'{meth}/targets'][i].tolist()}")


def _explain_files(images, per, opts: dict, out, overwrite, load: dict, command: str):
    """Runs methods ``per`` over a few image files through the engine, prints each item."""
    from convlens.config import build
    from convlens.engine import runner, sources, store, video
    if out:
        store.check_replaceable(out)
        if store.exists(out) and not overwrite:
            raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    files = sources.expand(list(images))
    src = sources.open_source(files) if any(video.is_video(f) for f in files) else sources.FileSource(files)
    m, params = _load(load)
    per = _with_default(per, m)
    r = runner.Run(m, params, src, per, out, opts=build(runner.RunOptions, {**opts, "progress": False}),
                   overwrite=overwrite, command=command, note=_note)
    summary = r.execute()
    _print_items(store.open_store(r.out), list(per), m)
    if out:
        click.echo(f"wrote {out} ({summary.done} images, methods: {', '.join(per)})")
    if summary.problems:
        raise ConvlensError(f"{out} failed its final check: {'; '.join(summary.problems[:3])}")
    if summary.failed:
        raise ConvlensError(f"{summary.failed} of {summary.items} images could not be explained "
                            f"(first: {summary.failures[0][0]}: {summary.failures[0][1]})")


# ---------------------------------------------------------------- commands (built when used)

def _models():
    @click.command("models")
    def models():
        """List the built-in models."""
        from convlens.models.registry import MODELS
        for spec in MODELS.values():
            click.echo(f"{spec.name:18s} {spec.default_size[0]}x{spec.default_size[1]}  "
                       f"{spec.preprocess.describe():9s} {spec.description}")
    return models


def _summary():
    @click.command("summary")
    @click.argument("model")
    @model_options
    def summary(model, **kw):
        """Print MODEL's layers, output shapes and parameter counts (like Keras's model.summary())."""
        from convlens.models.summary import summary as table
        m, _ = _load({"name_or_path": model, **kw})
        click.echo(table(m))
        click.echo(f" Preprocessing: {m.preprocess_spec.describe()}; weights: {m.source}"
                   + (f" (sha256 {m.weights_sha256[:12]})" if m.weights_sha256 else ""))
    return summary


def _explain():
    from convlens.engine.runner import RunOptions

    @click.command("explain")
    @click.argument("model")
    @click.argument("images", nargs=-1, required=True)
    @method_options
    @config_options(RunOptions, include=("target", "batch_size", "seed", "resize", "keep_inputs", "max_pixels"))
    @click.option("--out", type=click.Path(), help="Write the results to this Zarr store (.zarr).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
    @model_options
    def explain(model, images, methods, layer, options, out, overwrite, **kw):
        """Explain IMAGES (files, folders or globs) with one or more methods and print the
        predictions; --out keeps everything in a store (the same schema as `convlens run`)."""
        methods = _methods(methods)
        per = _method_options(methods, options, layer)
        opts = pick(kw, RunOptions)
        _explain_files(images, per, opts, out, overwrite, {"name_or_path": model, **kw}, "explain")
    return explain


def _occlusion():
    from convlens.engine.runner import RunOptions
    from convlens.kernels.occlusion import OcclusionConfig

    @click.command("occlusion")
    @click.argument("model")
    @click.argument("images", nargs=-1, required=True)
    @config_options(OcclusionConfig)
    @config_options(RunOptions, include=("target", "batch_size", "resize"))
    @click.option("--out", type=click.Path(), help="Write the results to this Zarr store (.zarr).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
    @model_options
    def occlusion(model, images, out, overwrite, **kw):
        """Occlusion sensitivity of IMAGES: the score drop under a sliding patch (the same as
        `convlens explain -m occlusion`, with occlusion's options spelled out)."""
        cfg = pick(kw, OcclusionConfig)
        if "tau" in cfg and "incremental" not in cfg:
            cfg["incremental"] = True  # an approximation of the incremental mode implies it
        opts = {"batch_size": 1, **pick(kw, RunOptions)}
        _explain_files(images, {"occlusion": cfg}, opts, out, overwrite, {"name_or_path": model, **kw}, "occlusion")
    return occlusion


def _run():
    from convlens.engine.runner import RunOptions

    @click.command("run")
    @click.argument("model")
    @click.option("--data", "data", multiple=True, required=True,
                  help="tfds:NAME[/CONFIG][:SPLIT], a folder, image files / globs, a .npy/.npz file, or video files.")
    @click.option("--data-dir", type=click.Path(), help="TFDS data directory (default $TFDS_DATA_DIR or "
                  "~/tensorflow_datasets).")
    @click.option("--masks", type=click.Path(), help="Folder of object masks mirroring an image folder.")
    @click.option("--every", type=int, metavar="N", help="Video files: explain every N-th frame (default every frame).")
    @method_options
    @config_options(RunOptions)
    @click.option("--out", type=click.Path(), required=True, help="The Zarr store to write (path or fsspec URL).")
    @click.option("--resume", is_flag=True, help="Continue an interrupted run into --out (its chunks verified first).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing --out store (only ever a convlens store).")
    @click.option("--verify-full", is_flag=True, help="With --resume: decode every chunk, not only check its files.")
    @click.option("--num-processes", type=click.IntRange(min=1), help="Processes in a multi-process run.")
    @click.option("--process-id", type=click.IntRange(min=0), help="This process's index in a multi-process run.")
    @click.option("--coordinator", metavar="HOST:PORT", help="Process 0's address in a multi-process run.")
    @click.option("--distributed-auto", is_flag=True, help="Join a multi-process run from the launcher's "
                  "environment (Slurm and others jax.distributed recognises).")
    @model_options
    def run_cmd(model, data, data_dir, masks, every, methods, layer, options, out, resume, overwrite, verify_full,
                num_processes, process_id, coordinator, distributed_auto, **kw):
        """Explain a whole data set (images, TFDS, arrays or video files) into a Zarr store
        (resumable; many devices and processes)."""
        from convlens.config import build
        from convlens.engine import distributed, sources, store
        methods = _methods(methods)
        per = _method_options(methods, options, layer)
        opts = build(RunOptions, pick(kw, RunOptions))
        if every is not None and every < 1:
            raise OptionError(f"--every must be at least 1, got {every}")
        if not resume and store.exists(out):
            store.check_replaceable(out)
            if not overwrite:
                raise ConvlensError(f"{out} already exists; pass --overwrite to replace it, --resume to continue "
                                    "it, or choose another --out")
        proc = distributed.initialize(num_processes, process_id, coordinator, auto=distributed_auto)
        src = sources.open_source(list(data), data_dir=data_dir, masks=masks, every=every,
                                  max_pixels=opts.max_pixels)  # before the model: fail fast
        m, params = _load({"name_or_path": model, **kw})
        per = _with_default(per, m)
        summary = distributed.run(m, params, src, per, out, proc, resume=resume, overwrite=overwrite,
                                  command=" ".join(["convlens", *sys.argv[1:]]), verify_full=verify_full,
                                  note=_note, **dataclasses.asdict(opts))
        if proc.index == 0:
            click.echo(_summary_line(summary))
            for item, why in summary.failures[:10]:
                click.echo(f"  failed: {item}: {why}")
            if len(summary.failures) > 10:
                click.echo(f"  ... and {len(summary.failures) - 10} more (see `convlens info {out}`)")
            if summary.problems:
                raise ConvlensError(f"{out} failed its final check ({'; '.join(summary.problems[:3])}); run "
                                    f"`convlens verify {out}` for the full report and --resume to repair it")
            if summary.done == 0 and summary.failed:
                raise ConvlensError(f"every item failed ({summary.failed} of {summary.items}); first: "
                                    f"{summary.failures[0][0]}: {summary.failures[0][1]}" if summary.failures else
                                    f"every item failed ({summary.failed} of {summary.items}): see `convlens info "
                                    f"{out}`")
    return run_cmd


def _summary_line(s) -> str:
    rate = f"{s.items_per_second:.2f} images/s" if s.computed_items else "nothing left to do"
    resumed = f", {s.skipped_chunks} chunks already done" if s.skipped_chunks else ""
    repaired = f", {len(s.repaired)} damaged chunk(s) recomputed" if s.repaired else ""
    return (f"wrote {s.store}: {s.done} done, {s.failed} failed of {s.items} items "
            f"in {s.seconds:.1f} s ({rate}{resumed}{repaired})")


def _atlas_command(name: str, one_layer: bool):
    from convlens.engine.atlas import AtlasOptions
    from convlens.kernels.ascent import AscentConfig

    def body(model, out, layers, resume, overwrite, **kw):
        from convlens.config import build
        from convlens.engine import store
        from convlens.engine.atlas import run_atlas
        cfg = build(AscentConfig, pick(kw, AscentConfig))
        a = build(AtlasOptions, pick(kw, AtlasOptions))
        if not resume and store.exists(out):
            store.check_replaceable(out)
            if not overwrite:
                raise ConvlensError(f"{out} already exists; pass --resume to continue it, --overwrite to replace "
                                    "it, or choose another --out")
        m, params = _load({"name_or_path": model, **kw})
        s = run_atlas(m, params, out, layers=layers, filters=a.filters, cfg=cfg, batch=a.batch,
                      memory_mb=a.memory_mb, seed=a.seed, resume=resume, overwrite=overwrite, progress=a.progress,
                      loop=a.loop, command=name, note=_note)
        done = f"{s.filters} filters of {s.layers} layer(s) in {s.seconds:.1f} s ({s.filters_per_second:.2f} filters/s)"
        click.echo(f"wrote {out}: {done}" + (f"; {s.skipped_chunks} chunks already done" if s.skipped_chunks else ""))

    def cmd(model, out, layers, resume, overwrite, **kw):
        body(model, out, layers, resume, overwrite, **kw)
    cmd.__doc__ = ("Visualise the filters of one conv layer by gradient ascent (an atlas of one layer)." if one_layer
                   else "Visualise every filter of every conv layer (or --layers / --filters) by gradient ascent.")
    fn = model_options(cmd)
    fn = click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")(fn)
    fn = click.option("--resume", is_flag=True, help="Continue an interrupted atlas into --out.")(fn)
    fn = config_options(AtlasOptions)(fn)
    fn = config_options(AscentConfig)(fn)
    fn = click.option("--out", type=click.Path(), required=True, help="The Zarr store to write.")(fn)
    if one_layer:
        fn = click.option("--layer", "layers", required=True, help="The conv layer.")(fn)
    else:
        fn = click.option("--layers", default="conv", show_default=True,
                          help="conv (every conv layer) or names, comma-separated.")(fn)
    fn = click.argument("model")(fn)
    return click.command(name)(fn)


def _audit():
    from convlens.engine.audit import AuditConfig

    @click.command("audit")
    @click.argument("store_path", metavar="STORE")
    @click.option("--method", "-m", "methods", multiple=True, help="Audit only these methods (default: every map).")
    @config_options(AuditConfig, exclude=("batch",))
    def audit(store_path, methods, **kw):
        """What the classifier looks at across STORE: statistics, shortcut flags, faithfulness."""
        from convlens.config import build
        from convlens.engine.audit import audit as run_audit
        from convlens.render.tables import table
        cfg = build(AuditConfig, pick(kw, AuditConfig))
        findings = run_audit(store_path, cfg, methods=[m for v in methods for m in v.split(",") if m] or None,
                             progress=None)
        click.echo(table(findings))
        if cfg.quality:
            from convlens.engine import store
            from convlens.render.tables import quality_table
            q = store.open_store(store_path).attrs["audit"].get("quality") or {}
            click.echo("\n" + (quality_table(q) if q.get("scores") else f"quality metrics skipped: {q.get('skipped')}"))
        n = sum(len(e["flags"]) for e in findings.values())
        click.echo(f"audit written to {store_path} (audit/...): {n} flag(s)")
    return audit


def _compare():
    @click.command("compare")
    @click.argument("store_path", metavar="STORE")
    def compare(store_path):
        """Rank the methods of an audited STORE by faithfulness, with their cost."""
        from convlens.render.tables import compare_table
        click.echo(compare_table(store_path))
    return compare


def _look(f, exclude=()):
    from convlens.render.render import LookOptions
    return config_options(LookOptions, exclude=exclude)(f)


def _render():
    from convlens.render.render import LookOptions

    @click.command("render")
    @click.argument("store_path", metavar="STORE")
    @click.option("--out", type=click.Path(file_okay=False), required=True,
                  help="Folder for the PNG files (new, empty, or an earlier render's).")
    @click.option("--per-row", type=click.IntRange(min=1), default=16, show_default=True,
                  help="Feature-map tiles per row.")
    @click.option("--video", "video", type=click.Choice(["mp4", "webm", "gif", "png", "none"]), default="mp4",
                  show_default=True, help="Video runs: the overlays as MP4, WebM, GIF or PNG frames (or not).")
    @_look
    def render(store_path, out, per_row, video, **kw):
        """Draw what STORE holds: overlays, feature maps, filters, atlases, audit figures (PNG),
        and for video runs the overlays as a video."""
        from convlens.config import build
        from convlens.render.render import render_store
        look = build(LookOptions, pick(kw, LookOptions))
        groups = render_store(store_path, out, per_row=per_row, video=video, **dataclasses.asdict(look))
        if not groups:
            raise ConvlensError(f"{store_path} holds nothing to draw (no maps with inputs, activations, weights, "
                                "atlas or audit)")
        for g, files in groups.items():
            click.echo(f"{g:12s} {len(files):5d} files in {Path(out) / g if g != 'pipeline' else out}")
    return render


def _report():
    from convlens.render.render import LookOptions

    @click.command("report")
    @click.argument("store_path", metavar="STORE")
    @click.option("--out", type=click.Path(dir_okay=False), required=True, help="The HTML file to write.")
    @click.option("--per-page", type=click.IntRange(min=1), default=48, show_default=True,
                  help="Items per gallery page.")
    @_look
    def report(store_path, out, per_page, **kw):
        """A browsable HTML report of STORE (no network needed to view it)."""
        from convlens.config import build
        from convlens.render.report import report as write_report
        look = build(LookOptions, pick(kw, LookOptions))
        pages = write_report(store_path, out, per_page=per_page, **dataclasses.asdict(look))
        click.echo(f"wrote {out}" + (f" and {len(pages) - 1} gallery page(s)" if len(pages) > 1 else ""))
    return report


def _demo():
    @click.command("demo")
    @click.option("--out", type=click.Path(file_okay=False), default="convlens-demo", show_default=True,
                  help="Folder for the demo's data, model, store and report (new, or an earlier demo's).")
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
    return demo


def _live():
    from convlens.render.render import LookOptions

    @click.command("live")
    @click.argument("model")
    @click.argument("stream")
    @click.option("--method", "-m", help="A method with a map (gradcam, cam, hirescam, eigencam ...); default: "
                  "Grad-CAM, or HiRes-CAM when the head flattens the last feature maps.")
    @click.option("--layer", help="Layer for the CAM methods.")
    @click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE", help="Method option.")
    @click.option("--target", default="top1", show_default=True,
                  help="top1, topk:N (the first is drawn), or class indices.")
    @click.option("--out", type=click.Path(), help="Write the overlays: FILE.mp4, FILE.webm, FILE.gif, or a folder "
                  "of PNG frames.")
    @click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
    @click.option("--show", is_flag=True, help="Show the overlays in a window (needs a display).")
    @click.option("--max-frames", type=click.IntRange(min=1), help="Stop after this many explained frames.")
    @click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                  help="Stop after this long.")
    @click.option("--pace", type=click.Choice(["auto", "native", "none"]), default="auto", show_default=True,
                  help="Files: auto/native play at their own speed (like a camera); none decodes as fast as it can.")
    @click.option("--resize", type=click.Choice(["squash", "crop", "pad"]), default="squash", show_default=True)
    @click.option("--size", "long_side", type=click.IntRange(min=16, max=8192), default=640, show_default=True,
                  help="Longer side of the output frames in pixels.")
    @click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
                  help="Seconds to wait for a stream to open.")
    @click.option("--quiet", is_flag=True, help="No running status line.")
    @functools.partial(_look, exclude=("limit",))
    @model_options
    def live(model, stream, method, layer, options, target, out, overwrite, show, max_frames, duration, pace,
             resize, long_side, timeout, quiet, **kw):
        """Explain a video STREAM as it comes (camera:0, /dev/video0, rtsp://..., or a file),
        dropping frames rather than queueing them when the model is slower than the stream."""
        import time as _time

        from convlens.config import build
        from convlens.engine import store
        from convlens.live import live as run_live
        look = build(LookOptions, pick(kw, LookOptions))
        per = _method_options(_methods([method] if method else []), options, layer)
        if not out and not show:
            raise OptionError("live needs somewhere to put the overlays: --out FILE.mp4|FILE.gif|FOLDER or --show")
        if out and store.exists(out) and not overwrite:
            raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
        m, params = _load({"name_or_path": model, **kw})
        ((method, per),) = _with_default(per, m).items()
        last = [0.0]

        def status(stats, _frame):
            now = _time.perf_counter()
            if not quiet and now - last[0] > 1.0:
                last[0] = now
                click.echo(f"\rlive: {stats.processed} frames, {stats.fps:.1f} fps", nl=False, err=True)

        from convlens.live import LiveOptions
        lo = build(LiveOptions, dict(target=target, out=out, show=show, max_frames=max_frames, duration=duration,
                                     pace=pace, resize=resize, long_side=long_side, timeout=timeout))
        stats = run_live(m, params, stream, method=method, options=per, opts=lo, look=look, on_frame=status)
        if not quiet:
            click.echo("", err=True)
        click.echo(f"live {stream} ({stats.stopped_by}): {stats.line()}" + (f"; wrote {out}" if out else ""))
    return live


def _info():
    @click.command("info")
    @click.argument("store_path", metavar="STORE")
    def info(store_path):
        """What a store holds: model, methods, progress, failures, arrays."""
        from convlens.engine.info import info_text
        click.echo(info_text(store_path))
    return info


def _verify():
    @click.command("verify")
    @click.argument("store_path", metavar="STORE")
    @click.option("--full", is_flag=True, help="Decode every chunk and check completed maps are finite (slower).")
    def verify(store_path, full):
        """Check that every chunk STORE marks complete exists and decodes (exit 1 on any problem)."""
        from convlens.engine import store
        from convlens.engine.verify import verify as check
        rep = check(store.open_store(store_path, consolidated=False), full=full)
        for line in rep.lines():
            click.echo(f"  {line}")
        if rep.problems:
            raise ConvlensError(f"{store_path}: {rep.summary()}; `convlens run ... --resume` recomputes them")
        click.echo(f"{store_path}: {rep.summary()}")
    return verify


def _unlock():
    @click.command("unlock")
    @click.argument("store_path", metavar="STORE")
    def unlock(store_path):
        """Clear STORE's lock, left by a run that is gone (never while that run is alive)."""
        from convlens.engine import store
        info = store.unlock(store_path)
        if info is None:
            click.echo(f"{store_path} was not locked")
        else:
            click.echo(f"cleared the lock of {store.StoreLock(store_path).describe(info)}")
    return unlock


def _methods_cmd():
    @click.command("methods")
    @click.argument("name", required=False)
    def methods(name):
        """List the explanation methods and their options (NAME: one method's options in full)."""
        from convlens.config import field_help
        from convlens.kernels.registry import METHODS
        if name:
            if name not in METHODS:
                raise OptionError(f"{name!r} is not a method; choose from {', '.join(sorted(METHODS))}")
            spec = METHODS[name]
            click.echo(f"{name}: {spec.doc}")
            helps = field_help(spec.config)
            for f in dataclasses.fields(spec.config):
                if not f.name.startswith("_"):
                    click.echo(f"  -o {f.name}={f.default!r}: {helps.get(f.name, '')}")
            click.echo("  outputs: " + ", ".join(f"{o.name} ({', '.join(o.dims)})" for o in spec.outputs))
            return
        for n in sorted(METHODS):
            spec = METHODS[n]
            opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(spec.config)
                             if not f.name.startswith("_"))
            click.echo(f"{n:22s} {spec.doc}" + (f"  [{opts}]" if opts else ""))
    return methods


def _activations():
    from convlens.engine.runner import RunOptions

    @click.command("activations")
    @click.argument("model")
    @click.argument("images", nargs=-1, required=True)
    @click.option("--layers", default="conv", show_default=True, help="all, conv, or layer names (comma-separated).")
    @config_options(RunOptions, include=("resize",))
    @click.option("--out", type=click.Path(), help="Write the activations to this Zarr store (.zarr).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
    @model_options
    def activations(model, images, layers, out, overwrite, resize, **kw):
        """Intermediate activations of IMAGES at the chosen layers (one forward pass)."""
        import numpy as np

        from convlens.engine import sources, store
        from convlens.engine.executor import Batch, Executor, Fn
        from convlens.kernels.activations import activations as acts_of
        if out:
            store.check_replaceable(out)
            if store.exists(out) and not overwrite:
                raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
        m, params = _load({"name_or_path": model, **kw})
        names = m.resolve_layers(layers)
        x, ids = sources.load_images(list(images), m.input_size, resize or "squash")
        comp = Fn(lambda p, i, k: acts_of(m, p, i["images"], names), (m.computation, names), ("images",),
                  "activations")
        with Executor(params, batch=len(x), tune=False) as ex:
            acts = ex.run({"a": comp}, Batch({"images": x.astype(np.float32)}, np.arange(len(x))))["a"]
        for name in names:
            a = acts[name]
            click.echo(f"{name:28s} {str(list(a.shape[1:])):22s} mean {a.mean():10.4g}  max {a.max():10.4g}  "
                       f"zero {100 * (a == 0).mean():5.1f}%")
        if out:
            root = store.create(out, overwrite=overwrite, attrs={**store.model_attrs(m), "command": "activations",
                                                                 "resize": resize or "squash"})
            store.write(root, "ids", np.asarray(ids))
            store.write(root, "inputs", x)
            for name in names:
                store.write(root, f"activations/{name}", np.asarray(acts[name]))
            store.finish(out)
            click.echo(f"wrote {out}")
    return activations


def _weights():
    @click.command("weights")
    @click.argument("model")
    @click.option("--layer", "layers", multiple=True, help="Conv layer (repeat; default: every conv layer).")
    @click.option("--out", type=click.Path(), help="Write kernels and filter images to this Zarr store.")
    @click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
    @model_options
    def weights_cmd(model, layers, out, overwrite, **kw):
        """Raw filter weights of conv layers, as images normalised per layer."""
        import numpy as np

        from convlens.engine import store
        from convlens.engine.executor import Executor, Fn
        from convlens.kernels.activations import filter_images
        if out:
            store.check_replaceable(out)
            if store.exists(out) and not overwrite:
                raise ConvlensError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
        m, params = _load({"name_or_path": model, **kw})
        names = list(layers) or list(m.conv_layer_names)
        with Executor(params, batch=1, tune=False) as ex:
            res = {n: ex.call(Fn(lambda p, i, k, n=n: filter_images(m, p, n), ("filters", m.computation, n), (),
                                 "filters", whole=True)) for n in names}
        for n, r in res.items():
            k = r["kernel"]
            click.echo(f"{n:28s} kernel {list(k.shape)}  filters {list(r['filters'].shape)}  "
                       f"range [{k.min():.4g}, {k.max():.4g}]")
        if out:
            root = store.create(out, overwrite=overwrite, attrs={**store.model_attrs(m), "command": "weights"})
            for n, r in res.items():
                store.write(root, f"weights/{n}/kernel", np.asarray(r["kernel"]))
                f = np.asarray(r["filters"])
                rgb = f.shape[-1] == 3 and f.ndim == 4 and r["kernel"].shape[2] == 3
                store.write(root, f"weights/{n}/filters", f,
                            ("filter", "kh", "kw", "rgb") if rgb else ("filter", "c_in", "kh", "kw"))
            store.finish(out)
            click.echo(f"wrote {out}")
    return weights_cmd


COMMANDS: dict[str, tuple[str, Callable[[], click.Command]]] = {
    "models": ("List the built-in models.", _models),
    "summary": ("Print MODEL's layers, output shapes and parameter counts.", _summary),
    "explain": ("Explain IMAGES with one or more methods and print the predictions.", _explain),
    "occlusion": ("Occlusion sensitivity of IMAGES (a convenience alias of explain -m occlusion).", _occlusion),
    "run": ("Explain a whole data set into a resumable Zarr store.", _run),
    "atlas": ("Visualise every filter of every conv layer by gradient ascent.", lambda: _atlas_command("atlas", False)),
    "filters": ("Visualise the filters of one conv layer by gradient ascent.", lambda: _atlas_command("filters", True)),
    "audit": ("What the classifier looks at across STORE: flags, faithfulness, sanity.", _audit),
    "compare": ("Rank the methods of an audited STORE by faithfulness, with their cost.", _compare),
    "render": ("Draw what STORE holds as PNG files (and videos).", _render),
    "report": ("A browsable HTML report of STORE.", _report),
    "demo": ("The built-in end-to-end demo, offline.", _demo),
    "live": ("Explain a video stream as it comes.", _live),
    "info": ("What a store holds: model, methods, progress, failures, arrays.", _info),
    "verify": ("Check every completed chunk of STORE exists and decodes.", _verify),
    "unlock": ("Clear the lock a run that is gone left on STORE.", _unlock),
    "methods": ("List the explanation methods and their options.", _methods_cmd),
    "activations": ("Intermediate activations of IMAGES at chosen layers.", _activations),
    "weights": ("Raw filter weights of conv layers, as images.", _weights),
}


class LazyGroup(click.Group):
    """Builds a command (and imports what it needs) only when it is used."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return COMMANDS[name][1]()

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (h, _) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convlens")
def cli():
    """Batch explanations for convolutional image classifiers.

    MODEL is a built-in name (see `convlens models`) or a Keras .keras / full-model .h5 file.
    """


def main(argv=None):
    debug = bool(os.environ.get("CONVLENS_DEBUG"))
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="convlens")
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: everything written so far is kept; continue a run with --resume", err=True)
        sys.exit(130)
    except click.UsageError as e:
        cmd = e.ctx.command.name if e.ctx and e.ctx.command else ""
        click.echo(f"error: {e.format_message()} (see convlens {cmd} --help)".replace("  ", " "), err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except OptionError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except ConvlensError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except MemoryError:
        click.echo("error: out of memory: lower --batch-size (or --workers, --max-pixels)", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the CLI never shows a traceback
        if debug:
            raise
        click.echo(f"error: unexpected {type(e).__name__}: {e} (a convlens bug: rerun with CONVLENS_DEBUG=1 "
                   "and report the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
