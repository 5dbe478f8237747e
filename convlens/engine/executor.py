"""The one place convlens compiles, keys, pads, shards, dispatches and fetches.

Every driver — `convlens.explain`, data-set runs (`runner`), the training recorder,
``live``, the atlas and the audit's re-runs — hands its work to an `Executor` as
*computations* (hashable values naming a pure function of ``(params, inputs, keys)``)
and *batches* (host arrays with a leading item axis, plus each item's global index).
None of them compiles, pads or makes keys itself.

* **Compiled once, keyed by values.** `function` returns a callable that compiles its
  computation on first use for each set of argument shapes; the cache key is the
  computation's value (for a model: its graph, preprocessing and input size — never
  the params, which are arguments, never constants) and the arguments' shapes, dtypes and
  shardings. Equal values share one executable; a changed value compiles anew.
* **XLA options per computation.** On XLA:CPU the best setting of YNNPACK's library
  fusions differs by model, method and batch shape (VGG16's gradients gain from
  YNNPACK's individual dots, small convnets lose). The executor tries the candidates of
  `CPU_CANDIDATES` the first time a computation runs on a machine, keeps the fastest, and
  remembers the choice on disk (`tuning_cache`), so later runs compile once with it.
  Nothing is set process-wide (``XLA_FLAGS`` is left to the user; a user setting of
  the same flag wins).
* **Keys.** Item ``i`` draws from ``fold_in(key, i)`` (``key`` a seed or a JAX key,
  optionally salted, e.g. by an atlas layer): the same noise whatever the batch,
  chunk, device or process.
* **Fixed shapes.** A batch shorter than the compiled one is padded by repeating its
  last row and the padding is dropped on fetching, so nothing recompiles.
* **Devices.** Batches are sharded over the local devices along a ``data`` axis
  (params replicated).
* **Pipelining.** `stream` dispatches group ``n+1`` before fetching group ``n`` (one
  ``device_get`` per group), so the host's decoding and writing overlap the device.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convlens.errors import ConvlensError

# ---------------------------------------------------------------- computations


class Computation:
    """A pure function ``fn(params, inputs: {name: [B, ...]}, keys [B]) -> {name: [B, ...]}``
    known by value: equal computations share compiled code.

    Subclasses define `key` (a hashable value: everything the function depends on but
    its arguments), `inputs` (the batch inputs it reads) and `__call__`. A computation
    that runs as several compiled steps from the host is a `Loop`.
    """

    inputs: tuple[str, ...] = ()
    label: str = ""
    # Outputs are per item (``[B, ...]``: padding rows dropped on fetching), unless
    # ``whole`` (a result for the batch as a whole, e.g. trained params): fetched as is.
    whole: bool = False

    def key(self) -> tuple:
        raise NotImplementedError

    def __call__(self, params, inputs: Mapping[str, jax.Array], keys) -> dict[str, jax.Array]:
        raise NotImplementedError

    def check(self, batch: int) -> None:
        """Raises a one-line error if the computation cannot run at this batch size (before
        anything is compiled)."""

    def share_key(self):
        """Computations with the same (non-``None``) share key are run as one `Shared`
        computation when dispatched together."""
        return None

    def __eq__(self, other):
        return type(self) is type(other) and self.key() == other.key()

    def __hash__(self):
        return hash((type(self).__name__, self.key()))

    def __repr__(self):
        return f"{type(self).__name__}({self.label or ''})"


class Explain(Computation):
    """A registered method on pixels: ``inputs`` ``images`` ``[B, H, W, C]`` float32 and,
    unless the top classes are chosen inside (``top_k``), ``targets`` ``[B, T]`` int32."""

    def __init__(self, model, method: str, cfg, top_k: int | None):
        from convlens.kernels.registry import METHODS
        self.model, self.method, self.cfg, self.top_k = model, method, cfg, top_k
        self.spec = METHODS[method]
        self.inputs = ("images",) if top_k is not None else ("images", "targets")
        self.label = method

    def key(self):
        return (self.model.computation, self.method, self.cfg, self.top_k)

    def check(self, batch: int) -> None:
        check_memory(self.model, batch)

    def __call__(self, params, inputs, keys):
        t = self.top_k if self.top_k is not None else inputs["targets"]
        return self.spec.explain(self.model, params, inputs["images"], t, self.cfg, keys)

    def share_key(self):
        s = self.spec.shared
        return None if s is None else (s.name, s.run, self.model.computation, self.cfg, self.top_k)


class Shared(Computation):
    """Methods computed from one shared pass (`convlens.kernels.spec.SharedPass`): the
    pass runs once per batch and each method finishes from it; outputs per method
    ``{name: {output: ...}}``, each exactly what the method alone returns."""

    def __init__(self, members: tuple[tuple[str, Explain], ...]):
        self.members = members
        first = members[0][1]
        self.inputs = first.inputs
        self.label = "+".join(n for n, _ in members)

    def key(self):
        return tuple((n, c.key()) for n, c in self.members)

    def check(self, batch: int) -> None:
        self.members[0][1].check(batch)

    def __call__(self, params, inputs, keys):
        first = self.members[0][1]
        t = first.top_k if first.top_k is not None else inputs["targets"]
        state = first.spec.shared.run(first.model, params, inputs["images"], t, first.cfg)
        return {n: c.spec.shared.finish(c.model, inputs["images"], c.cfg, state) for n, c in self.members}


class Forward(Computation):
    """The model's logits of pixels ``images`` ``[B, H, W, C]``."""

    inputs = ("images",)

    def __init__(self, model):
        self.model = model
        self.label = "forward"

    def key(self):
        return (self.model.computation,)

    def __call__(self, params, inputs, keys):
        from convlens.kernels.common import forward_logits
        return {"logits": forward_logits(self.model, params, inputs["images"])}


class Fn(Computation):
    """Any pure function ``fn(params, inputs, keys)``, keyed by ``key`` (which must
    capture everything ``fn`` closes over, e.g. ``(model.computation, cfg)``). ``xla``
    is a `Tuning` to compile it with (its XLA options and lowering), e.g. the one measured
    for the model's forward pass, for programs too long to measure themselves."""

    def __init__(self, fn: Callable, key: tuple, inputs: tuple[str, ...], label: str = "", xla: Tuning | None = None,
                 whole: bool = False):
        self.fn, self._key, self.inputs, self.label, self.xla, self.whole = fn, key, inputs, label, xla, whole

    def key(self):
        return self._key

    def __call__(self, params, inputs, keys):
        return self.fn(params, inputs, keys)


class Loop(Computation):
    """A loop with explicit state, dispatched step by step from the host: ``start(params,
    inputs, keys) -> state``, then ``step(params, inputs, keys, state, i) -> state`` for
    ``i = 0 .. steps - 1``, then ``finish(params, inputs, keys, state) -> outputs``. The
    executor compiles the three pieces once each and dispatches them asynchronously (the
    state never leaves the device); calling the loop itself runs the same steps in one
    program (``lax.fori_loop``), with the same numbers.

    Why a host loop at all: XLA:CPU runs a rolled loop of convolution gradients several
    times slower than the same steps dispatched one by one (benchmarks/ascent_throughput.py),
    and compiling hundreds of unrolled steps takes longer than running them.
    """

    def __init__(self, key: tuple, inputs: tuple[str, ...], start: Callable, step: Callable, finish: Callable,
                 steps: int, label: str = "", whole: bool = False):
        self._key, self.inputs, self.label = key, inputs, label or "loop"
        self.start, self.step, self.finish, self.steps = start, step, finish, int(steps)
        self.whole = whole

    def key(self):
        return self._key

    def __call__(self, params, inputs, keys):
        state = self.start(params, inputs, keys)
        state = jax.lax.fori_loop(0, self.steps, lambda i, st: self.step(params, inputs, keys, st, i), state)
        return self.finish(params, inputs, keys, state)

    def part(self, name: str) -> Computation:
        """One piece of the loop as a computation of its own (compiled once by value)."""
        return _LoopPart(self, name)


class _LoopPart(Computation):
    def __init__(self, loop: Loop, name: str):
        self.loop, self.name = loop, name
        self.inputs, self.label = loop.inputs, f"{loop.label}:{name}"
        self.whole = loop.whole

    def key(self):
        return (self.loop.key(), self.name)

    def __call__(self, params, inputs, keys, *state):
        return getattr(self.loop, self.name)(params, inputs, keys, *state)


def available_memory() -> int | None:
    """Bytes of memory available to this process (Linux's MemAvailable), or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


MAX_ITEM_ELEMENTS = 1 << 31  # one layer's output for one image: no real convnet comes near


def check_memory(model, batch: int) -> None:
    """Refuses, before anything is compiled, a model whose layer outputs at this batch
    size cannot fit in memory (a model file declaring absurd sizes, or too big a batch)."""
    shapes = model.output_shapes(1)
    name, biggest = max(shapes.items(), key=lambda kv: math.prod(kv[1]))
    if math.prod(biggest) > MAX_ITEM_ELEMENTS:
        raise ConvlensError(f"model {model.name!r}: layer {name!r} would output {list(biggest[1:])} values per "
                            "image, which no real convnet does; the model file declares absurd sizes")
    need = model.activation_bytes(batch)
    avail = available_memory()
    if avail is not None and need > avail:
        raise ConvlensError(f"model {model.name!r} needs about {need / 2**30:.1f} GiB for the layer outputs of a "
                            f"batch of {batch} (its largest, {name!r}, is {list(biggest[1:])} per image); "
                            f"{avail / 2**30:.1f} GiB are available: lower the batch size")


# ---------------------------------------------------------------- XLA options

YNN = "xla_cpu_experimental_ynn_fusion_type"
# The XLA:CPU settings tried per computation: XLA's own default (YNNPACK's library
# fusions for dots, elementwise ops and reductions), YNNPACK for individual dots only,
# and no YNNPACK at all.
CPU_CANDIDATES: dict[str, dict[str, str]] = {
    "default": {},
    "ynn-dot": {YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "ynn-off": {YNN: ""},
}
TUNE_MIN_SECONDS = 0.004  # below this per call, the settings cannot matter in absolute terms
TUNE_MAX_SECONDS = 20.0  # above it, measuring every candidate costs more than it can save
TUNE_MARGIN = 0.05  # another setting must be this much faster to replace XLA's default


def xla_mode() -> str:
    """``CONVLENS_XLA``: ``auto`` (tune per computation, the default), ``default`` (XLA's
    own settings), or a name in `CPU_CANDIDATES`."""
    mode = os.environ.get("CONVLENS_XLA", "auto").strip().lower() or "auto"
    if mode != "auto" and mode not in CPU_CANDIDATES:
        raise ConvlensError(f"CONVLENS_XLA={mode!r}: choose auto or {', '.join(CPU_CANDIDATES)}")
    if YNN.replace("xla_cpu_experimental_", "") in os.environ.get("XLA_FLAGS", ""):
        return "default"  # the user set the flag process-wide: theirs wins
    return mode


def lowering_mode() -> str:
    """``CONVLENS_LOWERING``: ``auto`` (measured per computation with the XLA options, the
    default) or a name in `convlens.models.layers.LOWERINGS` (how convolutions are
    computed)."""
    from convlens.models.layers import LOWERINGS
    mode = os.environ.get("CONVLENS_LOWERING", "auto").strip().lower() or "auto"
    if mode != "auto" and mode not in LOWERINGS:
        raise ConvlensError(f"CONVLENS_LOWERING={mode!r}: choose auto or {', '.join(LOWERINGS)}")
    return mode


def tuning_cache() -> Path:
    """Where tuned choices are remembered: ``$CONVLENS_CACHE/xla-options.json``
    (default ``~/.cache/convlens``)."""
    from convlens.config import cache_root
    return cache_root() / "xla-options.json"


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    cpu += line.strip()
    except OSError:
        pass
    import jaxlib
    return f"{jax.__version__}/{jaxlib.__version__}/{jax.default_backend()}/{jax.local_device_count()}/{cpu}"


_tune_lock = threading.Lock()


_warned_cache: set = set()


def _read_choices() -> dict:
    path = tuning_cache()
    try:
        choices = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        choices = e
    if not isinstance(choices, dict):  # unreadable, or JSON that is not an object: measured again, rewritten
        if str(path) not in _warned_cache:
            _warned_cache.add(str(path))
            import warnings
            warnings.warn(f"ignoring the XLA tuning cache {path}: it is not what convlens writes (it is rewritten "
                          "when a choice is next measured)", RuntimeWarning, stacklevel=3)
        return {}
    return {k: v for k, v in choices.items() if isinstance(v, dict)}


def _remember(fingerprint: str, entry: dict) -> None:
    with _tune_lock:
        choices = _read_choices()
        choices[fingerprint] = entry
        path = tuning_cache()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(choices, indent=0, sort_keys=True))
            os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        except OSError:
            pass  # a read-only home: tune again next time, never fail for it


def _time_call(compiled, args, reps: int = 1) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best


TUNE_ROUNDS = 3  # at least: candidates are timed in turns, so drift hits them alike
TUNE_BUDGET = 1.0  # seconds of timing per candidate for short computations (more rounds)


@dataclasses.dataclass
class Tuning:
    """How one executable's XLA options and lowering were chosen (for benchmarks and tests).
    ``seconds`` is keyed ``"xla/lowering"`` (e.g. ``"ynn-off/shifted"``)."""

    choice: str
    seconds: dict[str, float]
    source: str  # "measured", "remembered", "fixed", "given" or "not worth measuring"
    lowering: str = "shifted"


def _race(compiled: dict, args, seconds: dict, t_first: float) -> str:
    """Times every candidate of ``compiled`` in turns (so drift hits them alike), updating
    ``seconds`` with each one's best; returns the fastest, the first candidate unless
    another beats it by `TUNE_MARGIN`."""
    rounds = max(TUNE_ROUNDS, min(50, int(TUNE_BUDGET / max(t_first, 1e-6))))
    for _ in range(rounds):
        for name, c in compiled.items():
            seconds[name] = min(seconds.get(name, float("inf")), _time_call(c, args))
    first = next(iter(compiled))
    best = min(compiled, key=lambda n: seconds[n])
    return best if seconds[best] <= (1 - TUNE_MARGIN) * seconds[first] else first


def _choose(jits: Callable[[str, str], Any], args, label: str, tune: bool) -> tuple[Any, Tuning]:
    """The jitted function with the XLA options and lowering to use here, ``jits(name,
    lowering)`` giving the function traced with ``lowering`` and compiled with candidate
    ``name``: a choice remembered for this program on this machine, else (``tune``: the
    work will repeat) the fastest measured now, else XLA's default options and the
    default lowering. Measured in two stages: the lowerings with XLA's default options
    (each distinct traced program once: without grouped convolutions ``shifted`` traces
    what ``native`` does, and without a gradient ``im2col`` what ``shifted`` does), then
    the XLA options with the fastest lowering."""
    from convlens.models.layers import DEFAULT_LOWERING, LOWERINGS
    mode, low_mode = xla_mode(), lowering_mode()
    low = DEFAULT_LOWERING if low_mode == "auto" else low_mode
    if jax.default_backend() != "cpu":
        return jits("default", low), Tuning("default", {}, "fixed", low)
    if mode != "auto" and low_mode != "auto":
        return jits(mode, low), Tuning(mode, {}, "fixed", low)
    xla0 = "default" if mode == "auto" else mode
    first = jits(xla0, low)
    text = first.lower(*args).as_text()  # the program; the XLA options do not change it
    fingerprint = hashlib.sha256((_machine() + "\n" + text).encode()).hexdigest()
    known = _read_choices().get(fingerprint)
    if known and known.get("choice") in CPU_CANDIDATES and known.get("lowering", low) in LOWERINGS:
        xla = known["choice"] if mode == "auto" else mode
        lo = known.get("lowering", low) if low_mode == "auto" else low_mode
        return jits(xla, lo), Tuning(xla, known.get("seconds", {}), "remembered", lo)
    if not tune:
        return first, Tuning(xla0, {}, "not measured (one-off work)", low)
    jax.block_until_ready(first(*args))  # the warm-up every computation needs anyway
    t_first = _time_call(first, args)
    seconds = {f"{xla0}/{low}": t_first}
    if not TUNE_MIN_SECONDS <= t_first <= TUNE_MAX_SECONDS:
        _remember(fingerprint, {"choice": xla0, "lowering": low, "seconds": seconds, "label": label})
        return first, Tuning(xla0, seconds, "not worth measuring", low)
    compiled = {f"{xla0}/{low}": first}
    if low_mode == "auto":  # stage 1: the lowerings, where they differ
        texts = {text}
        for other in LOWERINGS:
            if other == low or (other_text := jits(xla0, other).lower(*args).as_text()) in texts:
                continue
            texts.add(other_text)
            compiled[f"{xla0}/{other}"] = c = jits(xla0, other)
            jax.block_until_ready(c(*args))  # compiles, and warms up
        if len(compiled) > 1:
            low = _race(compiled, args, seconds, t_first).split("/")[1]
    if mode == "auto":  # stage 2: the XLA options, with that lowering
        compiled = {f"default/{low}": compiled.get(f"default/{low}") or jits("default", low)}
        for name in CPU_CANDIDATES:
            if name != "default":
                compiled[f"{name}/{low}"] = c = jits(name, low)
                jax.block_until_ready(c(*args))
        xla0 = _race(compiled, args, seconds, t_first).split("/")[0]
    _remember(fingerprint, {"choice": xla0, "lowering": low, "seconds": seconds, "label": label})
    return jits(xla0, low), Tuning(xla0, seconds, "measured", low)


def compile_with(lowered, name: str):
    """``lowered`` compiled with candidate ``name``'s XLA options (ahead of time)."""
    opts = CPU_CANDIDATES[name]
    return lowered.compile(compiler_options=opts) if opts else lowered.compile()


# ---------------------------------------------------------------- compiled functions

_COMPILED: dict[tuple, tuple[Any, Tuning]] = {}
_JITS: dict[tuple, Any] = {}
_COMPILED_LOCK = threading.Lock()
_CACHE_LIMIT = 256


def _map_count() -> tuple[int, int] | None:
    """``(memory regions of this process, the system's cap)`` on Linux, else None."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            cap = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), cap
    except (OSError, ValueError):
        return None


def _guard_regions(share: float = 0.6) -> bool:
    """Before a compile: if this process uses more than ``share`` of its memory-region cap,
    drop the compiled programs (`clear_cache`) so the compile cannot cross it. True if
    it did."""
    counts = _map_count()
    if counts is None or counts[0] < share * counts[1]:
        return False
    clear_cache()
    return True


def _signature(args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return (tree, tuple((np.shape(x), getattr(x, "dtype", type(x)),
                         None if isinstance(x, np.ndarray) else getattr(x, "sharding", None)) for x in leaves))


class _Traced:
    """``comp`` traced with grouped convolutions in ``lowering`` (a trace-time choice, so
    each lowering has its own jitted function)."""

    def __init__(self, comp, lowering: str):
        self.comp, self.lowering = comp, lowering

    def __call__(self, *args):
        from convlens.models.layers import lowering
        with lowering(self.lowering):
            return self.comp(*args)


class Function:
    """A computation compiled on first use for each argument signature (see `function`).
    ``tune``: measure the XLA settings if this machine has no remembered choice (for work
    that repeats: runs, live, atlases); one-off calls use XLA's default instead."""

    def __init__(self, comp: Computation, tune: bool = True):
        self.comp, self.tune = comp, tune

    def jitted(self, name: str = "default", lowering: str | None = None):
        """``comp`` traced with grouped convolutions in ``lowering`` (None: the current
        default) and jitted with candidate ``name``'s XLA options (one per computation value,
        candidate and lowering; calls take JAX's fast dispatch path)."""
        key = (self.comp, "jit", name, lowering)
        fn = _JITS.get(key)
        if fn is None:
            fn = jax.jit(self.comp if lowering is None else _Traced(self.comp, lowering),
                         compiler_options=CPU_CANDIDATES[name] or None)
            with _COMPILED_LOCK:
                if len(_JITS) >= 3 * _CACHE_LIMIT:
                    _JITS.pop(next(iter(_JITS)))
                _JITS[key] = fn
        return fn

    def lowered(self, *args):
        return self.jitted().lower(*args)

    def compiled(self, *args):
        key = (self.comp, _signature(args))
        hit = _COMPILED.get(key)
        if hit is None:
            _guard_regions()  # before the compile, which adds hundreds of regions
            fixed = getattr(self.comp, "xla", None)  # a Tuning measured for another program
            if isinstance(fixed, Tuning) and jax.default_backend() == "cpu":
                xla = fixed.choice if xla_mode() == "auto" else xla_mode()
                lo = fixed.lowering if lowering_mode() == "auto" else lowering_mode()
                hit = (self.jitted(xla, lo), Tuning(xla, {}, "given", lo))
            else:
                hit = _choose(self.jitted, args, self.comp.label or type(self.comp).__name__, self.tune)
            with _COMPILED_LOCK:
                if len(_COMPILED) >= _CACHE_LIMIT:
                    _COMPILED.pop(next(iter(_COMPILED)))
                _COMPILED[key] = hit
        return hit

    def tuning(self, *args) -> Tuning:
        return self.compiled(*args)[1]

    def __call__(self, *args):
        return self.compiled(*args)[0](*args)


def function(comp: Computation, tune: bool = True) -> Function:
    """``comp`` as a callable compiled once per argument signature (cached by value)."""
    return Function(comp, tune)


def clear_cache() -> None:
    """Drops every compiled program, convlens's and JAX's caches; they recompile on next
    use. XLA:CPU maps each executable's code into hundreds of memory regions (an
    EfficientNet-B0 gradient: about 550), and Linux caps a process's regions
    (``vm.max_map_count``, 65530 by default): past it, the next compile crashes the
    process with a segmentation fault, not an error. Compiles through the executor
    call this themselves when near the cap (`_guard_regions`)."""
    import gc
    with _COMPILED_LOCK:
        _COMPILED.clear()
        _JITS.clear()
    jax.clear_caches()
    gc.collect()


def cache_size() -> int:
    return len(_COMPILED)


def signatures(comp: Computation) -> int:
    """How many executables of ``comp`` are cached (one per argument signature)."""
    return sum(1 for key in list(_COMPILED) if key[0] == comp)


# ---------------------------------------------------------------- keys and padding

@jax.jit
def _fold_each(base, indices):
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def item_keys(key, indices, salt: int | None = None):
    """Per-item PRNG keys ``fold_in(base, i)`` for item indices ``indices [n]``; ``key``
    is an int seed or a JAX key, ``salt`` (e.g. an atlas layer) is folded in first.
    (Compiled once per batch size: made op by op, the keys cost half a millisecond a
    batch, a quarter of a small convnet's forward pass.)"""
    base = jax.random.key(int(key)) if isinstance(key, (int, np.integer)) else key
    if salt is not None:
        base = jax.random.fold_in(base, int(salt))
    return _fold_each(base, jnp.asarray(np.asarray(indices), jnp.int32))


def abstract_keys(batch: int):
    """The shape and dtype of a batch's keys, for ``jax.eval_shape`` of a computation."""
    return jax.eval_shape(lambda: item_keys(0, np.arange(batch)))


def round_batch(n: int, devices: int | None = None) -> int:
    """``n`` items per compiled call rounded up to a multiple of the device count (each
    device takes an equal share)."""
    nd = devices or jax.local_device_count()
    return -(-max(int(n), 1) // nd) * nd


def pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    """``a [m, ...]`` padded to ``[n, ...]`` by repeating its last row (``m <= n``)."""
    m = len(a)
    if m == n:
        return a
    if m == 0:
        raise ValueError("cannot pad an empty batch")
    return np.concatenate([a, np.repeat(a[-1:], n - m, axis=0)])


@dataclasses.dataclass
class Batch:
    """Host arrays of ``n`` items (``inputs``, each ``[n, ...]``) and their global indices.

    Attributes:
      salt: folded into the key before the item index (an atlas's layer), so items of
        different groups with the same index draw differently.
      size: the compiled batch size to pad to (default: the executor's); work of several
        shapes (an atlas's layers) goes through one executor.
    """

    inputs: dict[str, np.ndarray]
    indices: np.ndarray
    salt: int | None = None
    size: int | None = None

    def __len__(self):
        return len(self.indices)


def split(inputs: Mapping[str, np.ndarray], batch: int, start: int = 0, salt: int | None = None) -> list[Batch]:
    """Arrays of ``N`` items cut into batches of at most ``batch`` (global indices from
    ``start``)."""
    n = len(next(iter(inputs.values())))
    return [Batch({k: v[s:s + batch] for k, v in inputs.items()}, np.arange(start + s, start + min(n, s + batch)),
                  salt) for s in range(0, n, batch)]


def merge(results: Sequence[Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Per-batch results concatenated along the item axis."""
    first = results[0]
    return {c: {k: np.concatenate([r[c][k] for r in results]) for k in first[c]} for c in first}


@dataclasses.dataclass
class Pending:
    """Dispatched work: device outputs per computation name for one batch, how many of
    its rows are real, and which outputs are whole (not per item)."""

    outputs: dict[str, Any]
    n: int
    whole: frozenset = frozenset()


@dataclasses.dataclass
class Group:
    """A unit of `Executor.stream`: computations to run on batches, and a tag the caller
    gets back with their results."""

    tag: Any
    comps: Mapping[str, Computation]
    batches: Sequence[Batch]


# ---------------------------------------------------------------- the executor

class Executor:
    """Runs computations over batches on the local devices: every driver's only way to
    compile, key, pad, shard, dispatch and fetch.

    Args:
      params: the model's variables (put on the devices once, replicated).
      batch: items per compiled call (rounded up to a multiple of the device count; a
        `Batch` may name another size).
      key: an int seed or a JAX key for per-item keys (a `Batch` may add a salt).
      devices: the devices to shard over (default: all local devices).
      timing: charge each computation its device time (a background thread, closed by
        `close`; use the executor as a context manager).
      tune: measure XLA settings for computations this machine has no choice for yet
        (worth it for repeated work; one-off calls compile once with XLA's default).

    Example::

        with Executor(params, batch=8, key=0) as ex:
            for tag, results in ex.stream(Group(tag, {"gradcam": comp}, batches) for ...):
                ...
            outputs = ex.map({"gradcam": comp}, {"images": x})   # split, stream, merge
    """

    def __init__(self, params, *, batch: int, key=0, devices=None, timing: bool = False, tune: bool = True):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        if batch < 1:
            raise ConvlensError("the batch size must be at least 1")
        self.devices = list(devices or jax.local_devices())
        self.batch = round_batch(batch, len(self.devices))
        self.key, self.tune = key, tune
        self.mesh = Mesh(np.asarray(self.devices), ("data",))
        self.data = NamedSharding(self.mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = self.put_params(params)
        self.seconds: dict[str, float] = {}
        self._checked: set = set()
        self._timer = _Timer(self.seconds) if timing else None
        if self._timer is not None:
            self._timer.start()

    # context management: the timer thread never outlives the executor
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def put_params(self, params):
        return jax.device_put(params, self.replicated) if len(self.devices) > 1 else params

    def function(self, comp: Computation) -> Function:
        return function(comp, self.tune)

    def keys(self, indices, salt: int | None = None) -> jax.Array:
        return item_keys(self.key, indices, salt)

    def _device_inputs(self, comp: Computation, batch: Batch, size: int) -> dict:
        out = {}
        for name in comp.inputs:
            if name not in batch.inputs:
                raise ValueError(f"{comp!r} needs input {name!r}; the batch has {', '.join(batch.inputs)}")
            a = pad_rows(np.asarray(batch.inputs[name]), size)
            out[name] = jax.device_put(a, self.data) if len(self.devices) > 1 else jnp.asarray(a)
        return out

    def _dispatch(self, comp: Computation, params, inputs, keys):
        if isinstance(comp, Loop):  # dispatched piece by piece; the state stays on the device
            state = self.function(comp.part("start"))(params, inputs, keys)
            step = self.function(comp.part("step"))
            for i in range(comp.steps):
                state = step(params, inputs, keys, state, jnp.int32(i))
            return self.function(comp.part("finish"))(params, inputs, keys, state)
        return self.function(comp)(params, inputs, keys)

    def submit(self, comps: Mapping[str, Computation], batch: Batch, params=None) -> Pending:
        """Dispatches every computation of ``comps`` on ``batch``; returns without waiting
        for the device."""
        n = len(batch)
        size = round_batch(batch.size, len(self.devices)) if batch.size else self.batch
        if not 0 < n <= size:
            raise ValueError(f"a batch of {n} items for a compiled batch of {size}")
        idx = pad_rows(np.asarray(batch.indices), size)
        keys = self.keys(idx, batch.salt)
        if len(self.devices) > 1:
            keys = jax.device_put(keys, self.data)
        p = self.params if params is None else self.put_params(params)
        outs = {}
        whole = set()
        for names, comp in self.plan(comps):
            if (comp, size) not in self._checked:
                comp.check(size)
                self._checked.add((comp, size))
            out = self._dispatch(comp, p, self._device_inputs(comp, batch, size), keys)
            if self._timer is not None:
                self._timer.add(names if len(names) > 1 else names[0], out)
            if isinstance(comp, Shared):
                outs.update({n: out[n] for n in names})
            else:
                outs[names[0]] = out
            if comp.whole:
                whole.update(names)
        return Pending({name: outs[name] for name in comps}, n, frozenset(whole))

    @staticmethod
    def plan(comps: Mapping[str, Computation]) -> list[tuple[tuple[str, ...], Computation]]:
        """What to dispatch: each computation alone, except those sharing a pass (equal
        `Computation.share_key`), which go as one `Shared` computation."""
        groups: dict = {}
        for name, comp in comps.items():
            k = comp.share_key()
            groups.setdefault(("alone", name) if k is None else ("shared", k), []).append((name, comp))
        out = []
        for members in groups.values():
            if len(members) == 1:
                out.append(((members[0][0],), members[0][1]))
            else:
                out.append((tuple(n for n, _ in members), Shared(tuple(members))))
        return out

    @staticmethod
    def fetch(pendings: Sequence[Pending]) -> list[dict[str, dict[str, np.ndarray]]]:
        """Host copies of dispatched work (one ``device_get`` for all of it), padding
        rows dropped: per pending, ``{computation: {output: [n, ...]}}``."""
        host = jax.device_get([p.outputs for p in pendings])
        return [{c: (outs if c in p.whole else {k: np.asarray(v)[:p.n] for k, v in outs.items()})
                 for c, outs in h.items()} for h, p in zip(host, pendings)]

    def run(self, comps: Mapping[str, Computation], batch: Batch, params=None) -> dict[str, dict[str, np.ndarray]]:
        """`submit` then `fetch` one batch."""
        return self.fetch([self.submit(comps, batch, params)])[0]

    def stream(self, groups: Iterable[Group | tuple], params=None
               ) -> Iterator[tuple[Any, list[dict[str, dict[str, np.ndarray]]]]]:
        """For each `Group` ``(tag, comps, batches)`` of ``groups``: dispatches every batch,
        then fetches the previous group and yields ``(its tag, its results per batch)``;
        so group ``n+1`` is on the device while group ``n`` is on the host. Groups are
        drawn lazily: a caller that stops consuming (``break``) stops dispatching."""
        pending = None
        for g in groups:
            tag, comps, batches = (g.tag, g.comps, g.batches) if isinstance(g, Group) else g
            dispatched = (tag, [self.submit(comps, b, params) for b in batches])
            if pending is not None:
                yield pending[0], self.fetch(pending[1])
            pending = dispatched
        if pending is not None:
            yield pending[0], self.fetch(pending[1])

    def map(self, comps: Mapping[str, Computation], inputs: Mapping[str, np.ndarray], start: int = 0,
            params=None) -> dict[str, dict[str, np.ndarray]]:
        """Every computation over arrays of ``N`` items (batches of ``self.batch``, item
        ``i`` keyed ``start + i``), pipelined; results ``{computation: {output: [N, ...]}}``."""
        batches = self.split(inputs, start)
        results = [r for _, rs in self.stream((Group(b, comps, [b]) for b in batches), params) for r in rs]
        return merge(results)

    def tuning(self, comp: Computation, inputs: Mapping[str, np.ndarray]) -> Tuning:
        """How ``comp``'s XLA options at this executor's batch size are chosen on this
        machine (measured now if unknown and the executor tunes), on the first batch of
        ``inputs``."""
        batch = self.split(inputs)[0]
        keys = self.keys(pad_rows(np.asarray(batch.indices), self.batch))
        return self.function(comp).tuning(self.params, self._device_inputs(comp, batch, self.batch), keys)

    def call(self, comp: Computation, params=None) -> dict[str, np.ndarray]:
        """A computation of the params alone (no batch inputs; its outputs ``whole``, e.g.
        a layer's kernels drawn as images), compiled, run and fetched like any other."""
        if comp.inputs or not comp.whole:
            raise ValueError(f"{comp!r}: call takes a computation without batch inputs whose outputs are whole")
        return self.run({"_": comp}, Batch({}, np.zeros(1, np.int32), size=1), params)["_"]

    def split(self, inputs: Mapping[str, np.ndarray], start: int = 0, salt: int | None = None) -> list[Batch]:
        """Arrays of ``N`` items cut into batches of at most ``self.batch``."""
        return split(inputs, self.batch, start, salt)


class _Timer(threading.Thread):
    """Waits for dispatched results in order and charges each computation its own device
    time (results of one device queue finish in dispatch order)."""

    def __init__(self, seconds: dict[str, float]):
        super().__init__(daemon=True, name="convlens-timer")
        self.q: queue.Queue = queue.Queue()
        self.seconds = seconds
        self.last = None

    def add(self, name, value):
        self.q.put((name, value, time.perf_counter()))

    def run(self):
        while True:
            got = self.q.get()
            if got is None:
                return
            name, value, t0 = got
            try:
                jax.block_until_ready(value)
            except Exception:  # noqa: BLE001 - the dispatching thread reports device errors
                pass
            t1 = time.perf_counter()
            start = t0 if self.last is None else max(t0, self.last)
            # Methods computed from one shared pass split its time equally.
            for n in (name if isinstance(name, tuple) else (name,)):
                share = (t1 - start) / (len(name) if isinstance(name, tuple) else 1)
                self.seconds[n] = self.seconds.get(n, 0.0) + share
            self.last = t1

    def close(self):
        self.q.put(None)
        self.join()
