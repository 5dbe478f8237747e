"""Runs explanation methods over a whole data set into a Zarr store.

The unit of work is a *chunk*: ``chunk`` consecutive items, one chunk of every array
along the sample axis. A process owns whole chunks (chunk ``c`` belongs to process
``c % P``), so several processes, and a resumed run, never write the same chunk file.

Per chunk: items are decoded in a thread pool (running ahead of the device), fitted to
the model's input size and cut into the executor's fixed-shape batches; the `Executor`
compiles each method once, pads, shards and makes the per-item keys, and dispatches
chunk ``k+1`` before chunk ``k``'s results come to the host. A writer thread stores them,
the ``status`` chunk last (see `store` for why that makes resuming safe).

A run owns its store while it writes (`convlens.engine.lock.StoreLock`); ``--resume`` checks that the
data are the same as when the store was started and verifies every chunk it would trust
(`convlens.engine.verify`), recomputing what is missing or damaged; every run ends with
the same check. Ctrl-C or an error ends the run with every thread and file closed and the
store resumable.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convlens.config import Config, option
from convlens.engine import sources as src_mod
from convlens.engine import schema, store
from convlens.engine import targets as tg
from convlens.engine.executor import Executor, Explain, Fn, Group, merge, round_batch, split
from convlens.engine.lock import StoreLock
from convlens.engine.progress import progress_bar
from convlens.engine.sources import ItemError, Source, safe_id
from convlens.errors import ConvlensError
from convlens.models.labels import class_probabilities, topk
from convlens.models.network import Model
from convlens.pixels import MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class RunOptions(Config):
    """How a run goes (none of it changes the numbers but target, seed and resize).

    Attributes:
      target: top1, top5 / topk:N, class indices (281 or 281,285), or label (each item's
        ground-truth class).
      batch_size: images per compiled call (rounded up to a multiple of the local device count).
      chunk: items per store chunk (rounded up to a multiple of the batch); default max(16, batch).
      seed: PRNG seed; item i uses fold_in(key(seed), i) wherever it runs.
      resize: fit images to the model: squash, crop (shorter side + centre crop) or pad.
      keep_inputs: store the resized images (audits' faithfulness metrics, overlays and
        the report need them; 150 kB per 224x224 item).
      topk: predictions stored per item.
      workers: image decoding threads.
      progress: show a progress bar.
      max_pixels: the most pixels an image may decode to; larger ones fail with the reason.
    """

    target: Any = "top1"
    batch_size: int = option(8, min=1, max=1 << 16)
    chunk: int | None = option(None, min=1, max=1 << 20)
    seed: int = option(0, min=0)
    resize: str = option("squash", choices=src_mod.RESIZE_POLICIES)
    keep_inputs: bool = True
    topk: int = option(5, min=1, max=1000)
    workers: int = option(4, min=1, max=256)
    progress: bool = True
    max_pixels: int = option(MAX_PIXELS, min=64)

    _owner = "run"


@dataclasses.dataclass(frozen=True)
class Process:
    """This process's place in a multi-process run (``jax.process_index/count``)."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_jax(cls) -> Process:
        return cls(jax.process_index(), jax.process_count())


@dataclasses.dataclass
class Summary:
    """What a run did: counts and timing (this process's share where noted)."""

    store: str
    items: int
    done: int
    failed: int
    skipped_chunks: int
    computed_chunks: int
    seconds: float
    method_seconds: dict[str, float]
    failures: list[tuple[str, str]]
    computed_items: int = 0
    repaired: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def items_per_second(self) -> float:
        computed = self.computed_items or 1
        return computed / max(self.seconds, 1e-9)


# ---------------------------------------------------------------- planning

def layer_head(model: Model, cfg) -> dict:
    """``{"head": ...}``: how the class scores read the method's layer (`common.head_kind`),
    recorded so audits can tell why a method's maps are empty; ``{}`` without a layer."""
    from convlens.kernels.common import head_kind
    layer = getattr(cfg, "layer", None)
    return {"head": head_kind(model, layer)} if layer else {}


def resolve_methods(model: Model, methods: dict[str, dict]) -> dict[str, Any]:
    """``{method: options}`` -> ``{method: resolved config}`` (one-line errors)."""
    from convlens.kernels.registry import resolve
    if not methods:
        raise ConvlensError("no methods to run; give at least one (e.g. --methods gradcam)")
    return {name: resolve(model, name, dict(opts)) for name, opts in methods.items()}


def fingerprint(model: Model, configs: dict, source: Source, opts: RunOptions, chunk: int) -> str:
    """What must match for a resumed run to produce the same store (the data's contents
    are compared separately, item by item)."""
    ids = hashlib.sha256("\n".join(source.ids).encode("utf-8", "surrogateescape")).hexdigest()
    return store.fingerprint(model.name, model.source, model.weights_sha256, model.preprocess_spec.describe(),
                             configs, source.description, len(source), ids, str(opts.target), opts.seed,
                             opts.resize, opts.keep_inputs, opts.topk, chunk)


def model_class_names(model: Model):
    """The model's label names for a store: the list, a marker for ImageNet's 1000, or None."""
    if model.class_names is None:
        return None
    from convlens.models.labels import imagenet_class_names
    if len(model.class_names) == 1000 and tuple(model.class_names) == imagenet_class_names():
        return "imagenet-1k"
    return list(model.class_names)


def model_summary(model: Model) -> str | None:
    """Keras-style layer table of the model, for reports."""
    try:
        from convlens.models.summary import summary
        return summary(model)
    except Exception:  # noqa: BLE001 - a summary is a nicety, never a reason to fail a run
        return None


class _Writer(threading.Thread):
    """Writes finished chunks in the background; errors surface in the main thread."""

    def __init__(self, depth: int = 2):
        super().__init__(daemon=True, name="convlens-writer")
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None

    def put(self, fn: Callable[[], None]):
        if self.error:
            raise self.error
        while True:
            try:
                self.q.put(fn, timeout=0.5)
                return
            except queue.Full:
                if self.error:
                    raise self.error from None

    def run(self):
        while True:
            fn = self.q.get()
            if fn is None:
                return
            if self.error is None:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001 - re-raised by put/close
                    self.error = e

    def close(self):
        self.q.put(None)
        self.join()
        if self.error:
            raise self.error


# ---------------------------------------------------------------- the run

WRITE_MODES = ("new", "overwrite", "resume")


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """What a run is asked to do (everything but the model and the data).

    Attributes:
      methods: ``{method: options}``.
      out: store path or fsspec URL (``None``: in memory).
      opts: `RunOptions`.
      mode: what to do with an existing store: ``new`` (refuse it), ``overwrite`` or ``resume``.
      verify_full: on resume, decode every chunk (not only check its files).
      storage_options: fsspec options for URL stores.
      command: the command line, recorded in the store.
    """

    methods: dict
    out: Any = None
    opts: RunOptions = RunOptions()
    mode: str = "new"
    verify_full: bool = False
    storage_options: dict | None = None
    command: str = "run"

    def __post_init__(self):
        if self.mode not in WRITE_MODES:
            raise ConvlensError(f"mode {self.mode!r}: one of {', '.join(WRITE_MODES)}")

    @classmethod
    def of(cls, methods, out, *, resume: bool = False, overwrite: bool = False, **kw) -> RunRequest:
        """A request from the command line's flags (``--resume``, ``--overwrite``)."""
        if resume and overwrite:
            raise ConvlensError("give either --resume or --overwrite, not both")
        return cls(methods, out, mode="resume" if resume else ("overwrite" if overwrite else "new"), **kw)


class Run:
    """A prepared run; `execute` does the work of one process.

    Args:
      model, params: from `convlens.load_model`.
      source: a `Source`.
      request: a `RunRequest` (methods, output, options).
      process: this process's share (`Process`).
      note: where messages for the user go (e.g. what resuming repaired).
    """

    def __init__(self, model: Model, params, source: Source, request: RunRequest, *, process: Process = Process(),
                 note: Callable[[str], None] | None = None):
        out, opts, methods = request.out, request.opts, request.methods
        if out is None:  # results wanted in memory only (e.g. `convlens explain` without --out)
            import zarr
            out = zarr.storage.MemoryStore()
        self.model, self.params, self.source = model, params, source
        source.configure(size=model.input_size, max_pixels=opts.max_pixels)
        self.out = out if not isinstance(out, (str, bytes)) and not hasattr(out, "__fspath__") else str(out)
        self.request, self.opts, self.process, self.storage_options = request, opts, process, request.storage_options
        self.command, self.verify_full = request.command, request.verify_full
        self.note = note or (lambda msg: None)
        self.configs = resolve_methods(model, methods)
        self.n = len(source)
        if self.n == 0:
            raise ConvlensError(f"{source.description}: no items to explain")
        self.n_classes = tg.n_classes(model)
        labelled = source.class_names is not None or bool((source.labels >= 0).any()) or isinstance(
            source, src_mod.TfdsSource)
        self.targets = tg.parse(opts.target, self.n, self.n_classes, labelled=labelled)
        if self.targets.mode == tg.PER_ITEM:
            raise ConvlensError("a run takes top1/topk:N, class indices for every item, or label")
        self.executor_batch = round_batch(opts.batch_size)
        want = opts.chunk or max(schema.SAMPLE_CHUNK, self.executor_batch)
        self.chunk = -(-want // self.executor_batch) * self.executor_batch
        self.n_chunks = -(-self.n // self.chunk)
        self.size = model.input_size
        self.k = min(opts.topk, max(self.n_classes, 2) if self.n_classes == 1 else self.n_classes)
        self.fp = fingerprint(model, self.configs, source, opts, self.chunk)
        self.comps = {m: Explain(model, m, cfg, self.targets.top_k) for m, cfg in self.configs.items()}
        for comp in self.comps.values():
            comp.check(self.batch)  # refuse at once what cannot fit, before the store is touched
        self.lock: StoreLock | None = None
        self._data_fp = None

    @property
    def batch(self) -> int:
        return self.executor_batch

    # ------------------------------------------------------------ set-up

    def output_specs(self) -> dict[str, dict[str, tuple[tuple[int, ...], np.dtype, tuple[str, ...]]]]:
        """Per method, per output: (shape of one item, dtype, dims), from ``eval_shape``."""
        from convlens.engine.executor import abstract_keys
        b = self.batch
        inputs = {"images": jax.ShapeDtypeStruct((b, *self.size, self.model.channels), jnp.float32),
                  "targets": jax.ShapeDtypeStruct((b, self.targets.width), jnp.int32)}
        keys = abstract_keys(b)
        specs = {}
        for m, comp in self.comps.items():
            shapes = jax.eval_shape(comp, self.params, {k: inputs[k] for k in comp.inputs}, keys)
            dims = comp.spec.dims
            specs[m] = {k: (tuple(v.shape[1:]), np.dtype(v.dtype), dims[k]) for k, v in shapes.items()}
        return specs

    def data_fingerprint(self):
        if self._data_fp is None:
            self._data_fp = self.source.fingerprint()
        return self._data_fp

    def attrs(self, specs) -> dict:
        _, sample = self.data_fingerprint()
        return {**store.model_attrs(self.model), **self.source.store_attrs(), "command": self.command,
                "source": self.source.description,
                "resize": self.opts.resize, "target": str(self.opts.target), "seed": self.opts.seed,
                "class_names": list(self.source.class_names) if self.source.class_names else None,
                "model_class_names": model_class_names(self.model), "model_summary": model_summary(self.model),
                "chunk": self.chunk, "fingerprint": self.fp, "data_sample": sample,
                "methods": {m: {**store.method_entry(self.comps[m].spec, self.configs[m],
                                                     {k: v[2] for k, v in outs.items()}),
                                **layer_head(self.model, self.configs[m]),
                                "shapes": {k: list(v[0]) for k, v in outs.items()},
                                "dtypes": {k: str(v[1]) for k, v in outs.items()}}
                            for m, outs in specs.items()}}

    def create_store(self, root, specs) -> None:
        """A new store's arrays: the run layout of the schema, then each method's outputs."""
        n, c = self.n, self.chunk
        values = {"ids": np.asarray(self.source.ids, dtype=object).astype(str)}
        digests, _ = self.data_fingerprint()
        if digests is not None:
            values["source/digest"] = digests.astype(np.uint64)
        include = (["inputs"] if self.opts.keep_inputs else []) + (["masks"] if self.source.has_masks else [])
        store.create_layout(root, "run", {"sample": n, "rank": self.k, "y": self.size[0], "x": self.size[1], "rgb": 3,
                                          "process": self.process.count, "method": len(specs)},
                            chunk=c, values=values, include=include)
        extra = self.source.store_arrays()  # video positions
        for layout in {store.layout_of(name) for name in extra}:
            store.create_layout(root, layout, {"sample": n}, chunk=c,
                                values={k: v for k, (v, _) in extra.items() if store.layout_of(k) == layout})
        for m, outs in specs.items():
            for name, (shape, dtype, dims) in outs.items():
                store.create_array(root, f"{m}/{name}", (n, *shape), dtype, dims, c)
        root["timing"].attrs["methods"] = list(specs)
        self.write_pipeline(root)

    def write_pipeline(self, root, k: int = 4):
        """A visual log of the input pipeline: the first readable items as read (shrunk to
        at most 256 pixels a side), as resized, and as the model sees them."""
        from PIL import Image
        raws, resized, ids = [], [], []
        for i in range(min(self.n, 16)):
            img, _, _, err = self.load(i)
            if err:
                continue
            try:
                raw = self.source.read(i).image
            except ItemError:
                continue
            if max(raw.shape[:2]) > 256:
                s = 256 / max(raw.shape[:2])
                raw = np.asarray(Image.fromarray(raw).resize((max(1, round(raw.shape[1] * s)),
                                                              max(1, round(raw.shape[0] * s))), Image.BILINEAR))
            raws.append(raw)
            resized.append(img)
            ids.append(self.source.ids[i])
            if len(ids) == k:
                break
        if not ids:
            return
        g = root.require_group("pipeline")
        for j, raw in enumerate(raws):
            store.write(g, f"raw/{j}", raw)
        store.write(g, "resized", np.stack(resized))
        model = self.model
        show = Fn(lambda p, i, k: {"x": model.preprocess(i["images"])}, ("preprocess", model.computation),
                  ("images",), "preprocess")
        with Executor(self.params, batch=len(resized), tune=False) as ex:
            pre = ex.map({"pre": show}, {"images": np.stack(resized).astype(np.float32)})["pre"]["x"]
        store.write(g, "preprocessed", pre.astype(np.float32))
        root.attrs["pipeline"] = {"ids": ids, "preprocessing": self.model.preprocess_spec.describe(),
                                  "resize": self.opts.resize}

    def check_same_data(self, root) -> None:
        """Refuses to resume over data whose files changed since the store was started."""
        digests, sample = self.data_fingerprint()
        stored_sample = root.attrs.get("data_sample") or {}
        changed = []
        if digests is not None and "source" in root and "digest" in root["source"]:
            try:
                old = np.asarray(root["source/digest"][:])
            except Exception:  # noqa: BLE001 - a damaged record of the data: compare the samples alone
                self.note("resume: the store's record of the data is damaged; comparing sampled contents only")
                old = digests
            diff = np.flatnonzero(old != digests)
            changed += [self.source.ids[i] for i in diff]
        changed += [k for k, v in sample.items() if k in stored_sample and stored_sample[k] != v
                    and k not in changed]
        if changed:
            few = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise ConvlensError(f"the data changed since {self.out} was started ({len(changed)} item(s) differ in "
                                f"size, time or content: {few}), so --resume would mix two data sets; use "
                                "--overwrite to start again, or restore the original files")

    def check_existing(self, w) -> None:
        """What a resumed store must also match beyond its fingerprint (the process count,
        the data's contents), and its damaged arrays written once at the start."""
        root = w.root
        if "timing" not in root or tuple(root["timing/method_seconds"].shape) != (self.process.count,
                                                                                  len(self.configs)):
            have = root["timing/method_seconds"].shape[0] if "timing" in root else "?"
            raise ConvlensError(f"{self.out} was started with {have} processes; resume it with the same "
                                "--num-processes")
        self.check_same_data(root)
        self.repaired = [(g, c) for g, cs in w.damaged.items() for c in sorted(cs)]
        self.rewrite_static(root, {name for name, _, _ in w.report.problems})

    def rewrite_static(self, root, damaged: set[str]) -> None:
        """Arrays written once when the store was made (ids, the data's record, video
        positions), written again from the source where damaged."""
        c = self.chunk
        static = {"ids": np.asarray(self.source.ids, dtype=object).astype(str)}
        digests, _ = self.data_fingerprint()
        if digests is not None:
            static["source/digest"] = digests.astype(np.uint64)
        static.update({k: v for k, (v, _) in self.source.store_arrays().items()})
        for name, values in static.items():
            if name in damaged:
                if name in root:
                    del root[name]
                store.write(root, name, values, chunk=c)

    def pending_chunks(self, root) -> list[int]:
        status = np.asarray(root["status"][:])
        mine = range(self.process.index, self.n_chunks, self.process.count)
        return [c for c in mine if (status[c * self.chunk:(c + 1) * self.chunk] == schema.PENDING).any()]

    # ------------------------------------------------------------ per item

    def load(self, i: int):
        """``(image [H, W, 3] uint8, mask or None, label or None, error or "")``."""
        try:
            item = self.source.read(i)
            if item.mask is not None:
                img, mask = src_mod.fit(item.image, self.size, self.opts.resize, item.mask)
            else:
                img, mask = src_mod.fit(item.image, self.size, self.opts.resize), None
            return img, mask, item.label, ""
        except ItemError as e:
            return None, None, None, str(e)
        except ConvlensError:
            raise
        except MemoryError:
            return None, None, None, "out of memory decoding this item (lower --max-pixels or --workers)"
        except Exception as e:  # noqa: BLE001 - one bad item never stops a run
            return None, None, None, f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------ execution

    def acquire(self) -> None:
        """Takes the store's lock (a run owns its store while it writes)."""
        if self.lock is None and isinstance(self.out, str):
            self.lock = StoreLock(self.out, self.storage_options, self.command, note=self.note).acquire()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def execute(self, prepare: bool = True, finalize: bool = True) -> Summary:
        """Does this process's chunks. With one process ``prepare`` locks and creates (or
        checks) the store first and ``finalize`` records, verifies and consolidates it;
        multi-process runs call `prepare_store` / `finalize_store` on process 0 around
        barriers instead."""
        specs = self.output_specs()
        self.repaired = []
        try:
            if prepare:
                self.acquire()
                self.prepare_store(specs)
            root = store.open_store(self.out, "r+", self.storage_options)
            todo = self.pending_chunks(root)
            mine = len(range(self.process.index, self.n_chunks, self.process.count))
            t0 = time.perf_counter()
            failures: list[tuple[str, str]] = []
            seconds: dict[str, float] = {}
            computed = self._loop(root, todo, failures, seconds)
            elapsed = time.perf_counter() - t0
            store.writable(root, "timing/method_seconds")[self.process.index] = np.asarray(
                [seconds.get(m, 0.0) + float(root["timing/method_seconds"][self.process.index, j])
                 for j, m in enumerate(self.configs)], np.float64)
            summary = Summary(self.out if isinstance(self.out, str) else "(memory)", self.n, 0, 0, mine - len(todo),
                              len(todo), elapsed, dict(seconds), failures, computed, list(self.repaired))
            if finalize:
                self.finalize_store(summary)
            return summary
        finally:
            if prepare:
                self.release()

    def prepare_store(self, specs=None):
        """Creates the store, or on resume checks and repairs it (`store.open_for_write`),
        under the lock this run holds."""
        specs = specs or self.output_specs()
        w = store.open_for_write(self.out, self.request.mode, fingerprint=self.fp, attrs=self.attrs(specs),
                                 storage_options=self.storage_options, command=self.command, note=self.note,
                                 lock=self.lock, verify_full=self.verify_full)
        if w.resumed:
            self.check_existing(w)
        else:
            self.create_store(w.root, specs)

    def _chunks(self, todo, pool, lookahead: int = 2):
        """``(ci, (loaded, images, labels, ok), batches)`` per chunk, decoded ahead in ``pool``."""
        futures: dict[int, list[cf.Future]] = {}

        def submit(ci):
            lo, hi = ci * self.chunk, min(self.n, (ci + 1) * self.chunk)
            futures[ci] = [pool.submit(self.load, i) for i in range(lo, hi)]

        for ci in todo[:lookahead]:
            submit(ci)
        try:
            for pos, ci in enumerate(todo):
                if pos + lookahead < len(todo):
                    submit(todo[pos + lookahead])
                loaded = [f.result() for f in futures.pop(ci)]
                yield ci, self._prepare(ci, loaded)
        finally:
            for fs in futures.values():
                for f in fs:
                    f.cancel()

    def _prepare(self, ci, loaded):
        lo = ci * self.chunk
        n = len(loaded)
        ok = np.array([err == "" for _, _, _, err in loaded])
        blank = np.zeros((*self.size, 3), np.uint8)
        images = np.stack([img if img is not None else blank for img, _, _, _ in loaded])
        labels = np.asarray([self.source.labels[lo + j] if lab is None else lab
                             for j, (_, _, lab, _) in enumerate(loaded)], np.int32)
        if self.targets.mode == tg.LABEL:
            bad = ok & ((labels < 0) | (labels >= self.n_classes))
            for j in np.flatnonzero(bad):
                why = "has no label" if labels[j] < 0 else f"has label {labels[j]}, which cannot be a target: " \
                                                           f"the model has {self.n_classes} classes"
                loaded[j] = (None, None, None, f"the item {why} (--target label)")
            ok &= ~bad
        idx = np.arange(lo, lo + n)
        inputs = {"images": images.astype(np.float32)}
        t = self.targets.for_items(idx, np.clip(labels, 0, max(self.n_classes - 1, 0)))
        if t is not None:
            inputs["targets"] = t
        return (loaded, images, labels, ok), split(inputs, self.batch, lo)

    def _loop(self, root, todo: list[int], failures, seconds) -> int:
        if not todo:
            return 0
        pool = cf.ThreadPoolExecutor(max(1, self.opts.workers), thread_name_prefix="convlens-decode")
        writer = _Writer()
        writer.start()
        items = sum(min(self.n, (ci + 1) * self.chunk) - ci * self.chunk for ci in todo)  # the last chunk is short
        bar = progress_bar(self.opts.progress and self.process.index == 0, items, desc="explaining",
                           already=self.n - items if self.process.count == 1 else 0)
        computed = 0
        try:
            with Executor(self.params, batch=self.batch, key=self.opts.seed, timing=True) as ex:
                groups = (Group((ci, data), self.comps, batches) for ci, (data, batches) in self._chunks(todo, pool))
                try:
                    for (ci, data), results in ex.stream(groups):
                        computed += self._collect(root, ci, data, results, writer, failures, bar)
                finally:
                    seconds.update(ex.seconds)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            try:
                writer.close()
            finally:
                bar.close()
                self.source.close()
        return computed

    def _collect(self, root, ci, data, results, writer, failures, bar) -> int:
        loaded, images, labels, ok = data
        merged = merge(results)
        lo = ci * self.chunk
        hi = lo + len(loaded)
        ok = ok.copy()
        # A kernel that produced a non-finite value for an item: that item failed, with the reason.
        for m, outs in merged.items():
            for k, v in outs.items():
                if v.dtype.kind == "f":
                    bad = ok & ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
                    for j in np.flatnonzero(bad):
                        loaded[j] = (None, None, None, f"{m} produced non-finite values in its {k!r} (check the "
                                                       "method's options and the model's outputs)")
                    ok &= ~bad
        if self.targets.mode == tg.POSITIVE:  # slots of classes that are not positives: target -1, maps NaN
            for m, outs in merged.items():
                probs = class_probabilities(outs["logits"], self.model.output_activation)
                merged[m] = tg.mask_positives(outs, self.comps[m].spec.dims, probs, self.targets)
        errors = np.asarray([safe_id(err) for _, _, _, err in loaded], dtype=object).astype(str)
        status = np.where(ok, schema.DONE, schema.FAILED).astype(np.uint8)
        first = next(iter(merged.values()))
        order, top_p = topk(class_probabilities(first["logits"], self.model.output_activation), self.k)
        top_p = top_p.astype(np.float32)
        order[~ok] = -1
        top_p[~ok] = np.nan
        for m in merged:
            for k, v in merged[m].items():
                v = np.array(v)
                v[~ok] = store.fill_value(v.dtype)
                merged[m][k] = v
        masks = None
        if self.source.has_masks:
            masks = np.stack([np.zeros(self.size, bool) if mk is None else mk for _, mk, _, _ in loaded])
        for j in np.flatnonzero(~ok):
            failures.append((self.source.ids[lo + j], str(errors[j])))
        keep = self.opts.keep_inputs

        def put(name, value):
            store.writable(root, name)[lo:hi] = value

        def write():
            for meth, vals in merged.items():
                for k, v in vals.items():
                    put(f"{meth}/{k}", v)
            put("predictions/topk_index", order)
            put("predictions/topk_prob", top_p)
            put("labels", labels)
            put("errors", errors)
            if keep:
                put("inputs", np.where(ok[:, None, None, None], images, 0).astype(np.uint8))
            if masks is not None:
                put("masks", masks)
            put("status", status)  # last: marks the chunk complete
            bar.update(hi - lo)
        writer.put(write)
        return hi - lo

    def finalize_store(self, summary: Summary | None = None):
        root = store.open_store(self.out, "r+", self.storage_options)
        status = np.asarray(root["status"][:])
        secs = np.asarray(root["timing/method_seconds"][:]).sum(axis=0)
        done, failed = int((status == schema.DONE).sum()), int((status == schema.FAILED).sum())
        items = max(done + failed, 1)
        from convlens.engine.verify import verify
        report = verify(root)
        run = {"items": self.n, "done": done, "failed": failed, "pending": int((status == schema.PENDING).sum()),
               "processes": self.process.count,
               "method_seconds_per_item": {m: float(s) / items for m, s in zip(self.configs, secs)},
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "verified": not report.problems}
        if summary is not None:
            run["seconds"] = summary.seconds
            run["items_per_second"] = summary.items_per_second
            summary.done, summary.failed = done, failed
            summary.problems = report.lines()
        root.attrs["run"] = run
        store.finish(self.out, self.storage_options)
        return run


def run(model: Model, params, source: Source | str | Sequence[str], methods: dict[str, dict] | Sequence[str],
        out, *, resume: bool = False, overwrite: bool = False, storage_options=None, command: str = "run",
        data_dir: str | None = None, **options) -> Summary:
    """Explains every item of ``source`` with ``methods`` into the store ``out``.

    Args:
      model, params: from `convlens.load_model`.
      source: a `Source`, or a spec for `sources.open_source` (folder, files, ``.npy``,
        ``tfds:NAME:SPLIT``).
      methods: method names, or ``{method: options}``.
      out: store path or fsspec URL.
      resume: continue an interrupted run into ``out``; overwrite: replace ``out``
        (only ever a convlens store).
      **options: `RunOptions` fields (``target``, ``batch_size``, ``seed`` ...).

    Returns:
      A `Summary`; the store holds the results (schema in `convlens.engine.schema`).
    """
    from convlens.config import build
    opts = build(RunOptions, options)
    if not isinstance(source, Source):
        source = src_mod.open_source(source, data_dir=data_dir, max_pixels=opts.max_pixels)
    if not isinstance(methods, dict):
        methods = {m: {} for m in methods}
    request = RunRequest.of(methods, out, resume=resume, overwrite=overwrite, opts=opts,
                            storage_options=storage_options, command=command)
    return Run(model, params, source, request).execute()


def summary_text(s: Summary, out) -> str:
    """What a run did, for the command line."""
    rate = f"{s.items_per_second:.2f} images/s" if s.computed_items else "nothing left to do"
    resumed = f", {s.skipped_chunks} chunks already done" if s.skipped_chunks else ""
    repaired = f", {len(s.repaired)} damaged chunk(s) recomputed" if s.repaired else ""
    lines = [f"wrote {s.store}: {s.done} done, {s.failed} failed of {s.items} items in {s.seconds:.1f} s "
             f"({rate}{resumed}{repaired})"]
    lines += [f"  failed: {item}: {why}" for item, why in s.failures[:10]]
    if len(s.failures) > 10:
        lines.append(f"  ... and {len(s.failures) - 10} more (see `convlens info {out}`)")
    return "\n".join(lines)


def summary_error(s: Summary, out) -> str | None:
    """Why a run did not finish well (a final check that failed, every item failed), or None."""
    if s.problems:
        return (f"{out} failed its final check ({'; '.join(s.problems[:3])}); run `convlens verify {out}` for the "
                "full report and --resume to repair it")
    if s.done == 0 and s.failed:
        first = f"; first: {s.failures[0][0]}: {s.failures[0][1]}" if s.failures else f": see `convlens info {out}`"
        return f"every item failed ({s.failed} of {s.items}){first}"
    return None


def items_text(root, methods, class_names) -> str:
    """One line per item: its top-3 predictions, then the targets each method explained."""
    from convlens.models.labels import decode_stored
    status = np.asarray(root["status"][:])
    errors = root["errors"][:]
    lines = []
    for i, item in enumerate(root["ids"][:]):
        if status[i] != schema.DONE:
            lines.append(f"{item}: failed ({errors[i]})")
            continue
        top = decode_stored(root["predictions/topk_index"][i], root["predictions/topk_prob"][i], class_names)
        lines.append(f"{item}: " + ", ".join(f"{name} {p:.3f}" for _, name, p in top[:3]))
        for meth in methods:
            layer = root.attrs["methods"][meth]["config"].get("layer")
            lines.append(f"  {meth}" + (f" @ {layer}" if layer else "") + f": targets {root[f'{meth}/targets'][i].tolist()}")
    return "\n".join(lines)


def explain_files(model: Model, params, source: Source, request: RunRequest, note=None) -> tuple[str, str | None]:
    """A run over a few files (``convlens explain``): each item's lines (`items_text`) and
    why it did not finish well (or None)."""
    r = Run(model, params, source, request, note=note)
    s = r.execute()
    text = items_text(store.open_store(r.out), list(request.methods), model.class_names)
    if request.out:
        text += f"\nwrote {request.out} ({s.done} images, methods: {', '.join(request.methods)})"
    if s.problems:
        return text, f"{request.out} failed its final check: {'; '.join(s.problems[:3])}"
    if s.failed:
        return text, (f"{s.failed} of {s.items} images could not be explained (first: {s.failures[0][0]}: "
                      f"{s.failures[0][1]})")
    return text, None
