"""The store schema: every array any command writes, declared once.

Every writer takes its arrays' shapes, dtypes and dims from `SCHEMA` (`convlens.engine.store.create_layout`),
`validate` checks a store against it, and the docs' table is generated from it.

Arrays (``N`` items; every array with a ``sample`` axis is chunked ``chunk`` items along
it, and each chunk is written whole by exactly one process). Resume rule: an item's
``status`` chunk is written after every other array's chunk of the same items, so a
chunk whose status is all non-zero was complete when written; `convlens.engine.verify`
checks that its data chunks still exist and decode before a resume trusts it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import numpy as np
import zarr

from convlens.engine.ownership import quiet

SCHEMA_VERSION = 3
SAMPLE_CHUNK = 16
PENDING, DONE, FAILED = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array (or family of arrays, by a glob ``pattern``) a store may hold.

    Attributes:
      pattern: the array's path (``*`` for one path segment, e.g. ``atlas/*/patterns``).
      dims: dimension names, by the array's rank (``{rank: dims}``); ``None`` for
        method outputs, whose dims the method registry declares.
      dtype: the numpy dtype string (``str`` for strings, ``any`` where it varies).
      doc: what it holds.
      layout: which command writes it (``run``, ``activations``, ``weights``, ``atlas``,
        ``training``, ``audit``, ``video``, ``pipeline``).
      optional: when an array of its layout is there only sometimes, what decides it
        (writers name the ones they skip).
      fill: the value of chunks not yet written (default: NaN, -1, 0, "" or False by dtype).
    """

    pattern: str
    dims: dict[int, tuple[str, ...]] | None
    dtype: str
    doc: str
    layout: str
    optional: str = ""
    fill: Any = None


def _d(*dims):
    return {len(dims): tuple(dims)}


SCHEMA: tuple[ArraySpec, ...] = (
    ArraySpec("ids", _d("sample"), "str", "the item's name (file path, name/split/i, index)", "run"),
    ArraySpec("labels", _d("sample"), "int32", "ground-truth class, -1 where unknown", "run"),
    ArraySpec("status", _d("sample"), "uint8", "0 pending, 1 done, 2 failed", "run"),
    ArraySpec("errors", _d("sample"), "str", "why an item failed (\"\" otherwise)", "run"),
    ArraySpec("predictions/topk_index", _d("sample", "rank"), "int32",
              "top classes, best first (-1 for failed items)", "run"),
    ArraySpec("predictions/topk_prob", _d("sample", "rank"), "float32",
              "their probabilities (softmax/sigmoid output)", "run"),
    ArraySpec("source/digest", _d("sample"), "uint64",
              "each item's file size and modification time, hashed (what --resume checks)", "run",
              optional="sources of files"),
    ArraySpec("inputs", _d("sample", "y", "x", "rgb"), "uint8", "the resized images (--keep-inputs)", "run",
              optional="--keep-inputs"),
    ArraySpec("masks", _d("sample", "y", "x"), "bool", "object masks, where the source has them", "run",
              optional="--masks"),
    ArraySpec("timing/method_seconds", _d("process", "method"), "float64",
              "per process, seconds spent in each method (attrs: methods)", "run", fill=0.0),
    ArraySpec("video/file", _d("sample"), "int32", "the item's file (index into the video.files attribute)", "video"),
    ArraySpec("video/frame", _d("sample"), "int32", "the item's frame number in its file", "video"),
    ArraySpec("video/time", _d("sample"), "float64", "the frame's time in seconds from the file's first frame",
              "video"),
    ArraySpec("pipeline/raw/*", _d("y", "x", "rgb"), "uint8", "the first items as read (at most 256 px a side)",
              "pipeline"),
    ArraySpec("pipeline/resized", _d("item", "y", "x", "rgb"), "uint8", "... as resized for the model", "pipeline"),
    ArraySpec("pipeline/preprocessed", _d("item", "y", "x", "channel"), "float32", "... as the model sees them",
              "pipeline"),
    ArraySpec("activations/*", {4: ("sample", "y", "x", "channel"), 2: ("sample", "unit")}, "float32",
              "a layer's output (convlens activations)", "activations"),
    ArraySpec("weights/*/kernel", _d("kh", "kw", "c_in", "c_out"), "float32", "a conv layer's kernel (HWIO)",
              "weights"),
    ArraySpec("weights/*/filters", {4: (("filter", "kh", "kw", "rgb"), ("filter", "c_in", "kh", "kw"))}, "float32",
              "kernels as images normalised per layer: [filter, kh, kw, rgb] on RGB input, else [filter, c_in, "
              "kh, kw]", "weights"),
    ArraySpec("atlas/*/patterns", _d("filter", "y", "x", "rgb"), "uint8", "the optimised image of each filter",
              "atlas"),
    ArraySpec("atlas/*/filters", _d("filter"), "int32", "which filter each row is", "atlas"),
    ArraySpec("atlas/*/scores", _d("filter"), "float32", "the objective on the final image", "atlas"),
    ArraySpec("atlas/*/start_scores", _d("filter"), "float32", "... on the starting image", "atlas"),
    ArraySpec("atlas/*/status", _d("filter"), "uint8", "0 pending, 1 done (written last per chunk)", "atlas"),
    ArraySpec("epoch", _d("epoch"), "int32", "the recorded epochs (training stores)", "training"),
    ArraySpec("metrics/*", _d("epoch"), "float64", "a logged metric per recorded epoch (NaN when not logged)",
              "training"),
    ArraySpec("audit/*/grid_mass", _d("sample", "grid_y", "grid_x"), "float32", "map mass per grid cell", "audit"),
    ArraySpec("audit/*/peak", _d("sample", "yx"), "float32", "the map's peak, y and x in [0, 1]", "audit"),
    ArraySpec("audit/*/class_mean*", _d("class", "y", "x"), "float32",
              "mean map mass per class (_correct, _wrong: over correct / misclassified items)", "audit"),
    ArraySpec("audit/*/metrics/*_curve", _d("sample", "step"), "float32",
              "a catalogue metric's curve per item (NaN: not rated), e.g. road_morf_curve", "audit"),
    ArraySpec("audit/*/metrics/*", _d("sample"), "float32",
              "a catalogue metric's score per item (NaN: not rated); audit/control_random and "
              "audit/control_sobel hold the controls'", "audit"),
    ArraySpec("audit/*/*", _d("sample"), "any",
              "per-item statistics: center_share, entropy, concentration, suspicion, empty, object_share, "
              "pointing_hit", "audit"),
)
# Method outputs: ``<method>/<output>`` with dims from the method registry (``sample``
# first); training stores put ``epoch`` before them.
METHOD_OUTPUT = ArraySpec("<method>/<output>", None, "any",
                          "each output the method declares, e.g. gradcam/heatmap [N, T, H, W] f4; NaN (float) or "
                          "-1 (int) for failed items", "run")


def schema_table() -> str:
    """The schema as a Markdown table (the README's, written from these declarations)."""
    rows = ["| array | dtype | dims | holds | written by |", "|---|---|---|---|---|"]
    for s in (*SCHEMA[:9], METHOD_OUTPUT, *SCHEMA[9:]):
        dims = " / ".join(", ".join(d) for ds in (s.dims or {}).values()
                          for d in (ds if isinstance(ds[0], tuple) else (ds,))) or "as the method declares"
        rows.append(f"| `{s.pattern}` | {s.dtype} | {dims} | {s.doc} | {s.layout} |")
    return "\n".join(rows)


def spec_for(path: str) -> ArraySpec | None:
    """The schema entry of an array path (first match), or ``None`` (a method output)."""
    for s in SCHEMA:
        if fnmatch.fnmatchcase(path, s.pattern) and path.count("/") == s.pattern.count("/"):
            return s
    return None


def allowed_dims(spec: ArraySpec, ndim: int) -> tuple[tuple[str, ...], ...]:
    """Every dims tuple the schema allows for ``spec`` at rank ``ndim`` (some layouts have two)."""
    d = spec.dims.get(ndim, ())
    return d if d and isinstance(d[0], tuple) else (d,)


def dims_for(path: str, ndim: int) -> tuple[str, ...]:
    """Declared dims of the array at ``path`` with ``ndim`` axes."""
    s = spec_for(path)
    if s is None or s.dims is None:
        raise ValueError(f"{path}: not in the store schema (method outputs take their dims from the registry)")
    if ndim in s.dims:
        d = s.dims[ndim]
        return d[0] if isinstance(d[0], tuple) else d
    if s.pattern.startswith("activations/"):
        return ("sample",) + tuple(f"d{i}" for i in range(1, ndim))
    raise ValueError(f"{path}: {ndim}-D, the schema declares {sorted(s.dims)}-D")


def describe(root: zarr.Group) -> dict[str, Any]:
    """Every array's shape, dtype, dims and chunks."""
    out = {}

    def walk(g, prefix=""):
        for name, member in sorted(g.members(), key=lambda m: m[0]):
            full = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                walk(member, full + "/")
            else:
                out[full] = {"shape": tuple(member.shape), "dtype": str(member.dtype),
                             "dims": tuple(member.metadata.dimension_names or ()),
                             "chunks": tuple(member.chunks)}
    with quiet():
        walk(root)
    return out


def _dtype_ok(declared: str, actual: str) -> bool:
    if declared == "any":
        return True
    if declared == "str":
        return "str" in actual.lower() or actual.startswith("<U") or "string" in actual.lower()
    return np.dtype(declared) == np.dtype(actual) if not actual.lower().startswith(("str", "<u")) else False


def validate(root: zarr.Group, registry: dict | None = None) -> list[str]:
    """Problems with a store against `SCHEMA` and the method registry (empty = fine):
    every array of every layout is checked for its declared dims and dtype.

    ``registry``: the methods to check outputs against (default: convlens's registry,
    imported here; an import failure is raised, never taken for an empty registry)."""
    if registry is None:
        from convlens.kernels.registry import METHODS as registry
    METHODS = registry
    problems = []
    attrs = dict(root.attrs)
    for key in ("schema_version", "convlens_version", "model", "created", "methods"):
        if key not in attrs:
            problems.append(f"root attribute {key!r} missing")
    arrays = describe(root)
    methods = attrs.get("methods", {}) or {}
    training = "training" in attrs
    n = arrays.get("ids", {}).get("shape", (None,))[0]
    for name, a in arrays.items():
        if len(a["dims"]) != len(a["shape"]):
            problems.append(f"{name}: dimension_names {a['dims']} do not match shape {a['shape']}")
            continue
        head = name.split("/", 1)[0]
        if head in methods and not name.startswith(("audit/", "atlas/")):
            out = name.split("/", 1)[1]
            declared = {o: tuple(d) for o, d in (methods[head].get("outputs") or {}).items()}
            if head in METHODS:
                declared.update(METHODS[head].dims)
            if out not in declared:
                problems.append(f"{name}: not an output of {head}")
                continue
            want = (("epoch",) if training else ()) + tuple(declared[out])
            if a["dims"] != want:
                problems.append(f"{name}: dims {a['dims']}, declared {want}")
            if n is not None and a["shape"][len(want) - len(declared[out])] != n:
                problems.append(f"{name}: {a['shape'][0]} items, ids has {n}")
            continue
        spec = spec_for(name)
        if spec is None:
            problems.append(f"{name}: not in the store schema")
            continue
        try:
            want = dims_for(name, len(a["shape"]))
        except ValueError as e:
            problems.append(str(e))
            continue
        if len(a["shape"]) in (spec.dims or {}) and a["dims"] in allowed_dims(spec, len(a["shape"])):
            want = a["dims"]
        if a["dims"] != want:
            problems.append(f"{name}: dims {a['dims']}, schema says {want}")
        if not _dtype_ok(spec.dtype, a["dtype"]):
            problems.append(f"{name}: dtype {a['dtype']}, schema says {spec.dtype}")
        if "sample" in want and n is not None and a["shape"][want.index("sample")] != n and not training:
            problems.append(f"{name}: {a['shape'][want.index('sample')]} items, ids has {n}")
    for method, entry in methods.items():
        for out in (entry.get("outputs") or {}):
            if f"{method}/{out}" not in arrays:
                problems.append(f"{method}/{out}: declared in attrs but missing")
        if method in METHODS and "training" not in attrs or method in METHODS and f"{method}/targets" in arrays:
            for out in METHODS[method].dims:
                if f"{method}/{out}" not in arrays:
                    problems.append(f"{method}/{out}: declared by the registry but not in the store")
    return problems
