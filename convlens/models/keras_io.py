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

import hashlib
import io
import json
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


# ----------------------------------------------------------------------------- model files

def read_model_file(path: str | Path) -> tuple[Graph, "_Found"]:
    """Architecture and weights of a ``.keras`` or legacy full-model ``.h5`` file."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "keras":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if "config.json" not in names:
                    raise ModelFileError(f"{path} is a zip without config.json, not a .keras model archive")
                config = json.loads(z.read("config.json"))
                if "model.weights.h5" not in names:
                    raise ModelFileError(f"{path} holds no model.weights.h5 (found {', '.join(names)}); "
                                         "save it again with Keras 3's model.save('x.keras')")
                blob = z.read("model.weights.h5")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
            raise ModelFileError(f"cannot read {path}: {e}; the archive is truncated or corrupt: "
                                 "copy or save it again") from None
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{path}: config.json is not valid JSON ({e})") from None
        graph = graph_from_config(config)
        with _open_h5(io.BytesIO(blob), f"{path}:model.weights.h5") as f:
            found = _read_keras3(f, graph, path)
        return graph, found
    if kind == "h5_model":
        with _open_h5(path) as f:
            raw = f.attrs["model_config"]
            raw = raw.decode() if isinstance(raw, bytes) else str(raw)
            try:
                config = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ModelFileError(f"{path}: model_config is not valid JSON ({e})") from None
            graph = graph_from_config(config)
            if "model_weights" not in f:
                raise ModelFileError(f"{path} has a model config but no weights (model_weights group)")
            found = _read_legacy(f["model_weights"], graph, path)
        return graph, found
    raise ModelFileError(f"{path} holds weights only, no architecture; pass it with --weights to a "
                         "built-in model (e.g. convlens summary vgg16 --weights FILE)")


def read_weights_file(path: str | Path, graph: Graph) -> "_Found":
    """Weights from any Keras format, matched to ``graph``'s layers."""
    path = Path(path)
    kind = file_kind(path)
    if kind in ("keras", "h5_model"):
        _, found = read_model_file(path)
        return found
    with _open_h5(path) as f:
        if kind == "keras3_weights":
            return _read_keras3(f, graph, path)
        return _read_legacy(f, graph, path)


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

    def put(self, layer: str, arrays: list[np.ndarray], names: list[str]):
        if arrays:
            self.arrays.setdefault(layer, []).extend(arrays)
            self.names.setdefault(layer, []).extend(names)


def merge_params(model: Model, found: _Found, path) -> Params:
    """Checks ``found`` against the model's variables and builds params, or raises
    one error listing every missing, unexpected and mis-shaped variable."""
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
        raise ModelFileError(f"{path} does not fit model {model.name!r}: " + "; ".join(problems)
                             + ". Check that the file was saved from this architecture")
    return {layer: {k: jnp.asarray(np.asarray(a, np.float32)) for k, a in vs.items()}
            for layer, vs in params.items()}


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
        _read_keras3_container(root, graph, (), found, path)
    except (OSError, KeyError, ValueError) as e:
        raise ModelFileError(f"cannot read weights from {path}: {_h5_reason(e)}; the file is truncated "
                             "or corrupt: save it again") from None
    return found


def _numbered(group: h5py.Group) -> list[np.ndarray]:
    keys = sorted((k for k in group.keys() if k.isdigit()), key=int)
    return [group[k][()] for k in keys]


def _read_keras3_container(g: h5py.Group, graph: Graph, scope, found: _Found, path) -> None:
    if "layers" not in g:
        return
    nodes = _container_layers(graph, scope)
    by_kname = {n.kname: n for n in nodes}
    auto = _auto_names(nodes)
    for key in g["layers"]:
        child = g["layers"][key]
        vars_g = child.get("vars")
        recorded = vars_g.attrs.get("name") if vars_g is not None else None
        if isinstance(recorded, bytes):
            recorded = recorded.decode()
        node = by_kname.get(recorded) if recorded else None
        if node is None:
            node = auto.get(key)
        arrays = _numbered(vars_g) if vars_g is not None else []
        if node is None:
            if arrays or "layers" in child:
                found.unmatched.append(str(recorded or key))
            continue
        if node.cls in ("Sequential", "Functional"):
            _read_keras3_container(child, graph, (*scope, node.kname), found, path)
            continue
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
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in vals]


def _read_legacy(root: h5py.Group, graph: Graph, path) -> _Found:
    found = _Found()
    layer_names = str_list_attr(root.attrs, "layer_names")
    if layer_names is None:
        raise ModelFileError(f"{path}: no layer_names attribute; not a Keras weights file")
    top = {n.kname: n for n in _container_layers(graph, ())}
    try:
        for lname in layer_names:
            if lname not in root:
                raise ModelFileError(f"{path}: layer_names lists {lname!r} but the file has no such group "
                                     "(truncated or corrupt file)")
            g = root[lname]
            wnames = str_list_attr(g.attrs, "weight_names") or []
            arrays = [g[w][()] for w in wnames]
            if not arrays:
                continue
            # A flat file may also name the layers of nested models directly.
            node = top.get(lname) or graph.by_name.get(lname)
            if node is None:
                found.unmatched.append(lname)
            elif node.cls in ("Sequential", "Functional"):
                _spread_nested(graph, (node.kname,), wnames, arrays, found)
            else:
                found.put(node.name, arrays, wnames)
    except (OSError, KeyError, ValueError) as e:
        raise ModelFileError(f"cannot read weights from {path}: {_h5_reason(e)}; the file is truncated "
                             "or corrupt: save it again") from None
    return found


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
