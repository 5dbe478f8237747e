"""The keras.applications convnets as built-ins, without Keras.

``zoo/index.json`` and ``zoo/<name>.json.gz`` (written by ``tools/make_zoo.py`` from the
Keras the project is tested against) hold, per architecture, where Keras gets its
ImageNet weights (file name, address, published hash), the preprocessing those weights
expect and its input size, and the model config Keras writes for it with and without its
classifier (read only when that model is built). A built-in is built from that config by
the one Keras importer (`convlens.models.keras_graph`), so it is the same graph as the
Keras model, layer names included; nothing of Keras runs.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
from importlib import resources

from convlens.errors import ConvlensError
from convlens.models.keras_graph import graph_from_config
from convlens.models.network import Graph


@functools.lru_cache(maxsize=1)
def entries() -> dict:
    """Every architecture's record (see the module docstring), configs aside."""
    return json.loads(resources.files("convlens.models").joinpath("zoo", "index.json").read_text())


@functools.lru_cache(maxsize=4)
def configs(name: str) -> dict:
    """``{"top_config", "notop_config"}`` of architecture ``name``."""
    data = resources.files("convlens.models").joinpath("zoo", f"{name}.json.gz").read_bytes()
    return json.loads(gzip.decompress(data))


def names() -> list[str]:
    return list(entries())


def _input(config: dict) -> dict:
    layers = config["config"]["layers"]
    return next(e for e in layers if e.get("class_name") == "InputLayer")


def build(name: str, include_top: bool = True, input_shape=None, pooling: str | None = None) -> Graph:
    """The architecture ``name`` as a `Graph`: with or without its classifier, at
    ``input_shape`` ``(H, W, 3)`` (any size without the classifier, and with it for the
    convnets that pool globally), and for a headless network optionally followed by
    global ``avg`` or ``max`` pooling (Keras's ``pooling``)."""
    config = copy.deepcopy(configs(name)["top_config" if include_top else "notop_config"])
    if input_shape is not None:
        inp = _input(config)["config"]
        inp.pop("batch_input_shape", None)
        inp["batch_shape"] = [None, *input_shape]
    if pooling in ("avg", "max") and not include_top:
        layers = config["config"]["layers"]
        out = config["config"]["output_layers"][0][0]
        cls = "GlobalAveragePooling2D" if pooling == "avg" else "GlobalMaxPooling2D"
        layers.append({"class_name": cls, "name": f"{pooling}_pool", "config": {"name": f"{pooling}_pool"},
                       "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__", "config": {
                           "keras_history": [out, 0, 0]}}], "kwargs": {}}]})
        config["config"]["output_layers"] = [[f"{pooling}_pool", 0, 0]]
    elif pooling not in (None, "none"):
        raise ConvlensError(f"pooling {pooling!r}: avg, max or none (headless networks only)")
    try:
        graph = graph_from_config(config, name=name)
    except ConvlensError as e:
        raise ConvlensError(f"{name} at input {input_shape}: {e}") from None
    dependent = entries()[name].get("size_dependent_pads") or []
    if input_shape is not None and dependent:
        graph = repad(graph, set(dependent), tuple(input_shape[:2]))
    return graph


def _spatial(node, size: tuple[int, int]) -> tuple[int, int]:
    """A layer's output height and width from its input's (windowed layers, padding,
    cropping; everything else keeps the size)."""
    lt = node.layer_type
    if node.kind == "pad":
        (t, b), (l, r) = node.config["padding"]
        return size[0] + t + b, size[1] + l + r
    if node.kind == "crop":
        (t, b), (l, r) = node.config["cropping"]
        return size[0] - t - b, size[1] - l - r
    if lt.window is not None:
        k, s, padding, d = lt.window(node.config)
        if padding == "SAME":
            return tuple(-(-size[i] // s[i]) for i in range(2))
        return tuple((size[i] - (k[i] - 1) * d[i] - 1) // s[i] + 1 for i in range(2))
    return size


def repad(graph: Graph, dependent: set[str], size: tuple[int, int]) -> Graph:
    """``graph`` with the paddings Keras computes from their input's size
    (``imagenet_utils.correct_pad``: ``k // 2`` after, one less before on an even side)
    recomputed for input ``size``, ``k`` the kernel of the convolution each feeds."""
    import dataclasses
    consumers: dict[str, list] = {}
    for n in graph.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    sizes = {graph.input: size}
    nodes = []
    for node in graph.nodes:
        if node.name == graph.input:
            nodes.append(node)
            continue
        ins = [sizes.get(i) for i in node.inputs]
        if node.name in dependent and ins[0] is not None:
            # The window the pad serves: a convolution's kernel or (NASNet's reduction cells)
            # a pooling window.
            conv = next((c for c in consumers.get(node.name, []) if c.kind in ("conv", "pool")), None)
            if conv is not None:
                k = conv.config.get("kernel_size") or conv.config["pool_size"]
                h, w = ins[0]
                pad = ((k[0] // 2 - (1 - h % 2), k[0] // 2), (k[1] // 2 - (1 - w % 2), k[1] // 2))
                cfg = dict(node.config, padding=pad)
                node = dataclasses.replace(node, cfg=tuple(sorted(cfg.items())))
        nodes.append(node)
        sizes[node.name] = _spatial(node, ins[0]) if ins and ins[0] is not None else None
    return dataclasses.replace(graph, nodes=tuple(nodes))


def weights(name: str, include_top: bool) -> dict | None:
    """``{"fname", "url", "hash"}`` of the published ImageNet weights Keras loads."""
    e = entries().get(name)
    if e is None:
        return None
    w = e["weights"]["top" if include_top else "notop"]
    return w if w.get("url") else None
