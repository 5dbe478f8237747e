"""Filter atlases: a gradient-ascent pattern for every filter of every conv layer.

Store layout (in the schema of `convlens.engine.store`), per layer ``L`` with ``F``
filters visualised:

  ``atlas/L/patterns`` [F, S, S, 3] u1   (filter, y, x, rgb)   the optimised images
  ``atlas/L/filters``  [F] i4            (filter,)             which filter each row is
  ``atlas/L/scores``   [F] f4            the objective (mean activation) at the end
  ``atlas/L/start_scores`` [F] f4        ... and on the starting image
  ``atlas/L/status``   [F] u1            0 pending, 1 done (written last per chunk)

Root attribute ``atlas``: recipe, its resolved parameters, seed, layers and filter
selection. Work goes in chunks of ``batch`` filters (one compiled call each, one
image per filter), sized so the backward pass fits ``memory_mb``; a chunk's status is
written after its patterns, so ``--resume`` redoes exactly the unfinished chunks and a
finished layer is never recomputed. Filter ``f`` of the ``l``-th conv layer uses the key
``fold_in(fold_in(key(seed), l), f)``: the same image whatever the batch or the run.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from convlens.config import Config, option
from convlens.engine import schema, store
from convlens.engine.executor import Batch, Computation, Executor, Fn, Group, Loop, round_batch
from convlens.engine.progress import progress_bar
from convlens.errors import ConvlensError
from convlens.kernels import ascent
from convlens.models.network import Model


def parse_filters(spec: str | None, n: int) -> np.ndarray:
    """``None`` (all), ``"0:64"``, ``"5"``, ``"1,4,9"`` or ``"::8"`` -> filter indices < ``n``."""
    if spec is None or spec in ("", "all"):
        return np.arange(n)
    try:
        if ":" in spec:
            parts = [int(p) if p else None for p in spec.split(":")]
            idx = np.arange(n)[slice(*parts)]
        else:
            idx = np.asarray([int(p) for p in spec.split(",")])
    except ValueError:
        raise ConvlensError(f"--filters {spec!r}: give a slice like 0:64 or indices like 1,4,9") from None
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
        raise ConvlensError(f"--filters {spec!r} selects no valid filter (the layer has {n}: 0..{n - 1})")
    return idx


def backward_bytes(model: Model, layer: str, size: int) -> int:
    """Memory of one image's forward + backward pass up to ``layer``: every activation
    kept for the backward pass, and as much again for gradients."""
    shapes = model.output_shapes(1, (size, size))
    total = 0
    for node in model.graph.nodes:
        total += math.prod(shapes[node.name][1:])
        if node.name == layer:
            break
    return 4 * 2 * total


LOOPS = ("auto", "fori", "host")


@dataclasses.dataclass(frozen=True)
class AtlasOptions(Config):
    """How an atlas runs (none of it changes the images but filters and seed).

    Attributes:
      filters: which filters of each layer: a slice (0:64, ::4) or indices (1,4,9); default all.
      batch: filters optimised at once (0: from memory_mb, at most 64).
      memory_mb: memory per compiled call the automatic batch aims at.
      loop: compiled loop (fori) or host-dispatched steps (host); auto: the faster on this backend.
      seed: PRNG seed.
      progress: show a progress bar.
    """

    filters: str | None = None
    batch: int = option(0, min=0, max=4096)
    memory_mb: int = option(2048, min=1)
    loop: str = option("auto", choices=LOOPS)
    seed: int = option(0, min=0)
    progress: bool = True

    _owner = "atlas"


def loop_mode(cfg: ascent.AscentConfig, loop: str = "auto") -> str:
    """How to run the steps. Measured on XLA:CPU (benchmarks/ascent_throughput.py): a
    rolled ``fori_loop`` of VGG16 steps is 3.5x slower than the same steps unrolled or
    dispatched one by one; unrolling is a little faster than dispatching for the classic
    recipe's 40 steps but compiles too long for Lucid's hundreds. On accelerators a
    compiled loop is the usual winner."""
    if loop not in LOOPS:
        raise ConvlensError(f"unknown loop {loop!r}; choose {', '.join(LOOPS)}")
    if loop != "auto":
        return loop
    if jax.default_backend() != "cpu":
        return "fori"
    return "fori" if cfg.recipe == "classic" and cfg.n_steps <= 64 else "host"


def ascent_computation(model: Model, objective: ascent.Objective, cfg: ascent.AscentConfig,
                       loop: str = "auto") -> Computation:
    """Gradient ascent of ``objective`` for units ``inputs["units"] [B]`` (one image each),
    as the executor runs it: the whole ascent in one compiled program (``fori``), or a
    `Loop` of compiled steps dispatched from the host (``host``); the same images either
    way (see `loop_mode`)."""
    loop = loop_mode(cfg, loop)
    m, o = model, objective
    if loop == "fori":
        if jax.default_backend() != "cpu" and cfg.unroll == 0:
            cfg = dataclasses.replace(cfg, unroll=1)
        c = cfg
        return Fn(lambda p, i, k: ascent.visualize(m, p, o, i["units"], c, k), (m.computation, o, c, "fori"),
                  ("units",), "ascent:fori")
    c = cfg
    return Loop((m.computation, o, c, "host"), ("units",),
                start=lambda p, i, k: ascent.start(m, p, o, i["units"], c, k),
                step=lambda p, i, k, st, n: (ascent.advance(m, p, o, i["units"], c, st[0], n), st[1]),
                finish=lambda p, i, k, st: ascent.finish(m, p, o, i["units"], c, *st),
                steps=c.n_steps, label="ascent:host")


def ascend(model: Model, params, objective: ascent.Objective, units, cfg: ascent.AscentConfig, seed=0,
           salt: int | None = None, loop: str = "auto") -> dict:
    """`ascent.visualize` of units ``[N]`` run the fastest way on this backend (see
    `loop_mode`) through the executor: unit ``n`` draws from ``fold_in(fold_in(key(seed),
    salt), n)``; host arrays, the same images whichever loop runs it."""
    units = np.asarray(units, np.int32)
    with Executor(params, batch=len(units), key=seed, tune=False) as ex:
        return ex.run({"a": ascent_computation(model, objective, cfg, loop)},
                      Batch({"units": units}, units, salt))["a"]


@dataclasses.dataclass
class AtlasSummary:
    store: str
    layers: int
    filters: int
    computed_chunks: int
    skipped_chunks: int
    seconds: float

    @property
    def filters_per_second(self) -> float:
        return self.filters / max(self.seconds, 1e-9)


def run_atlas(model: Model, params, out, *, layers="conv", filters: str | None = None,
              cfg: ascent.AscentConfig = ascent.AscentConfig(), batch: int = 0, memory_mb: int = 2048,
              seed: int = 0, resume: bool = False, overwrite: bool = False, progress: bool = True,
              loop: str = "auto", command: str = "atlas", note=None, verify_full: bool = False) -> AtlasSummary:
    """Visualises the filters of ``layers`` (``"conv"``: every conv layer) into ``out``.

    Args:
      filters: which filters of each layer (``"0:64"``; default all).
      cfg: the recipe (`ascent.AscentConfig`).
      batch: filters per compiled call (0: as many as ``memory_mb`` allows, at most 64).
      seed: PRNG seed.
      resume / overwrite: what to do with an existing store.
      loop: ``auto`` (the faster on this backend), ``fori`` or ``host`` (see `loop_mode`).
    """
    if resume and overwrite:
        raise ConvlensError("give either --resume or --overwrite, not both")
    note = note or (lambda msg: None)
    conv = model.conv_layer_names
    names = list(conv) if layers in ("conv", "all", None) else list(model.resolve_layers(layers))
    for name in names:
        if name not in conv:
            raise ConvlensError(f"{name!r} is not a conv layer; conv layers: {', '.join(conv)}")
    shapes = model.output_shapes(1, (cfg.size, cfg.size))
    plan = {}
    for name in names:
        n = shapes[name][-1]
        idx = parse_filters(filters, n)
        b = batch or max(1, min(64, (memory_mb << 20) // backward_bytes(model, name, cfg.size)))
        plan[name] = (idx, round_batch(min(b, len(idx))))
    attrs = {"recipe": cfg.recipe, "size": cfg.size, "steps": cfg.n_steps, "lr": cfg.step_size,
             "objective": "channel (mean activation)", "seed": seed, "layers": names, "filters": filters or "all"}
    fp = store.fingerprint(model.name, model.source, model.weights_sha256, attrs,
                           {k: [v[0].tolist(), v[1]] for k, v in plan.items()})
    mode = "resume" if resume else ("overwrite" if overwrite else "new")
    with store.open_for_write(str(out), mode, fingerprint=fp, command=command, note=note, verify_full=verify_full,
                              attrs={**store.model_attrs(model), "command": command, "atlas": attrs},
                              differs="a different atlas (model, recipe, layers, filters or batch differ)") as w:
        if not w.resumed:
            for name, (idx, b) in plan.items():
                store.create_layout(w.root, "atlas", {"filter": len(idx), "y": cfg.size, "x": cfg.size, "rgb": 3},
                                    chunk=b, values={f"atlas/{name}/filters": idx.astype(np.int32)}, name=name)
        return _atlas(model, params, str(out), w.root, plan, cfg, conv, seed, progress, loop)


def _atlas(model, params, out, root, plan, cfg, conv, seed, progress, loop):
    layer_index = {n: i for i, n in enumerate(conv)}
    todo = []
    skipped = 0
    for name, (idx, b) in plan.items():
        status = np.asarray(root[f"atlas/{name}/status"][:])
        for c in range(-(-len(idx) // b)):
            if (status[c * b:(c + 1) * b] == schema.DONE).all():
                skipped += 1
            else:
                todo.append((name, c))
    bar = progress_bar(progress, sum(min(plan[n][1], len(plan[n][0]) - c * plan[n][1]) for n, c in todo),
                       unit="filter", desc="visualising")
    t0 = time.perf_counter()
    done_filters = 0
    comp = {name: {"pattern": ascent_computation(model, ascent.channel(name), cfg, loop)} for name in plan}

    def groups():
        # Each layer's filters draw from its own salt; each chunk compiles at its layer's batch.
        for name, c in todo:
            idx, b = plan[name]
            units = idx[c * b:(c + 1) * b]
            yield Group((name, c, len(units)), comp[name],
                        [Batch({"units": units.astype(np.int32)}, units, salt=layer_index[name], size=b)])

    def collect(name, c, n, res):
        nonlocal done_filters
        b = plan[name][1]
        sl = slice(c * b, c * b + n)
        g = f"atlas/{name}"
        store.writable(root, f"{g}/patterns")[sl] = res["patterns"]
        store.writable(root, f"{g}/scores")[sl] = res["scores"]
        store.writable(root, f"{g}/start_scores")[sl] = res["start_scores"]
        store.writable(root, f"{g}/status")[sl] = schema.DONE  # last: the chunk is complete
        done_filters += n
        bar.update(n)

    try:
        with Executor(params, batch=max([b for _, b in plan.values()] or [1]), key=seed) as ex:
            for (name, c, n), results in ex.stream(groups()):
                collect(name, c, n, results[0]["pattern"])
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    root.attrs["run"] = {"seconds": seconds, "filters": done_filters,
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.finish(out)
    return AtlasSummary(out, len(plan), done_filters, len(todo), skipped, seconds)



