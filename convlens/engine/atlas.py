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
import functools
import hashlib
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from convlens.engine import store
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


@functools.lru_cache(maxsize=64)
def _compiled(model: Model, objective: ascent.Objective, cfg: ascent.AscentConfig, loop: str):
    if loop == "fori":
        if jax.default_backend() != "cpu" and cfg.unroll == 0:
            cfg = dataclasses.replace(cfg, unroll=1)
        return jax.jit(lambda params, units, keys: ascent.visualize(model, params, objective, units, cfg, keys))
    start = jax.jit(lambda params, units, keys: ascent.start(model, params, objective, units, cfg, keys))
    step = jax.jit(lambda params, units, state, i: ascent.advance(model, params, objective, units, cfg, state, i))
    finish = jax.jit(lambda params, units, state, s0: ascent.finish(model, params, objective, units, cfg, state, s0))

    def run(params, units, keys):
        state, s0 = start(params, units, keys)
        for i in range(cfg.n_steps):  # dispatched asynchronously: nothing returns to the host
            state = step(params, units, state, jnp.int32(i))
        return finish(params, units, state, s0)
    return run


def ascend(model: Model, params, objective: ascent.Objective, units, cfg: ascent.AscentConfig, keys,
           loop: str = "auto") -> dict:
    """`ascent.visualize` run the fastest way on this backend (see `loop_mode`); the same
    images whichever loop runs it."""
    return _compiled(model, objective, cfg, loop_mode(cfg, loop))(params, units, keys)


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
              loop: str = "auto", command: str = "atlas") -> AtlasSummary:
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
        b = min(b, len(idx))
        nd = len(jax.local_devices())
        b = -(-b // nd) * nd
        plan[name] = (idx, b)
    attrs = {"recipe": cfg.recipe, "size": cfg.size, "steps": cfg.n_steps, "lr": cfg.step_size,
             "objective": "channel (mean activation)", "seed": seed, "layers": names, "filters": filters or "all"}
    fp = hashlib.sha256(store.dumps([model.name, model.source, model.weights_sha256, attrs,
                                     {k: [v[0].tolist(), v[1]] for k, v in plan.items()}]).encode()).hexdigest()
    out = str(out)
    if resume and store.exists(out):
        root = store.open_store(out, "r+")
        if root.attrs.get("fingerprint") != fp:
            raise ConvlensError(f"{out} holds a different atlas (model, recipe, layers, filters or batch differ); "
                                "use --overwrite or another --out")
        store.clean_partials(out)
    else:
        root = store.create(out, overwrite=overwrite, attrs={**store.model_attrs(model), "command": command,
                                                              "atlas": attrs, "fingerprint": fp})
        for name, (idx, b) in plan.items():
            f = len(idx)
            g = f"atlas/{name}"
            store.create_array(root, f"{g}/patterns", (f, cfg.size, cfg.size, 3), np.uint8,
                               ("filter", "y", "x", "rgb"), b)
            store.write(root, f"{g}/filters", idx.astype(np.int32), ("filter",), b)
            for k in ("scores", "start_scores"):
                store.create_array(root, f"{g}/{k}", (f,), np.float32, ("filter",), b)
            store.create_array(root, f"{g}/status", (f,), np.uint8, ("filter",), b)
    layer_index = {n: i for i, n in enumerate(conv)}
    todo = []
    skipped = 0
    for name, (idx, b) in plan.items():
        status = np.asarray(root[f"atlas/{name}/status"][:])
        for c in range(-(-len(idx) // b)):
            if (status[c * b:(c + 1) * b] == store.DONE).all():
                skipped += 1
            else:
                todo.append((name, c))
    bar = _bar(progress, sum(min(plan[n][1], len(plan[n][0]) - c * plan[n][1]) for n, c in todo))
    t0 = time.perf_counter()
    done_filters = 0
    pending = None

    def collect(p):
        nonlocal done_filters
        name, c, n, res = p
        res = jax.device_get(res)
        b = plan[name][1]
        sl = slice(c * b, c * b + n)
        g = root[f"atlas/{name}"]
        g["patterns"][sl] = np.asarray(res["patterns"])[:n]
        g["scores"][sl] = np.asarray(res["scores"])[:n]
        g["start_scores"][sl] = np.asarray(res["start_scores"])[:n]
        g["status"][sl] = store.DONE  # last: the chunk is complete
        done_filters += n
        bar.update(n)

    try:
        for name, c in todo:
            idx, b = plan[name]
            units = idx[c * b:(c + 1) * b]
            n = len(units)
            if n < b:  # pad to the compiled shape; padded rows are dropped
                units = np.concatenate([units, np.repeat(units[-1:], b - n)])
            keys = ascent.unit_keys(seed, layer_index[name], units)
            res = ascend(model, params, ascent.channel(name), jnp.asarray(units, jnp.int32), cfg, keys, loop)
            if pending is not None:
                collect(pending)
            pending = (name, c, n, res)
        if pending is not None:
            collect(pending)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    root.attrs["run"] = {"seconds": seconds, "filters": done_filters,
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.finish(out)
    return AtlasSummary(out, len(names), done_filters, len(todo), skipped, seconds)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(enabled, total):
    if not enabled or not total:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit="filter", desc="visualising", dynamic_ncols=True)
