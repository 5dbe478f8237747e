"""Read Keras model and weight files into a convlens graph and params, strictly.

Formats, told apart by their content (never by the file name):

* Keras 3 ``.keras`` archive: a zip of ``config.json`` and ``model.weights.h5``;
* Keras 3 ``.weights.h5``: groups ``layers/<auto name>/vars/<i>``, auto-named by
  class (``conv2d``, ``conv2d_1``...) in the order of ``model.layers``; newer
  Keras also records the layer's own name in the ``vars`` group's ``name``
  attribute, which is used when present;
* legacy full-model ``.h5``: root attribute ``model_config`` (JSON) and a
  ``model_weights`` group in the layout below;
* legacy weights-only ``.h5``, as Keras 2 wrote them and as Keras's published
  ImageNet files are laid out: root attribute ``layer_names`` (possibly split
  into ``layer_names0``, ``layer_names1``...), one group per layer whose
  ``weight_names`` attribute lists its datasets in ``layer.weights`` order, either
  directly in the group (``block1_conv1_W_1:0``) or nested
  (``block1_conv1/kernel:0``).

Loading is all or nothing: every missing, unexpected or mis-shaped variable is
listed by layer name in one `ModelFileError` and no params are returned.
Nothing in a file is executed (no pickle, no Lambda, no custom objects).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import h5py
import jax.numpy as jnp
import numpy as np

from convlens.errors import ConvlensError, ModelFileError
from convlens.models.keras_graph import graph_from_config
from convlens.models.network import Graph, Model, Node, Params

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


# ----------------------------------------------------------------------------- sniffing

def file_kind(path: str | Path) -> str:
    """``"keras"``, ``"h5_model"``, ``"h5_weights"`` (legacy) or ``"keras3_weights"``."""
    with damaged_file(path):
        return _file_kind(path)


def _file_kind(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory; give a .keras or .h5 file "
                             "(TensorFlow SavedModel directories are not supported)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(ZIP_MAGIC):
        return "keras"
    if head != HDF5_MAGIC:
        raise ModelFileError(f"{path} is neither a Keras .keras archive nor an HDF5 .h5 file "
                             f"(it starts with {head[:8]!r}); give a file saved by Keras")
    with _open_h5(path) as f:
        if "model_config" in f.attrs:
            return "h5_model"
        if "layer_names" in f.attrs or "layer_names0" in f.attrs:
            return "h5_weights"
        if "layers" in f or "vars" in f:
            return "keras3_weights"
    raise ModelFileError(f"{path} is an HDF5 file but not one Keras wrote (no model_config, layer_names "
                         "or layers group); give a file saved by Keras")


def _open_h5(src, path=None) -> h5py.File:
    try:
        return h5py.File(src, "r")
    except OSError as e:
        raise ModelFileError(f"cannot read {path or src}: {_h5_reason(e)}; the file is truncated or "
                             "corrupt: copy or save it again") from None


def _h5_reason(e: Exception) -> str:
    msg = str(e)
    m = re.search(r"\((.*)\)", msg)
    return (m.group(1) if m else msg).strip() or type(e).__name__


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- limits
# A model file is data, checked before it is read: its config's size, its members' sizes,
# each weight's declared shape and storage (a small file must not make convlens read
# gigabytes, or any file but itself).

MAX_CONFIG_BYTES = 64 << 20  # the largest Keras configs (NASNetLarge) are ~1 MB
MAX_RATIO = 2000  # a zip member this many times larger than its compressed bytes is a bomb


def _check_member(path, info: zipfile.ZipInfo, limit: int) -> None:
    if info.file_size > limit:
        raise ModelFileError(f"{path}: {info.filename} declares {info.file_size:,} bytes, more than the "
                             f"{limit:,} a model of this size can need; the archive is damaged or not a Keras model")
    if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > (1 << 20):
        raise ModelFileError(f"{path}: {info.filename} expands {info.file_size / info.compress_size:.0f}-fold "
                             "(a decompression bomb); refused")


def parse_config(raw, where: str):
    """A Keras config from JSON text, or a one-line error (invalid or absurdly nested JSON)."""
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{where} is not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFileError(f"{where} is nested too deeply to be a Keras config; the file is damaged") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{where} is not a JSON text ({e})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{where} is a JSON {type(config).__name__}, not a Keras model config")
    return config


def _param_bytes(graph: Graph) -> int:
    from convlens.models.network import Model
    return 4 * sum(math.prod(v.shape) for vs in Model(graph).variable_specs().values() for v in vs)


def _expected(graph: Graph) -> dict[str, list]:
    from convlens.models.network import Model
    return Model(graph).variable_specs()


class _Unread:
    """A weight whose declared shape or type does not fit the model: reported by
    `merge_params`, never read."""

    def __init__(self, shape, why: str = ""):
        self.shape, self.why = tuple(shape), why


def _dataset(group: h5py.Group, key: str, path) -> h5py.Dataset:
    """``group[key]`` as a dataset stored in this file, or a one-line error: links to other
    files, external storage and virtual datasets would make convlens read other files."""
    link = group.get(key, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise ModelFileError(f"{path}: {group.name}/{key} is a link to {'another file' if isinstance(link, h5py.ExternalLink) else 'elsewhere'}; "
                             "a model file must hold its own weights: refused")
    ds = group[key]
    if not isinstance(ds, h5py.Dataset):
        raise ModelFileError(f"{path}: {ds.name} is not a dataset; the file is damaged")
    if ds.external or ds.is_virtual:
        raise ModelFileError(f"{path}: {ds.name} keeps its data in other files (HDF5 "
                             f"{'external storage' if ds.external else 'virtual dataset'}); a model file must hold "
                             "its own weights: refused")
    if ds.dtype.kind not in "fiub":
        raise ModelFileError(f"{path}: {ds.name} holds {ds.dtype}, not numbers; the file is damaged")
    return ds


def _group(group: h5py.Group, key: str, path) -> h5py.Group | None:
    link = group.get(key, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise ModelFileError(f"{path}: {group.name}/{key} is a link to another file or place; refused")
    g = group[key]
    return g if isinstance(g, h5py.Group) else None


def _read(ds: h5py.Dataset, want, cap: int = 1 << 22) -> np.ndarray | _Unread:
    """The dataset's values if its declared shape is the variable's (or, with no variable
    to compare, it holds at most ``cap`` numbers), else a placeholder."""
    if want is not None and tuple(ds.shape) != tuple(want.shape):
        return _Unread(ds.shape)
    if want is None and ds.size > cap:
        return _Unread(ds.shape, "too large")
    return ds[()]


# ----------------------------------------------------------------------------- model files

H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError, RecursionError,
             EOFError, UnicodeDecodeError, OverflowError)


@contextlib.contextmanager
def damaged_file(path):
    """HDF5's errors on a damaged file (h5py raises many types) as one `ModelFileError`."""
    try:
        yield
    except ConvlensError:
        raise
    except H5_ERRORS as e:
        raise ModelFileError(f"cannot read {path}: {_h5_reason(e)}; the file is damaged or truncated: "
                             "copy or save it again") from None


def read_model_file(path: str | Path) -> tuple[Graph, "_Found"]:
    """Architecture and weights of a ``.keras`` or legacy full-model ``.h5`` file."""
    with damaged_file(path):
        return _read_model_file(path)


def _read_model_file(path: str | Path) -> tuple[Graph, "_Found"]:
    path = Path(path)
    kind = file_kind(path)
    if kind == "keras":
        try:
            with zipfile.ZipFile(path) as z:
                infos = {i.filename: i for i in z.infolist()}
                if "config.json" not in infos:
                    raise ModelFileError(f"{path} is a zip without config.json, not a .keras model archive")
                _check_member(path, infos["config.json"], MAX_CONFIG_BYTES)
                config = parse_config(z.read("config.json"), f"{path}: config.json")
                if "model.weights.h5" not in infos:
                    raise ModelFileError(f"{path} holds no model.weights.h5 (found {', '.join(infos)}); "
                                         "save it again with Keras 3's model.save('x.keras')")
                graph = graph_from_config(config)
                # The weights can be no larger than the architecture's variables (plus HDF5's own bytes).
                _check_member(path, infos["model.weights.h5"], 2 * _param_bytes(graph) + (16 << 20))
                blob = z.read("model.weights.h5")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError) as e:
            raise ModelFileError(f"cannot read {path}: {e}; the archive is truncated or corrupt: "
                                 "copy or save it again") from None
        with _open_h5(io.BytesIO(blob), f"{path}:model.weights.h5") as f:
            found = _read_keras3(f, graph, path)
        return graph, found
    if kind == "h5_model":
        with _open_h5(path) as f:
            raw = f.attrs["model_config"]
            if not isinstance(raw, (bytes, str, np.bytes_, np.str_)) or len(raw) > MAX_CONFIG_BYTES:
                raise ModelFileError(f"{path}: model_config is not a JSON text of at most "
                                     f"{MAX_CONFIG_BYTES >> 20} MB; the file is damaged or not a Keras model")
            raw = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            config = parse_config(raw, f"{path}: model_config")
            graph = graph_from_config(config)
            if "model_weights" not in f:
                raise ModelFileError(f"{path} has a model config but no weights (model_weights group)")
            found = _read_legacy(f["model_weights"], graph, path)
        return graph, found
    raise ModelFileError(f"{path} holds weights only, no architecture; pass it with --weights to a "
                         "built-in model (e.g. convlens summary vgg16 --weights FILE)")


def read_weights_file(path: str | Path, graph: Graph) -> "_Found":
    """Weights from any Keras format, matched to ``graph``'s layers."""
    with damaged_file(path):
        return _read_weights_file(path, graph)


def _read_weights_file(path: str | Path, graph: Graph) -> "_Found":
    path = Path(path)
    kind = file_kind(path)
    if kind in ("keras", "h5_model"):
        fgraph, found = read_model_file(path)
        return _by_position(fgraph, graph, found)
    with _open_h5(path) as f:
        if kind == "keras3_weights":
            return _read_keras3(f, graph, path)
        return _read_legacy(f, graph, path)


def _by_position(fgraph: Graph, graph: Graph, found: "_Found") -> "_Found":
    """A full-model file's arrays keyed by ``graph``'s layer names, position by position,
    when the file holds the same architecture (same layer classes, same wiring), as Keras
    loads weights into a model object: names made in another Keras session (``conv2d_95``)
    may coincide with other layers' names here. Otherwise ``found`` as it is (names, then
    `pair_by_order`)."""
    if len(fgraph.nodes) != len(graph.nodes):
        return found
    fpos = {n.name: i for i, n in enumerate(fgraph.nodes)}
    pos = {n.name: i for i, n in enumerate(graph.nodes)}
    for a, b in zip(fgraph.nodes, graph.nodes):
        if a.cls != b.cls or len(a.scope) != len(b.scope) or [fpos[i] for i in a.inputs] != [pos[i] for i in b.inputs]:
            return found
    if any(name not in fpos for name in found.arrays):
        return found
    out = _Found()
    for name, arrays in found.arrays.items():
        out.put(graph.nodes[fpos[name]].name, arrays, found.names.get(name, []))
    out.unmatched, out.loose = found.unmatched, found.loose
    return out


def load_weights(model: Model, path: str | Path) -> Params:
    """Reads ``path`` (any Keras format) into ``model``'s params; all or nothing. The
    model is not changed (its provenance is the caller's: `convlens.load_model` records it)."""
    found = read_weights_file(path, model.graph)
    return merge_params(model, found, path)


# ----------------------------------------------------------------------------- matching

class _Found:
    """Arrays found in a file per graph layer, plus file entries matching no layer."""

    def __init__(self):
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.names: dict[str, list[str]] = {}
        self.unmatched: list[str] = []
        # Entries whose names match no layer, kept for matching by order: (name, position, arrays).
        self.loose: list[tuple[str, int, list]] = []

    def put(self, layer: str, arrays: list[np.ndarray], names: list[str]):
        if arrays:
            self.arrays.setdefault(layer, []).extend(arrays)
            self.names.setdefault(layer, []).extend(names)


def _stem(name: str) -> tuple[str, int]:
    """Keras's automatic layer names are a class stem and a session-wide counter
    (``conv2d``, ``conv2d_297``): ``(stem, counter)``."""
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
    return m.group(1), int(m.group(2) or 0)


def _fits(arrays, specs) -> bool:
    return len(arrays) == len(specs) and all(tuple(a.shape) == tuple(v.shape) for a, v in zip(arrays, specs))


def pair_by_order(model: Model, found: _Found) -> None:
    """Matches file entries whose names fit no layer to the layers left without weights,
    in order, as Keras does: the same model built in another session has the same layers
    under other automatic names (``conv2d_297`` for ``conv2d``). First within each name
    stem (``conv2d`` entries to Conv2D layers), then, as Keras's legacy loader, over all
    layers with weights; every pair must fit in count and shape, else nothing is paired."""
    specs = model.variable_specs()
    # A full-model file's arrays are named after its own graph: the same architecture saved
    # in another Keras session has other automatic names (``normalization_1``). Those that
    # fit no layer here are paired like weights-file entries, in the file's layer order.
    foreign = [n for n in found.arrays if n not in specs]
    for i, n in enumerate(found.arrays):
        if n in foreign:
            found.loose.append((n, i, found.arrays[n]))
    for n in foreign:
        del found.arrays[n]
        found.names.pop(n, None)
    if not found.loose:
        return
    missing = [n for n in specs if n not in found.arrays]
    loose = sorted(found.loose, key=lambda e: e[1])
    pairs: dict[str, tuple] = {}
    by_stem: dict[str, list] = {}
    for e in loose:
        by_stem.setdefault(_stem(e[0])[0], []).append(e)
    for stem, entries in by_stem.items():
        layers = [n for n in missing if snake_case(model.graph.by_name[n].cls) == stem
                  or _stem(model.graph.by_name[n].kname)[0] == stem]
        entries = sorted(entries, key=lambda e: e[1])
        if len(layers) != len(entries):
            continue
        # Layers in graph order each take the earliest entry that fits them: a branch's
        # layers may be created (numbered) in another order than the graph lists them.
        chosen, free = {}, list(entries)
        for n in layers:
            hit = next((e for e in free if _fits(e[2], specs[n])), None)
            if hit is None:
                break
            chosen[n] = hit
            free.remove(hit)
        if len(chosen) == len(layers):
            pairs.update(chosen)
    rest_layers = [n for n in missing if n not in pairs]
    rest = [e for e in loose if all(e is not p for p in pairs.values())]
    if rest and len(rest_layers) == len(rest) and all(_fits(e[2], specs[n]) for n, e in zip(rest_layers, rest)):
        pairs.update(zip(rest_layers, rest))
    for layer, (name, _, arrays) in pairs.items():
        found.put(layer, arrays, [name])
    paired = {id(e) for e in pairs.values()}
    found.unmatched += [e[0] for e in loose if id(e) not in paired]
    found.loose = []


def merge_params(model: Model, found: _Found, path) -> Params:
    """Checks ``found`` against the model's variables and builds params, or raises
    one error listing every missing, unexpected and mis-shaped variable."""
    pair_by_order(model, found)
    specs = model.variable_specs()
    problems: list[str] = []
    missing = [name for name in specs if name not in found.arrays]
    if missing:
        problems.append(f"missing layers: {_few(missing)}")
    unexpected = [name for name in found.arrays if name not in specs] + found.unmatched
    if unexpected:
        problems.append(f"unexpected in file: {_few(unexpected)}")
    params: Params = {}
    for name, vars_ in specs.items():
        arrays = found.arrays.get(name)
        if arrays is None:
            continue
        if len(arrays) != len(vars_):
            problems.append(f"{name}: file has {len(arrays)} variables, model needs {len(vars_)} "
                            f"({', '.join(v.name for v in vars_)})")
            continue
        for v, a in zip(vars_, arrays):
            if tuple(a.shape) != tuple(v.shape):
                problems.append(f"{name}/{v.name}: file shape {tuple(a.shape)}, model shape {tuple(v.shape)}")
        params[name] = {v.name: a for v, a in zip(vars_, arrays)}
    if problems:
        top = classifier_layers(model)
        if missing and not unexpected and set(missing) <= top:
            raise ModelFileError(f"{path} has no classifier (notop weights: {_few(missing)} are missing): add "
                                 "--no-top (include_top=False) to load it, or give the file with the classifier")
        headless = not any(model.graph.by_name[n].kind == "dense" for n in top)
        if unexpected and not missing and headless:
            raise ModelFileError(f"{path} holds a classifier ({_few(unexpected)}) that the headless model lacks: "
                                 "drop --no-top (include_top=False), or give the notop file")
        raise ModelFileError(f"{path} does not fit model {model.name!r}: " + "; ".join(problems)
                             + ". Check that the file was saved from this architecture")
    return {layer: {k: jnp.asarray(np.asarray(a, np.float32)) for k, a in vs.items()}
            for layer, vs in params.items()}


def classifier_layers(model: Model) -> set[str]:
    """The layers after the last spatial feature map (flatten, pooling, dense ...): what a
    Keras ``include_top=False`` file lacks."""
    shapes = model.output_shapes()
    last = max((i for i, n in enumerate(model.graph.nodes) if len(shapes.get(n.name, ())) == 4
                and n.name != model.graph.input), default=-1)
    return {n.name for n in model.graph.nodes[last + 1:]}


def _few(names: Sequence[str], n: int = 12) -> str:
    s = ", ".join(names[:n])
    return s + (f" (and {len(names) - n} more)" if len(names) > n else "")


def snake_case(name: str) -> str:
    """Keras's automatic name stem for a class (``BatchNormalization`` -> ``batch_normalization``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _container_layers(graph: Graph, scope: tuple[str, ...]) -> list[Node]:
    """Layers directly inside one (nested) model, in ``model.layers`` order."""
    return [n for n in graph.nodes if n.scope == scope]


def _auto_names(nodes: list[Node]) -> dict[str, Node]:
    used: dict[str, int] = {}
    out = {}
    for n in nodes:
        stem = snake_case(n.cls)
        if stem in used:
            used[stem] += 1
            out[f"{stem}_{used[stem]}"] = n
        else:
            used[stem] = 0
            out[stem] = n
    return out


def _read_keras3(root: h5py.Group, graph: Graph, path) -> _Found:
    found = _Found()
    try:
        _read_keras3_container(root, graph, (), found, path, _expected(graph))
    except (OSError, KeyError, ValueError, TypeError, RecursionError) as e:
        raise ModelFileError(f"cannot read weights from {path}: {_h5_reason(e)}; the file is truncated "
                             "or corrupt: save it again") from None
    return found


def _numbered(group: h5py.Group, path, want: list | None) -> list:
    keys = sorted((k for k in group.keys() if k.isdigit()), key=int)
    want = want or []
    return [_read(_dataset(group, k, path), want[i] if i < len(want) else None) for i, k in enumerate(keys)]


def _read_keras3_container(g: h5py.Group, graph: Graph, scope, found: _Found, path, expected) -> None:
    layers = _group(g, "layers", path)
    if layers is None:
        return
    nodes = _container_layers(graph, scope)
    by_kname = {n.kname: n for n in nodes}
    auto = _auto_names(nodes)
    children = {}
    for key in layers:
        child = _group(layers, key, path)
        if child is None:
            continue
        vars_g = _group(child, "vars", path)
        recorded = vars_g.attrs.get("name") if vars_g is not None else None
        if isinstance(recorded, bytes):
            recorded = recorded.decode("utf-8", "replace")
        children[key] = (child, vars_g, recorded if isinstance(recorded, str) and recorded else None)
    # Recorded names come from the saving session. When every one (of a layer with
    # variables: an input layer's automatic name says nothing) names a layer here, the
    # file is this model's or a part of it (another architecture's names then show what is
    # missing). Otherwise they may name other layers here (the same architecture built
    # in another session: its conv2d_2 is this model's conv2d_1), and the key, Keras's own
    # (the layer's class and its place in the model, the way Keras loads weights), decides.
    names_fit = all(r in by_kname for _, v, r in children.values() if r and v is not None and len(v))
    for key, (child, vars_g, recorded) in children.items():
        first, second = (by_kname.get(recorded), auto.get(key)) if names_fit else (auto.get(key), by_kname.get(recorded))
        node = first if first is not None else second
        if node is None:
            if vars_g is not None and len(vars_g):
                cap = max((math.prod(v.shape) for vs in expected.values() for v in vs), default=0)
                arrays = [_read(_dataset(vars_g, k, path), None, cap)
                          for k in sorted((k for k in vars_g.keys() if k.isdigit()), key=int)]
                name = str(recorded or key)
                found.loose.append((name, _stem(name)[1], arrays))  # ordered by Keras's name counter
            elif "layers" in child:
                found.unmatched.append(str(recorded or key))
            continue
        if node.cls in ("Sequential", "Functional"):
            _read_keras3_container(child, graph, (*scope, node.kname), found, path, expected)
            continue
        arrays = _numbered(vars_g, path, expected.get(node.name)) if vars_g is not None else []
        found.put(node.name, arrays, [f"{key}/vars/{i}" for i in range(len(arrays))])


def str_list_attr(attrs, name: str) -> list[str] | None:
    """A list-of-strings attribute, joined from ``name0``, ``name1``... when HDF5's
    64 KiB attribute limit made Keras split it."""
    if name in attrs:
        vals = attrs[name]
    elif f"{name}0" in attrs:
        vals, i = [], 0
        while f"{name}{i}" in attrs:
            vals.extend(np.atleast_1d(attrs[f"{name}{i}"]).tolist())
            i += 1
    else:
        return None
    vals = np.atleast_1d(vals).tolist()
    return [v.decode("utf8", "replace") if isinstance(v, bytes) else str(v) for v in vals]


def _read_legacy(root: h5py.Group, graph: Graph, path) -> _Found:
    found = _Found()
    layer_names = str_list_attr(root.attrs, "layer_names")
    if layer_names is None:
        raise ModelFileError(f"{path}: no layer_names attribute; not a Keras weights file")
    top = {n.kname: n for n in _container_layers(graph, ())}
    expected = _expected(graph)
    try:
        for lname in layer_names:
            if lname not in root:
                raise ModelFileError(f"{path}: layer_names lists {lname!r} but the file has no such group "
                                     "(truncated or corrupt file)")
            g = _group(root, lname, path)
            if g is None:
                raise ModelFileError(f"{path}: {lname!r} is not a group; the file is damaged")
            wnames = str_list_attr(g.attrs, "weight_names") or []
            # A flat file may also name the layers of nested models directly.
            node = top.get(lname) or graph.by_name.get(lname)
            if node is None:
                if wnames:
                    cap = max((math.prod(v.shape) for vs in expected.values() for v in vs), default=0)
                    found.loose.append((lname, len(found.loose), [_read(_dataset_path(g, w, path), None, cap)
                                                                  for w in wnames]))
                continue
            if node.cls in ("Sequential", "Functional"):
                cap = max((math.prod(v.shape) for vs in expected.values() for v in vs), default=0)
                arrays = [_read(_dataset_path(g, w, path), None, cap) for w in wnames]
                if arrays:
                    _spread_nested(graph, (node.kname,), wnames, arrays, found)
                continue
            want = expected.get(node.name) or []
            arrays = [_read(_dataset_path(g, w, path), want[i] if i < len(want) else None)
                      for i, w in enumerate(wnames)]
            if arrays:
                found.put(node.name, arrays, wnames)
    except (OSError, KeyError, ValueError, TypeError, RecursionError) as e:
        raise ModelFileError(f"cannot read weights from {path}: {_h5_reason(e)}; the file is truncated "
                             "or corrupt: save it again") from None
    return found


def _dataset_path(g: h5py.Group, name: str, path) -> h5py.Dataset:
    """A dataset named by a path inside ``g`` (``block1_conv1/kernel:0``), every step a
    hard link in this file."""
    parts = [p for p in name.split("/") if p]
    for p in parts[:-1]:
        nxt = _group(g, p, path)
        if nxt is None:
            raise ModelFileError(f"{path}: weight {name!r} is listed but missing; the file is damaged")
        g = nxt
    if not parts or parts[-1] not in g:
        raise ModelFileError(f"{path}: weight {name!r} is listed but missing; the file is damaged")
    return _dataset(g, parts[-1], path)


def _spread_nested(graph: Graph, scope, wnames, arrays, found: _Found) -> None:
    """Assigns a nested model's weights (listed flat under its group) to its layers:
    by the layer name in each weight's path, or else in layer order."""
    inner = [n for n in graph.nodes if n.scope[:len(scope)] == scope and n.cls not in ("Sequential", "Functional")]
    by_kname = {n.kname: n for n in inner}
    owners = []
    for w in wnames:
        parts = w.split("/")
        owner = next((by_kname[p] for p in reversed(parts[:-1]) if p in by_kname), None)
        owners.append(owner)
    if all(o is not None for o in owners):
        for o, w, a in zip(owners, wnames, arrays):
            found.put(o.name, [a], [w])
        return
    from convlens.models.network import Model
    specs = Model(graph).variable_specs()
    i = 0
    for n in inner:
        k = len(specs.get(n.name, []))
        if k:
            found.put(n.name, list(arrays[i:i + k]), list(wnames[i:i + k]))
            i += k
    if i < len(arrays):
        found.unmatched.append("/".join(scope) + f" (+{len(arrays) - i} extra arrays)")


def load_model_file(path: str | Path, **model_kw) -> tuple[Model, Params]:
    """A `Model` and its params from a ``.keras`` or full-model ``.h5`` file."""
    from convlens.models.network import Provenance
    graph, found = read_model_file(path)
    model = Model(graph, provenance=Provenance.of(str(path), sha256(path)), **model_kw)
    params = merge_params(model, found, path)
    return model, params


__all__ = ["ConvlensError", "file_kind", "load_model_file", "load_weights", "read_model_file",
           "read_weights_file", "merge_params", "snake_case", "str_list_attr"]


def save_h5_model(model: Model, params: Params, path: str | Path, config: dict) -> Path:
    """Writes ``model`` (built from the Keras ``config``) and ``params`` as a legacy
    full-model ``.h5`` file (``model_config`` + ``model_weights``), the layout Keras 2
    wrote and convlens (and Keras) read back. Returns the path."""
    path = Path(path)
    specs = model.variable_specs()
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["backend"] = "jax"
        f.attrs["keras_version"] = "convlens"
        g = f.create_group("model_weights")
        names = [n.name for n in model.graph.nodes if n.name != model.graph.input]
        g.attrs["layer_names"] = np.asarray([n.encode() for n in names])
        for name in names:
            lg = g.create_group(name)
            wnames = [f"{name}/{v.name}:0" for v in specs.get(name, [])]
            lg.attrs["weight_names"] = np.asarray([w.encode() for w in wnames])
            for v, w in zip(specs.get(name, []), wnames):
                lg.create_dataset(w, data=np.asarray(params[name][v.name]))
    return path
