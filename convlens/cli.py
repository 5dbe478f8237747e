"""The ``convlens`` command line: options in, config objects out, one driver call each.

Options are generated from the config dataclasses (`convlens.config`): a run's from
`RunOptions`, occlusion's from `OcclusionConfig`, an atlas's from `AscentConfig` and
`AtlasOptions`, an audit's from `AuditConfig`, drawing's from `RenderOptions` and
`ReportOptions`, live's from `LiveOptions`, loading a model's from `LoadOptions`: names,
defaults and help text from the fields and their docs, values checked by the config's own
declaration. Method options are ``-o [METHOD.]KEY=VALUE``, checked the same way. Commands
are built only when used, so ``convlens render`` and ``convlens info`` never import JAX.

Errors print one line (``error: what was wrong; what to do``): exit code 2 for usage
errors (a bad option value included), 1 for failures, 130 after Ctrl-C.
``CONVLENS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from convlens import __version__
from convlens.cli_options import (_chosen, _command, _load, _method_options, _mode, _note, build, config_options,
                                  method_options, model_options, out_options)
from convlens.errors import ConvlensError, OptionError

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
        m, _ = _load(model, kw)
        click.echo(table(m))
        click.echo(f" Preprocessing: {m.preprocess_spec.describe()}; weights: {m.source}"
                   + (f" (sha256 {m.weights_sha256[:12]})" if m.weights_sha256 else ""))
    return summary


def _explain_files(model, images, per, kw, command):
    """Runs methods ``per`` over a few image files through the engine, prints each item."""
    from convlens.engine import runner, sources, store
    mode, out = _mode(kw), kw.pop("out")
    opts = build(runner.RunOptions, kw, progress=False)
    if out:
        store.preflight(out, mode)
    src = sources.files_source(images)
    m, params = _load(model, kw)
    per = _chosen(per, m)
    text, error = runner.explain_files(m, params, src, runner.RunRequest(per, out, opts, mode, command=command), _note)
    click.echo(text)
    if error:
        raise ConvlensError(error)


def _explain():
    from convlens.engine.runner import RunOptions

    @click.command("explain")
    @click.argument("model")
    @click.argument("images", nargs=-1, required=True)
    @method_options
    @config_options(RunOptions, include=("target", "batch_size", "seed", "resize", "keep_inputs", "max_pixels"))
    @out_options()
    @model_options
    def explain(model, images, methods, layer, options, **kw):
        """Explain IMAGES (files, folders or globs) with one or more methods and print the
        predictions; --out keeps everything in a store (the same schema as `convlens run`)."""
        _explain_files(model, images, _method_options(methods, options, layer), kw, "explain")
    return explain


def _occlusion():
    from convlens.engine.runner import RunOptions
    from convlens.kernels.occlusion import OcclusionConfig

    @click.command("occlusion")
    @click.argument("model")
    @click.argument("images", nargs=-1, required=True)
    @config_options(OcclusionConfig)
    @config_options(RunOptions, include=("target", "batch_size", "resize"))
    @out_options()
    @model_options
    def occlusion(model, images, **kw):
        """Occlusion sensitivity of IMAGES: the score drop under a sliding patch (the same as
        `convlens explain -m occlusion`, with occlusion's options spelled out)."""
        names = {f.name for f in dataclasses.fields(OcclusionConfig)}
        cfg = {k: kw.pop(k) for k in list(kw) if k in names and kw[k] is not None}
        kw["batch_size"] = kw["batch_size"] or 1
        _explain_files(model, images, {"occlusion": cfg}, kw, "occlusion")
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
    @out_options(resume=True)
    @click.option("--num-processes", type=click.IntRange(min=1), help="Processes in a multi-process run.")
    @click.option("--process-id", type=click.IntRange(min=0), help="This process's index in a multi-process run.")
    @click.option("--coordinator", metavar="HOST:PORT", help="Process 0's address in a multi-process run.")
    @click.option("--distributed-auto", is_flag=True, help="Join a multi-process run from the launcher's "
                  "environment (Slurm and others jax.distributed recognises).")
    @model_options
    def run_cmd(model, data, data_dir, masks, every, methods, layer, options, num_processes, process_id, coordinator,
                distributed_auto, **kw):
        """Explain a whole data set (images, TFDS, arrays or video files) into a Zarr store
        (resumable; many devices and processes)."""
        from convlens.engine import distributed, runner, sources, store
        if every is not None and every < 1:
            raise OptionError(f"--every must be at least 1, got {every}")
        per = _method_options(methods, options, layer)
        mode, out, verify_full = _mode(kw), kw.pop("out"), kw.pop("verify_full")
        opts = build(RunOptions, kw)
        store.preflight(out, mode)
        proc = distributed.initialize(num_processes, process_id, coordinator, auto=distributed_auto)
        src = sources.open_source(list(data), data_dir=data_dir, masks=masks, every=every,
                                  max_pixels=opts.max_pixels)  # before the model: fail fast
        m, params = _load(model, kw)
        request = runner.RunRequest(_chosen(per, m), out, opts, mode, verify_full, command=_command())
        s = distributed.run(m, params, src, request, proc, note=_note)
        if proc.index == 0:
            click.echo(runner.summary_text(s, out))
            if runner.summary_error(s, out):
                raise ConvlensError(runner.summary_error(s, out))
    return run_cmd


def _atlas_command(name: str, one_layer: bool):
    from convlens.engine.atlas import AtlasOptions
    from convlens.kernels.ascent import AscentConfig

    def cmd(model, layers, **kw):
        from convlens.engine import store
        from convlens.engine.atlas import run_atlas
        mode, out, verify_full = _mode(kw), kw.pop("out"), kw.pop("verify_full")
        cfg, a = build(AscentConfig, kw), build(AtlasOptions, kw)
        store.preflight(out, mode)
        m, params = _load(model, kw)
        s = run_atlas(m, params, out, layers=layers, filters=a.filters, cfg=cfg, batch=a.batch,
                      memory_mb=a.memory_mb, seed=a.seed, resume=mode == "resume", overwrite=mode == "overwrite",
                      progress=a.progress, loop=a.loop, command=name, note=_note, verify_full=verify_full)
        done = f"{s.filters} filters of {s.layers} layer(s) in {s.seconds:.1f} s ({s.filters_per_second:.2f} filters/s)"
        click.echo(f"wrote {out}: {done}" + (f"; {s.skipped_chunks} chunks already done" if s.skipped_chunks else ""))
    cmd.__doc__ = ("Visualise the filters of one conv layer by gradient ascent (an atlas of one layer)." if one_layer
                   else "Visualise every filter of every conv layer (or --layers / --filters) by gradient ascent.")
    fn = out_options(resume=True)(config_options(AtlasOptions)(config_options(AscentConfig)(model_options(cmd))))
    fn = click.option("--layer" if one_layer else "--layers", "layers", required=one_layer,
                      default=None if one_layer else "conv", show_default=not one_layer,
                      help="The conv layer." if one_layer else "conv (every conv layer) or names, comma-separated.")(fn)
    return click.command(name)(click.argument("model")(fn))


def _audit():
    from convlens.engine.audit import AuditConfig

    @click.command("audit")
    @click.argument("store_path", metavar="STORE")
    @click.option("--method", "-m", "methods", multiple=True, help="Audit only these methods (default: every map).")
    @config_options(AuditConfig)
    def audit(store_path, methods, **kw):
        """What the classifier looks at across STORE: statistics, shortcut flags, and the
        quality metrics of every method against two controls."""
        from convlens.engine.audit import audit as run_audit
        from convlens.render.tables import compare_table, table
        cfg = build(AuditConfig, kw)
        findings = run_audit(store_path, cfg, methods=[m for v in methods for m in v.split(",") if m] or None,
                             progress=_note)
        click.echo(table(findings))
        if cfg.metrics:
            click.echo("\n" + compare_table(store_path))
        click.echo(f"audit written to {store_path} (audit/...): {sum(len(e['flags']) for e in findings.values())} "
                   "flag(s)")
    return audit


def _text(name: str, doc: str, fn: Callable[[str], str], arg: str = "STORE"):
    """A command printing ``fn(argument)``."""
    @click.command(name, help=doc)
    @click.argument("value", metavar=arg)
    def cmd(value):
        click.echo(fn(value))
    return cmd


def _render():
    from convlens.render.render import RenderOptions

    @click.command("render")
    @click.argument("store_path", metavar="STORE")
    @click.option("--out", type=click.Path(file_okay=False), required=True,
                  help="Folder for the PNG files (new, empty, or an earlier render's).")
    @config_options(RenderOptions)
    def render(store_path, out, **kw):
        """Draw what STORE holds: overlays, feature maps, filters, atlases, audit figures (PNG),
        and for video runs the overlays as a video."""
        from convlens.render.render import render_store
        groups = render_store(store_path, out, build(RenderOptions, kw))
        if not groups:
            raise ConvlensError(f"{store_path} holds nothing to draw (no maps with inputs, activations, weights, "
                                "atlas or audit)")
        for g, files in groups.items():
            click.echo(f"{g:12s} {len(files):5d} files in {Path(out) / g if g != 'pipeline' else out}")
    return render


def _report():
    from convlens.render.render import ReportOptions

    @click.command("report")
    @click.argument("store_path", metavar="STORE")
    @click.option("--out", type=click.Path(dir_okay=False), required=True, help="The HTML file to write.")
    @config_options(ReportOptions)
    def report(store_path, out, **kw):
        """A browsable HTML report of STORE (no network needed to view it)."""
        from convlens.render.report import report as write_report
        pages = write_report(store_path, out, build(ReportOptions, kw))
        click.echo(f"wrote {out}" + (f" and {len(pages) - 1} gallery page(s)" if len(pages) > 1 else ""))
    return report


def _demo():
    @click.command("demo")
    @click.option("--out", type=click.Path(file_okay=False), default="convlens-demo", show_default=True,
                  help="Folder for the demo's data, model, store and report (new, or an earlier demo's).")
    def demo(out):
        """The built-in demo, offline: train a convnet with a planted shortcut, explain, audit, report."""
        from convlens.demo import run_demo
        click.echo(run_demo(out, log=click.echo)["summary"])
    return demo


def _live():
    from convlens.live import LiveOptions
    from convlens.render.render import LookOptions

    @click.command("live")
    @click.argument("model")
    @click.argument("stream")
    @method_options
    @config_options(LiveOptions)
    @config_options(LookOptions, exclude=("limit",))
    @click.option("--quiet", is_flag=True, help="No running status line.")
    @model_options
    def live(model, stream, methods, layer, options, quiet, **kw):
        """Explain a video STREAM as it comes (camera:0, /dev/video0, rtsp://..., or a file),
        dropping frames rather than queueing them when the model is slower than the stream."""
        import time as _time

        from convlens.live import live as run_live, writable
        per = _method_options(methods, options, layer)
        if len(per) > 1:
            raise OptionError("live runs one method at a time")
        opts, look = build(LiveOptions, kw), build(LookOptions, kw)
        writable(opts)
        m, params = _load(model, kw)
        ((method, per),) = _chosen(per, m).items()
        last = [0.0]

        def status(stats, _frame):
            if not quiet and _time.perf_counter() - last[0] > 1.0:
                last[0] = _time.perf_counter()
                click.echo(f"\rlive: {stats.processed} frames, {stats.fps:.1f} fps", nl=False, err=True)
        stats = run_live(m, params, stream, method=method, options=per, opts=opts, look=look, on_frame=status)
        if not quiet:
            click.echo("", err=True)
        click.echo(f"live {stream} ({stats.stopped_by}): {stats.line()}" + (f"; wrote {opts.out}" if opts.out else ""))
    return live


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
    @click.option("--force", is_flag=True, help="Also clear a lock held on another host (which cannot be checked "
                  "from here).")
    def unlock(store_path, force):
        """Clear STORE's lock, left by a run that is gone (never while that run is alive)."""
        from convlens.engine.lock import StoreLock, unlock as clear
        info = clear(store_path, force=force)
        click.echo(f"{store_path} was not locked" if info is None else
                   f"cleared the lock of {StoreLock(store_path).describe(info)}")
    return unlock


def _listing(name: str, doc: str, module: str):
    @click.command(name, help=doc)
    @click.argument("item", required=False, metavar="NAME")
    def cmd(item):
        import importlib
        click.echo(importlib.import_module(module).describe(item))
    return cmd


def _activations():
    from convlens.engine.runner import RunOptions

    @click.command("activations")
    @click.argument("model")
    @click.argument("images", nargs=-1, required=True)
    @click.option("--layers", default="conv", show_default=True, help="all, conv, or layer names (comma-separated).")
    @config_options(RunOptions, include=("resize",))
    @out_options()
    @model_options
    def activations(model, images, layers, resize, **kw):
        """Intermediate activations of IMAGES at the chosen layers (one forward pass)."""
        from convlens.engine import extract, sources, store
        mode, out = _mode(kw), kw.pop("out")
        if out:
            store.preflight(out, mode)
        m, params = _load(model, kw)
        x, ids = sources.load_images(list(images), m.input_size, resize or "squash")
        acts = extract.activations(m, params, x, m.resolve_layers(layers), ids, out, mode=mode, resize=resize or "squash")
        click.echo(extract.describe(acts) + (f"\nwrote {out}" if out else ""))
    return activations


def _weights():
    @click.command("weights")
    @click.argument("model")
    @click.option("--layer", "layers", multiple=True, help="Conv layer (repeat; default: every conv layer).")
    @out_options()
    @model_options
    def weights_cmd(model, layers, **kw):
        """Raw filter weights of conv layers, as images normalised per layer."""
        from convlens.engine import extract, store
        mode, out = _mode(kw), kw.pop("out")
        if out:
            store.preflight(out, mode)
        m, params = _load(model, kw)
        res = extract.weights(m, params, list(layers) or list(m.conv_layer_names), out, mode=mode)
        click.echo(extract.describe(res) + (f"\nwrote {out}" if out else ""))
    return weights_cmd


def _info_text(path):
    from convlens.engine.info import info_text
    return info_text(path)


def _compare_text(path):
    from convlens.render.tables import compare_table
    return compare_table(path)


COMMANDS: dict[str, tuple[str, Callable[[], click.Command]]] = {
    "models": ("List the built-in models.", _models),
    "summary": ("Print MODEL's layers, output shapes and parameter counts.", _summary),
    "explain": ("Explain IMAGES with one or more methods and print the predictions.", _explain),
    "occlusion": ("Occlusion sensitivity of IMAGES (a convenience alias of explain -m occlusion).", _occlusion),
    "run": ("Explain a whole data set into a resumable Zarr store.", _run),
    "atlas": ("Visualise every filter of every conv layer by gradient ascent.", lambda: _atlas_command("atlas", False)),
    "filters": ("Visualise the filters of one conv layer by gradient ascent.", lambda: _atlas_command("filters", True)),
    "audit": ("What the classifier looks at across STORE: flags and quality metrics against controls.", _audit),
    "compare": ("The quality metrics of an audited STORE's methods, their ranking and cost.",
                lambda: _text("compare", "The quality metrics of an audited STORE's methods against the controls, "
                              "their ranking, and what each method cost.", _compare_text)),
    "render": ("Draw what STORE holds as PNG files (and videos).", _render),
    "report": ("A browsable HTML report of STORE.", _report),
    "demo": ("The built-in end-to-end demo, offline.", _demo),
    "live": ("Explain a video stream as it comes.", _live),
    "info": ("What a store holds: model, methods, progress, failures, arrays.",
             lambda: _text("info", "What a store holds: model, methods, progress, failures, arrays.", _info_text)),
    "verify": ("Check every completed chunk of STORE exists and decodes.", _verify),
    "unlock": ("Clear the lock a run that is gone left on STORE.", _unlock),
    "methods": ("List the explanation methods and their options.",
                lambda: _listing("methods", "List the explanation methods and their options (NAME: one in full).",
                                 "convlens.kernels.registry")),
    "metrics": ("List the quality metrics and their options.",
                lambda: _listing("metrics", "List the quality metrics: family, which way is better, what each needs "
                                 "besides maps, and the presets (NAME: one in full, with its options).",
                                 "convlens.kernels.metrics.registry")),
    "activations": ("Intermediate activations of IMAGES at chosen layers.", _activations),
    "weights": ("Raw filter weights of conv layers, as images.", _weights),
}


class LazyGroup(click.Group):
    """Builds a command (and imports what it needs) only when it is used."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        return COMMANDS[name][1]() if name in COMMANDS else None

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (h, _) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convlens")
def cli():
    """Batch explanations for convolutional image classifiers.

    MODEL is a built-in name (see `convlens models`) or a Keras .keras / full-model .h5 file.
    """


def main(argv=None):
    from convlens.config import use_compile_cache
    use_compile_cache()  # a command is a process of its own: compiled programs carry over on disk
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
    except (OptionError, ConvlensError) as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2 if isinstance(e, OptionError) else 1)
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
