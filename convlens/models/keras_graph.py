"""Build a convlens `Graph` from a Keras model config (the JSON Keras writes).

Reads Keras 3 and Keras 2 configs of Sequential and functional models, nested
models included. Nested models are flattened: their layers join the outer graph
under their own names (prefixed ``outer/`` only on a name clash) and the nested
model's own name stays available as an identity layer on its output, so both
``vgg16`` and ``block5_conv3`` name activations as they do in Keras.

Nothing in a config is ever executed: ``Lambda`` layers and custom classes are
refused with an error naming the layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from convlens.errors import InvalidLayerError, UnsupportedLayerError
from convlens.models.layers import CODE_LAYERS, KERAS_APP_LAYERS, KERAS_APP_OPTIONS, LAYER_TYPES, OP_PREFIX, OPS
from convlens.models.network import Graph, Node

MODEL_CLASSES = ("Functional", "Model", "Sequential")


def supported_layers() -> list[str]:
    return sorted(k for k in LAYER_TYPES if k not in ("Sequential", "Functional") and not k.startswith(OP_PREFIX))


def graph_from_config(model_config: dict, name: str | None = None) -> Graph:
    """Converts a Keras model config (``{"class_name": ..., "config": ...}``) to a `Graph`."""
    if not isinstance(model_config, dict) or model_config.get("class_name") not in MODEL_CLASSES:
        got = model_config.get("class_name") if isinstance(model_config, dict) else type(model_config).__name__
        raise UnsupportedLayerError(
            f"the file's model is a {got!r}, not a Keras Sequential or functional model; "
            "convlens imports those only (subclassed models have no config to read)")
    b = _Builder()
    inp, out = b.model(model_config, scope=(), feed=None)
    mname = name or model_config["config"].get("name") or "model"
    return Graph(mname, tuple(_toposort(b.nodes)), inp, out)


class _Builder:
    def __init__(self):
        self.nodes: list[Node] = []
        self.names: set[str] = set()

    def unique(self, name: str, scope: tuple[str, ...]) -> str:
        if name not in self.names:
            return name
        full = "/".join((*scope, name))
        i = 1
        cand = full
        while cand in self.names:
            cand = f"{full}_{i}"
            i += 1
        return cand

    def add(self, node: Node) -> None:
        self.names.add(node.name)
        self.nodes.append(node)

    def model(self, entry: dict, scope: tuple[str, ...], feed: str | None) -> tuple[str, str]:
        """Adds a (possibly nested) model's layers; returns (input node, output node)."""
        cls = entry["class_name"]
        cfg = entry.get("config", {})
        if cls == "Sequential":
            return self.sequential(cfg, scope, feed)
        return self.functional(cfg, scope, feed)

    def layer(self, entry: dict, scope, inputs: list[str], rename: dict[str, str]) -> str:
        """Adds one layer (or a nested model) fed by ``inputs``; returns its node name."""
        cls = entry.get("class_name")
        cfg = entry.get("config", {}) or {}
        lname = entry.get("name") or cfg.get("name") or cls
        if cls in MODEL_CLASSES:
            if len(inputs) != 1:
                raise UnsupportedLayerError(f"nested model {lname!r} takes {len(inputs)} inputs; convlens supports one")
            _, out = self.model(entry, (*scope, lname), inputs[0])
            name = self.unique(lname, scope)
            self.add(Node(name, "Sequential" if cls == "Sequential" else "Functional", (), (out,), scope,
                          lname if name != lname else ""))
            rename[lname] = name
            return name
        if _is_op(entry):
            return self.op(entry, scope, inputs, rename, lname)
        _check_class(entry, lname)
        lt = LAYER_TYPES[cls]
        if not isinstance(cfg, dict):
            raise InvalidLayerError(f"layer {lname!r} ({cls}) has a config of type {type(cfg).__name__}, not a dict")
        try:
            parsed = lt.parse(cfg, lname)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            # A config no Keras version writes: name the layer, never a traceback.
            raise InvalidLayerError(f"layer {lname!r} ({cls}) has an invalid config ({type(e).__name__}: {e}); "
                                    "the model file is damaged or was not written by Keras") from None
        if lt.n_inputs is not None and len(inputs) != lt.n_inputs:
            raise UnsupportedLayerError(
                f"layer {lname!r} ({cls}) is called on {len(inputs)} inputs; it takes {lt.n_inputs}")
        if lt.n_inputs is None and not inputs:
            raise UnsupportedLayerError(f"layer {lname!r} ({cls}) is called on no inputs")
        name = self.unique(lname, scope)
        rename[lname] = name
        self.add(Node(name, cls, tuple(sorted(parsed.items())), tuple(inputs), scope,
                      lname if name != lname else ""))
        return name

    def op(self, entry: dict, scope, inputs: list[str], rename, lname: str) -> str:
        """An operation node (``x + 3.0``): its arguments, tensors and constants, in order."""
        cls = entry["class_name"]
        nodes = entry.get("inbound_nodes") or []
        args = nodes[0].get("args", []) if nodes and isinstance(nodes[0], dict) else None
        if args is None or (nodes[0].get("kwargs") or {}):
            raise UnsupportedLayerError(f"operation {lname!r} ({cls}) has arguments convlens cannot read")
        template = []
        for a in args:
            if isinstance(a, dict) and a.get("class_name") == "__keras_tensor__":
                template.append(("t",))
            elif _numeric(a):
                template.append(("c", _freeze(a)))
            else:
                raise UnsupportedLayerError(f"operation {lname!r} ({cls}) takes an argument convlens cannot read: "
                                            f"{str(a)[:80]}")
        if sum(1 for t in template if t[0] == "t") != len(inputs) or not inputs:
            raise UnsupportedLayerError(f"operation {lname!r} ({cls}) is called on {len(inputs)} tensors")
        name = self.unique(lname, scope)
        rename[lname] = name
        self.add(Node(name, OP_PREFIX + cls, (("template", tuple(template)),), tuple(inputs), scope,
                      lname if name != lname else ""))
        return name

    def input_node(self, entry: dict, scope, rename) -> str:
        cfg = entry.get("config", {})
        lname = entry.get("name") or cfg.get("name")
        parsed = LAYER_TYPES["InputLayer"].parse(cfg, lname)
        if parsed["shape"] is None:
            raise UnsupportedLayerError(f"input layer {lname!r} has no shape in the config")
        if len(parsed["shape"]) != 3:
            raise UnsupportedLayerError(
                f"input layer {lname!r} has shape {parsed['shape']}; convlens explains image models "
                "with inputs of shape (height, width, channels)")
        name = self.unique(lname, scope)
        rename[lname] = name
        self.add(Node(name, "InputLayer", tuple(sorted(parsed.items())), (), scope,
                      lname if name != lname else ""))
        return name

    def sequential(self, cfg: dict, scope, feed: str | None) -> tuple[str, str]:
        layers = list(cfg.get("layers", []))
        rename: dict[str, str] = {}
        if layers and layers[0].get("class_name") == "InputLayer":
            first = layers.pop(0)
            cur = feed if feed is not None else self.input_node(first, scope, rename)
        elif feed is not None:
            cur = feed
        else:
            shape = cfg.get("build_input_shape")
            if shape is None and layers:
                lc = layers[0].get("config", {})
                shape = lc.get("batch_input_shape") or lc.get("batch_shape")
            if shape is None:
                if layers and layers[0].get("class_name") in MODEL_CLASSES:
                    # The first layer is a model with its own input: it becomes the input.
                    first = layers.pop(0)
                    inp, out = self.model(first, (*scope, _entry_name(first)), None)
                    name = self.unique(_entry_name(first), scope)
                    cls = "Sequential" if first["class_name"] == "Sequential" else "Functional"
                    self.add(Node(name, cls, (), (out,), scope))
                    return inp, self._chain(layers, scope, name, rename)
                raise UnsupportedLayerError(
                    "the Sequential model has no input shape in its config; rebuild it with keras.Input(shape)")
            cur = self.input_node({"config": {"batch_shape": shape, "name": "input_layer"}}, scope, rename)
        inp = cur
        return inp, self._chain(layers, scope, cur, rename)

    def _chain(self, layers, scope, cur, rename) -> str:
        for entry in layers:
            cur = self.layer(entry, scope, [cur], rename)
        return cur

    def functional(self, cfg: dict, scope, feed: str | None) -> tuple[str, str]:
        layers = cfg.get("layers", [])
        ins = _endpoints(cfg.get("input_layers"))
        outs = _endpoints(cfg.get("output_layers"))
        if len(ins) != 1 or len(outs) != 1:
            raise UnsupportedLayerError(
                f"model {cfg.get('name')!r} has {len(ins)} inputs and {len(outs)} outputs; "
                "convlens explains single-input, single-output image models")
        rename: dict[str, str] = {}
        inp = None
        for entry in layers:
            lname = _entry_name(entry)
            nodes = entry.get("inbound_nodes") or []
            if entry.get("class_name") == "InputLayer":
                if feed is not None:
                    rename[lname] = feed
                    inp = feed
                else:
                    inp = self.input_node(entry, scope, rename)
                continue
            if len(nodes) != 1:
                raise UnsupportedLayerError(
                    f"layer {lname!r} is called {len(nodes)} times in the model (a shared layer); "
                    "convlens supports layers called once")
            sources = [h for h in _inbound(nodes[0])]
            for src in sources:
                if src not in rename:
                    raise UnsupportedLayerError(
                        f"layer {lname!r} takes input from {src!r}, which is not defined before it in the config")
            self.layer(entry, scope, [rename[s] for s in sources], rename)
        if inp is None:
            raise UnsupportedLayerError(f"model {cfg.get('name')!r} has no InputLayer in its config")
        if outs[0] not in rename:
            raise UnsupportedLayerError(f"model output {outs[0]!r} is not a layer of the config")
        return inp, rename[outs[0]]


def _entry_name(entry: dict) -> str:
    return entry.get("name") or entry.get("config", {}).get("name")


def _check_class(entry: dict, lname: str) -> None:
    cls = entry.get("class_name")
    if cls in CODE_LAYERS:
        raise UnsupportedLayerError(
            f"layer {lname!r} is a {cls} layer, which holds Python code; convlens never executes code "
            "from a model file: replace it with built-in layers and save the model again")
    reg = entry.get("registered_name")
    module = entry.get("module") or ""
    if cls in KERAS_APP_LAYERS:
        # Legacy .h5 configs name no module: accepted when the options are exactly those of
        # Keras's class (a user's own class of that name would rarely have the same ones).
        own = set(entry.get("config") or {}) - {"name", "trainable", "dtype"}
        if not module and not reg and own == KERAS_APP_OPTIONS[cls]:
            return
        if module != KERAS_APP_LAYERS[cls]:
            raise UnsupportedLayerError(
                f"layer {lname!r} is a {cls} from {module or 'an unknown module'!r}, not Keras's own "
                f"{KERAS_APP_LAYERS[cls]}; convlens imports only the keras.applications class of that name")
        return
    if cls not in LAYER_TYPES or (reg and reg != cls and ">" in str(reg)) or (
            module and not module.startswith("keras")):
        raise UnsupportedLayerError(
            f"layer {lname!r} has type {reg or cls!r}, which convlens cannot import "
            f"(custom objects are never loaded); supported types: {', '.join(supported_layers())}")


def _is_op(entry: dict) -> bool:
    """Whether a config entry is a Keras 3 operation node (``keras.src.ops.numpy.Add`` ...)."""
    module = entry.get("module") or ""
    if not module.startswith("keras.src.ops."):
        return False
    if entry.get("class_name") not in OPS:
        raise UnsupportedLayerError(f"operation {entry.get('name')!r} ({module}.{entry.get('class_name')}) is not "
                                    f"one convlens computes; supported operations: {', '.join(sorted(OPS))}")
    return True


def _numeric(a) -> bool:
    if isinstance(a, bool):
        return False
    if isinstance(a, (int, float)):
        return True
    return isinstance(a, list) and len(a) <= 4096 and all(_numeric(b) for b in a)


def _freeze(a):
    return tuple(_freeze(b) for b in a) if isinstance(a, list) else float(a)


def _endpoints(spec: Any) -> list[str]:
    """``input_layers``/``output_layers`` come as ``[name, i, j]`` or a list of those."""
    if spec is None:
        return []
    if isinstance(spec, list) and spec and isinstance(spec[0], str):
        return [spec[0]]
    return [s[0] for s in spec]


def _inbound(node: Any) -> Iterator[str]:
    """Source layer names of one call node, Keras 3 (``args``) or Keras 2 (lists)."""
    if isinstance(node, dict) and "args" in node:
        yield from _tensors(node["args"])
        return
    for item in node:  # Keras 2: [[layer, node_index, tensor_index, kwargs], ...]
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], str):
            if len(item) > 2 and item[2]:
                raise UnsupportedLayerError(f"layer output {item[0]!r}[{item[2]}]: multi-output layers are not supported")
            yield item[0]


def _tensors(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            hist = obj["config"]["keras_history"]
            if hist[2]:
                raise UnsupportedLayerError(f"layer output {hist[0]!r}[{hist[2]}]: multi-output layers are not supported")
            yield hist[0]
        return
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def _toposort(nodes: list[Node]) -> list[Node]:
    """Stable topological order (Keras configs are usually ordered already)."""
    done: set[str] = set()
    out: list[Node] = []
    pending = list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in done for i in n.inputs):
                out.append(n)
                done.add(n.name)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise UnsupportedLayerError("the model graph has a cycle or a dangling input: "
                                        + ", ".join(sorted(n.name for n in rest)[:5]))
        pending = rest
    return out
