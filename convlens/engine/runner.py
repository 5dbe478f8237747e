"""Runs explanation methods over a whole data set into a Zarr store.

The unit of work is a *chunk*: ``chunk`` consecutive items, one chunk of every array
along the sample axis. A process owns whole chunks (chunk ``c`` belongs to process
``c % P``), so several processes, and a resumed run, never write the same chunk file.

Per chunk: items are decoded in a thread pool (running ahead of the device), fitted
to the model's input size and cut into fixed-shape batches (the last padded, with a
mask), so each (method, config) compiles once. Batches are sharded over the local
devices along a ``data`` mesh axis. Chunk ``k+1`` is dispatched before chunk ``k``'s
results are pulled to the host (one ``device_get`` per chunk), and a writer thread
stores them, the ``status`` chunk last (see `store` for why that makes resuming safe).
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

from convlens.engine import sources as src_mod
from convlens.engine import store
from convlens.engine.sources import ItemError, Source
from convlens.errors import ConvlensError
from convlens.api import compiled, parse_target, resolve_config
from convlens.kernels.registry import METHODS, all_outputs
from convlens.models.labels import class_probabilities
from convlens.models.network import Model


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run goes (none of it changes the numbers but ``target``, ``seed`` and ``resize``).

    Attributes:
      target: ``top1``, ``topk:N``, class indices (``"281,285"`` or a list), or
        ``label`` (each item's ground-truth label).
      batch_size: images per compiled call (rounded up to a multiple of the local device count).
      chunk: items per store chunk (rounded up to a multiple of the batch); default max(16, batch).
      seed: PRNG seed; item ``i`` uses ``fold_in(key(seed), i)`` wherever it runs.
      resize: ``squash``, ``crop`` or ``pad``.
      keep_inputs: also store the resized images (audits' faithfulness metrics, overlays
        and the report need them; 150 kB per 224x224 item).
      topk: predictions stored per item.
      workers: decoding threads.
      progress: show a progress bar.
    """

    target: Any = "top1"
    batch_size: int = 8
    chunk: int | None = None
    seed: int = 0
    resize: str = "squash"
    keep_inputs: bool = True
    topk: int = 5
    workers: int = 4
    progress: bool = True


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

    @property
    def items_per_second(self) -> float:
        computed = self.computed_items or 1
        return computed / max(self.seconds, 1e-9)

    computed_items: int = 0


# ---------------------------------------------------------------- planning

def resolve_methods(model: Model, methods: dict[str, dict]) -> dict[str, Any]:
    """``{method: options}`` -> ``{method: resolved config}`` (one-line errors)."""
    if not methods:
        raise ConvlensError("no methods to run; give at least one (e.g. --methods gradcam)")
    out = {}
    for name, opts in methods.items():
        if name not in METHODS:
            raise ConvlensError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}")
        out[name] = resolve_config(model, METHODS[name], dict(opts))
    return out


def target_mode(target, source: Source, n_classes: int):
    """``("topk", k)``, ``("fixed", [T] indices)`` or ``("label", None)``."""
    if isinstance(target, str) and target.strip().lower() == "label":
        if source.class_names is None and not (source.labels >= 0).any() and not isinstance(
                source, src_mod.TfdsSource):
            raise ConvlensError("--target label needs labelled data (class folders, a labelled TFDS data set, "
                                "or labels in the .npz)")
        return ("label", None)
    t = parse_target(target, 1, n_classes)
    if isinstance(t, int):
        return ("topk", t)
    return ("fixed", t[0])


def fingerprint(model: Model, configs: dict, source: Source, opts: RunOptions, chunk: int) -> str:
    """What must match for a resumed run to produce the same store."""
    h = hashlib.sha256()
    for part in (model.name, model.source, model.weights_sha256, model.preprocess_spec.describe(),
                 store.dumps({k: v for k, v in configs.items()}), source.description, len(source),
                 hashlib.sha256("\n".join(source.ids).encode()).hexdigest(), str(opts.target), opts.seed,
                 opts.resize, opts.keep_inputs, opts.topk, chunk):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()


def item_keys(seed: int, indices: np.ndarray):
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


class _Timer(threading.Thread):
    """Waits for dispatched results in order and charges each its own compute time
    (results of one device queue finish in dispatch order)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.q: queue.Queue = queue.Queue()
        self.seconds: dict[str, float] = {}
        self.last = None

    def add(self, method, value):
        self.q.put((method, value, time.perf_counter()))

    def run(self):
        while True:
            got = self.q.get()
            if got is None:
                return
            method, value, t0 = got
            try:
                jax.block_until_ready(value)
            except Exception:  # noqa: BLE001 - the main thread reports device errors
                pass
            t1 = time.perf_counter()
            start = t0 if self.last is None else max(t0, self.last)
            self.seconds[method] = self.seconds.get(method, 0.0) + (t1 - start)
            self.last = t1

    def close(self):
        self.q.put(None)
        self.join()


class _Writer(threading.Thread):
    """Writes finished chunks in the background; errors surface in the main thread."""

    def __init__(self, depth: int = 2):
        super().__init__(daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None

    def put(self, fn: Callable[[], None]):
        if self.error:
            raise self.error
        self.q.put(fn)

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


# ---------------------------------------------------------------- the run

class Run:
    """A prepared run; `execute` does the work of one process.

    Args:
      model, params: from `convlens.load_model`.
      source: a `Source`.
      methods: ``{method: options}``.
      out: store path or URL.
      opts: `RunOptions`.
      resume, overwrite: what to do with an existing store.
      process: this process's share (`Process`).
      storage_options: fsspec options for URL stores.
      command: the command line, recorded in the store.
    """

    def __init__(self, model: Model, params, source: Source, methods: dict[str, dict], out, *,
                 opts: RunOptions = RunOptions(), resume: bool = False, overwrite: bool = False,
                 process: Process = Process(), storage_options=None, command: str = "run"):
        if resume and overwrite:
            raise ConvlensError("give either --resume or --overwrite, not both")
        if out is None:  # results wanted in memory only (e.g. `convlens explain` without --out)
            import zarr
            out = zarr.storage.MemoryStore()
        self.model, self.params, self.source = model, params, source
        self.out = out if not isinstance(out, (str, bytes)) and not hasattr(out, "__fspath__") else str(out)
        self.opts, self.process, self.storage_options = opts, process, storage_options
        self.resume, self.overwrite, self.command = resume, overwrite, command
        self.configs = resolve_methods(model, methods)
        self.n = len(source)
        if self.n == 0:
            raise ConvlensError(f"{source.description}: no items to explain")
        self.n_classes = model.output_shapes()[model.graph.output][-1]
        self.mode, self.fixed = target_mode(opts.target, source, self.n_classes)
        self.devices = jax.local_devices()
        nd = len(self.devices)
        if opts.batch_size < 1:
            raise ConvlensError("--batch-size must be at least 1")
        self.batch = -(-opts.batch_size // nd) * nd
        want = opts.chunk or max(store.SAMPLE_CHUNK, self.batch)
        self.chunk = -(-want // self.batch) * self.batch
        self.n_chunks = -(-self.n // self.chunk)
        self.size = model.input_size
        self.k = min(opts.topk, max(self.n_classes, 2) if self.n_classes == 1 else self.n_classes)
        self.fp = fingerprint(model, self.configs, source, opts, self.chunk)
        self.fns = {m: compiled(model, m, cfg, self.fixed_topk) for m, cfg in self.configs.items()}
        self.t_width = self.fixed_topk or (1 if self.mode == "label" else len(self.fixed))

    @property
    def fixed_topk(self) -> int | None:
        return self.fixed if self.mode == "topk" else None

    # ------------------------------------------------------------ set-up

    def output_specs(self) -> dict[str, dict[str, tuple[tuple[int, ...], np.dtype, tuple[str, ...]]]]:
        """Per method, per output: (shape of one item, dtype, dims), from ``eval_shape``."""
        b = self.batch
        x = jax.ShapeDtypeStruct((b, *self.size, self.model.channels), jnp.float32)
        t = None if self.mode == "topk" else jax.ShapeDtypeStruct((b, self.t_width), jnp.int32)
        keys = jax.eval_shape(lambda: item_keys(0, np.arange(b)))
        specs = {}
        for m, fn in self.fns.items():
            shapes = jax.eval_shape(fn, self.params, x, t, keys)
            dims = {o.name: o.dims for o in all_outputs(METHODS[m])}
            specs[m] = {k: (tuple(v.shape[1:]), np.dtype(v.dtype), dims[k]) for k, v in shapes.items()}
        return specs

    def attrs(self, specs) -> dict:
        return {**store.model_attrs(self.model), **self.source.store_attrs(), "command": self.command,
                "source": self.source.description,
                "resize": self.opts.resize, "target": str(self.opts.target), "seed": self.opts.seed,
                "class_names": list(self.source.class_names) if self.source.class_names else None,
                "model_class_names": model_class_names(self.model), "model_summary": model_summary(self.model),
                "chunk": self.chunk, "fingerprint": self.fp,
                "methods": {m: store.method_entry(self.configs[m], {k: v[2] for k, v in outs.items()})
                            for m, outs in specs.items()}}

    def create_store(self, specs):
        root = store.create(self.out, overwrite=self.overwrite, attrs=self.attrs(specs),
                            storage_options=self.storage_options)
        n, c = self.n, self.chunk
        store.write(root, "ids", np.asarray(self.source.ids, dtype=object).astype(str), ("sample",), c)
        store.create_array(root, "labels", (n,), np.int32, ("sample",), c)
        for name, (values, dims) in self.source.store_arrays().items():
            store.write(root, name, values, dims, c)
        store.create_array(root, "status", (n,), np.uint8, ("sample",), c)
        store.create_array(root, "errors", (n,), str, ("sample",), c)
        store.create_array(root, "predictions/topk_index", (n, self.k), np.int32, ("sample", "rank"), c)
        store.create_array(root, "predictions/topk_prob", (n, self.k), np.float32, ("sample", "rank"), c)
        if self.opts.keep_inputs:
            store.create_array(root, "inputs", (n, *self.size, 3), np.uint8, ("sample", "y", "x", "rgb"), c)
        if self.source.has_masks:
            store.create_array(root, "masks", (n, *self.size), bool, ("sample", "y", "x"), c)
        for m, outs in specs.items():
            for name, (shape, dtype, dims) in outs.items():
                store.create_array(root, f"{m}/{name}", (n, *shape), dtype, dims, c)
        store.create_array(root, "timing/method_seconds", (self.process.count, len(specs)), np.float64,
                           ("process", "method"), 1, fill=0.0)
        root["timing"].attrs["methods"] = list(specs)
        self.write_pipeline(root)
        return root

    def write_pipeline(self, root, k: int = 4):
        """A visual log of the input pipeline: the first readable items as read (shrunk to
        at most 256 pixels a side), as resized, and as the model sees them."""
        from PIL import Image
        raws, resized, ids = [], [], []
        for i in range(min(self.n, 16)):
            img, _, _, err = self.load(i)
            if err:
                continue
            raw = self.source.read(i).image
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
            store.write(g, f"raw/{j}", raw, ("y", "x", "rgb"))
        store.write(g, "resized", np.stack(resized), ("item", "y", "x", "rgb"))
        pre = np.asarray(self.model.preprocess(jnp.asarray(np.stack(resized), jnp.float32)))
        store.write(g, "preprocessed", pre.astype(np.float32), ("item", "y", "x", "channel"))
        root.attrs["pipeline"] = {"ids": ids, "preprocessing": self.model.preprocess_spec.describe(),
                                  "resize": self.opts.resize}

    def open_existing(self):
        root = store.open_store(self.out, "r+", self.storage_options)
        fp = root.attrs.get("fingerprint")
        if fp != self.fp:
            raise ConvlensError(
                f"{self.out} was written by a different run (model, weights, data, methods, options or "
                "chunking differ), so --resume cannot continue it; use --overwrite or another --out")
        if tuple(root["timing/method_seconds"].shape) != (self.process.count, len(self.configs)):
            raise ConvlensError(f"{self.out} was started with {root['timing/method_seconds'].shape[0]} processes; "
                                "resume it with the same --num-processes")
        store.clean_partials(self.out)
        return root

    def pending_chunks(self, root) -> list[int]:
        status = np.asarray(root["status"][:])
        mine = range(self.process.index, self.n_chunks, self.process.count)
        out = []
        for c in mine:
            s = status[c * self.chunk:(c + 1) * self.chunk]
            if (s == store.PENDING).any():
                out.append(c)
        return out

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
        except Exception as e:  # noqa: BLE001 - one bad item never stops a run
            return None, None, None, f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------ execution

    def execute(self, prepare: bool = True, finalize: bool = True) -> Summary:
        """Does this process's chunks. With one process ``prepare`` creates (or checks)
        the store first and ``finalize`` consolidates it; multi-process runs call
        `prepare_store` / `finalize_store` on process 0 around barriers instead."""
        specs = self.output_specs()
        if prepare:
            self.prepare_store(specs)
        root = store.open_store(self.out, "r+", self.storage_options)
        todo = self.pending_chunks(root)
        mine = len(range(self.process.index, self.n_chunks, self.process.count))
        t0 = time.perf_counter()
        timer = _Timer()
        timer.start()
        failures: list[tuple[str, str]] = []
        computed = self._loop(root, todo, specs, timer, failures)
        timer.close()
        seconds = time.perf_counter() - t0
        root["timing/method_seconds"][self.process.index] = np.asarray(
            [timer.seconds.get(m, 0.0) + float(root["timing/method_seconds"][self.process.index, j])
             for j, m in enumerate(self.configs)], np.float64)
        summary = Summary(self.out, self.n, 0, 0, mine - len(todo), len(todo), seconds, dict(timer.seconds),
                          failures, computed)
        if finalize:
            self.finalize_store(summary)
        return summary

    def prepare_store(self, specs=None):
        specs = specs or self.output_specs()
        if self.resume and store.exists(self.out, self.storage_options):
            self.open_existing()
        else:
            self.create_store(specs)

    def _loop(self, root, todo: list[int], specs, timer: _Timer, failures) -> int:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.asarray(self.devices), ("data",))
        data_sharding = NamedSharding(mesh, PartitionSpec("data"))
        params = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))
        pool = cf.ThreadPoolExecutor(max(1, self.opts.workers), thread_name_prefix="convlens-decode")
        writer = _Writer()
        writer.start()
        bar = _progress(self.opts.progress and self.process.index == 0, len(todo) * self.chunk, self.n,
                        self.chunk * (self.n_chunks - len(todo)))
        lookahead = 2
        futures: dict[int, list[cf.Future]] = {}

        def submit(ci):
            lo, hi = ci * self.chunk, min(self.n, (ci + 1) * self.chunk)
            futures[ci] = [pool.submit(self.load, i) for i in range(lo, hi)]

        for ci in todo[:lookahead]:
            submit(ci)
        pending = None
        computed = 0
        try:
            for pos, ci in enumerate(todo):
                if pos + lookahead < len(todo):
                    submit(todo[pos + lookahead])
                loaded = [f.result() for f in futures.pop(ci)]
                dispatched = self._dispatch(ci, loaded, params, data_sharding, timer)
                if pending is not None:
                    computed += self._collect(root, pending, writer, failures, bar)
                pending = dispatched
            if pending is not None:
                computed += self._collect(root, pending, writer, failures, bar)
        finally:
            for fs in futures.values():
                for f in fs:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            try:
                writer.close()
            finally:
                bar.close()
                self.source.close()
        return computed

    def _dispatch(self, ci, loaded, params, sharding, timer):
        lo = ci * self.chunk
        n = len(loaded)
        ok = np.array([err == "" for _, _, _, err in loaded])
        blank = np.zeros((*self.size, 3), np.uint8)
        images = np.stack([img if img is not None else blank for img, _, _, _ in loaded])
        labels = np.asarray([self.source.labels[lo + j] if lab is None else lab
                             for j, (_, _, lab, _) in enumerate(loaded)], np.int32)
        if self.mode == "label":
            bad = ok & ((labels < 0) | (labels >= self.n_classes))
            for j in np.flatnonzero(bad):
                loaded[j] = (None, None, None, f"label {labels[j]} cannot be a target: the model has "
                                               f"{self.n_classes} classes")
            ok &= ~bad
        outs: dict[str, list] = {m: [] for m in self.fns}
        for b0 in range(0, n, self.batch):
            part = images[b0:b0 + self.batch]
            m = len(part)
            idx = np.arange(lo + b0, lo + b0 + self.batch)
            if m < self.batch:  # pad to the compiled shape; padded rows are dropped on the host
                part = np.concatenate([part, np.repeat(part[-1:], self.batch - m, axis=0)])
            x = jax.device_put(part.astype(np.float32), sharding)
            if self.mode == "fixed":
                t = jnp.asarray(np.broadcast_to(self.fixed, (self.batch, len(self.fixed))))
            elif self.mode == "label":
                lb = np.concatenate([labels[b0:b0 + m], np.zeros(self.batch - m, np.int32)])
                t = jnp.asarray(np.clip(lb, 0, self.n_classes - 1)[:, None])
            else:
                t = None
            keys = item_keys(self.opts.seed, idx)
            for meth, fn in self.fns.items():
                r = fn(params, x, t, keys)
                timer.add(meth, r)
                outs[meth].append((r, m))
        return ci, loaded, images, labels, ok, outs

    def _collect(self, root, dispatched, writer, failures, bar) -> int:
        ci, loaded, images, labels, ok, outs = dispatched
        host = jax.device_get({m: [r for r, _ in v] for m, v in outs.items()})
        results = {}
        for meth, parts in host.items():
            counts = [m for _, m in outs[meth]]
            results[meth] = {k: np.concatenate([np.asarray(p[k])[:c] for p, c in zip(parts, counts)])
                             for k in parts[0]}
        lo = ci * self.chunk
        hi = lo + len(loaded)
        errors = np.asarray([err for _, _, _, err in loaded], dtype=object).astype(str)
        status = np.where(ok, store.DONE, store.FAILED).astype(np.uint8)
        first = next(iter(results.values()))
        probs = class_probabilities(first["logits"], self.model.output_activation)
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :self.k].astype(np.int32)
        top_p = np.take_along_axis(probs, order, 1).astype(np.float32)
        order[~ok] = -1
        top_p[~ok] = np.nan
        for meth in results:
            for k, v in results[meth].items():
                v = np.array(v)
                v[~ok] = store.fill_value(v.dtype)
                results[meth][k] = v
        masks = None
        if self.source.has_masks:
            masks = np.stack([np.zeros(self.size, bool) if mk is None else mk for _, mk, _, _ in loaded])
        for j in np.flatnonzero(~ok):
            failures.append((self.source.ids[lo + j], str(errors[j])))
        keep = self.opts.keep_inputs

        def write():
            for meth, vals in results.items():
                for k, v in vals.items():
                    root[f"{meth}/{k}"][lo:hi] = v
            root["predictions/topk_index"][lo:hi] = order
            root["predictions/topk_prob"][lo:hi] = top_p
            root["labels"][lo:hi] = labels
            root["errors"][lo:hi] = errors
            if keep:
                root["inputs"][lo:hi] = np.where(ok[:, None, None, None], images, 0).astype(np.uint8)
            if masks is not None:
                root["masks"][lo:hi] = masks
            root["status"][lo:hi] = status  # last: marks the chunk complete
            bar.update(hi - lo)
        writer.put(write)
        return hi - lo

    def finalize_store(self, summary: Summary | None = None, processes: int = 1):
        root = store.open_store(self.out, "r+", self.storage_options)
        status = np.asarray(root["status"][:])
        secs = np.asarray(root["timing/method_seconds"][:]).sum(axis=0)
        done, failed = int((status == store.DONE).sum()), int((status == store.FAILED).sum())
        items = max(done + failed, 1)
        run = {"items": self.n, "done": done, "failed": failed, "pending": int((status == store.PENDING).sum()),
               "processes": self.process.count,
               "method_seconds_per_item": {m: float(s) / items for m, s in zip(self.configs, secs)},
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if summary is not None:
            run["seconds"] = summary.seconds
            run["items_per_second"] = summary.items_per_second
            summary.done, summary.failed = done, failed
        root.attrs["run"] = run
        store.finish(self.out, self.storage_options)
        return run


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int, n: int, already: int):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc="explaining", dynamic_ncols=True, smoothing=0.1,
                postfix={"resumed": already} if already else None)


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
      resume: continue an interrupted run into ``out``; overwrite: replace ``out``.
      **options: `RunOptions` fields (``target``, ``batch_size``, ``seed`` ...).

    Returns:
      A `Summary`; the store holds the results (schema in `convlens.engine.store`).
    """
    if not isinstance(source, Source):
        source = src_mod.open_source(source, data_dir=data_dir)
    if not isinstance(methods, dict):
        methods = {m: {} for m in methods}
    opts = RunOptions(**options)
    r = Run(model, params, source, methods, out, opts=opts, resume=resume, overwrite=overwrite,
            storage_options=storage_options, command=command)
    return r.execute()
