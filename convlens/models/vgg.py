"""VGG16 and VGG19 (Simonyan & Zisserman 2014) with Keras's layer names.

The builder writes the same model config ``keras.applications.VGG16`` writes, and
the config goes through the one Keras importer, so a built-in VGG and a VGG read
from a Keras file are the same graph by construction.
"""

from __future__ import annotations

from functools import partial

from convlens.models.keras_graph import graph_from_config
from convlens.models.network import Graph


def _layer(cls, name, inbound, **config):
    config["name"] = name
    return {"class_name": cls, "name": name, "config": config,
            "inbound_nodes": [] if inbound is None else [[[inbound, 0, 0, {}]]]}


def vgg_config(blocks=(2, 2, 3, 3, 3), widths=(64, 128, 256, 512, 512), *, include_top=True,
               input_shape=None, classes=1000, hidden=4096, pooling=None, name="vgg") -> dict:
    """A Keras functional config of a VGG network.

    Args:
      blocks: conv layers per block (VGG16: 2,2,3,3,3; VGG19: 2,2,4,4,4).
      widths: filters per block.
      include_top: add ``flatten``, ``fc1``, ``fc2`` and ``predictions`` (softmax).
      input_shape: ``(H, W, 3)``; defaults to 224x224 with the top and any size without.
      classes, hidden: classifier sizes.
      pooling: without the top, ``"avg"`` or ``"max"`` global pooling, as in Keras.
    """
    if input_shape is None:
        input_shape = (224, 224, 3) if include_top else (None, None, 3)
    layers = [_layer("InputLayer", "input_layer", None, batch_shape=[None, *input_shape])]
    prev = "input_layer"
    for b, (n, w) in enumerate(zip(blocks, widths), start=1):
        for i in range(1, n + 1):
            lname = f"block{b}_conv{i}"
            layers.append(_layer("Conv2D", lname, prev, filters=w, kernel_size=[3, 3], strides=[1, 1],
                                 padding="same", activation="relu", use_bias=True))
            prev = lname
        lname = f"block{b}_pool"
        layers.append(_layer("MaxPooling2D", lname, prev, pool_size=[2, 2], strides=[2, 2], padding="valid"))
        prev = lname
    if include_top:
        layers.append(_layer("Flatten", "flatten", prev))
        layers.append(_layer("Dense", "fc1", "flatten", units=hidden, activation="relu"))
        layers.append(_layer("Dense", "fc2", "fc1", units=hidden, activation="relu"))
        layers.append(_layer("Dense", "predictions", "fc2", units=classes, activation="softmax"))
        prev = "predictions"
    elif pooling in ("avg", "max"):
        cls = "GlobalAveragePooling2D" if pooling == "avg" else "GlobalMaxPooling2D"
        layers.append(_layer(cls, f"global_{pooling}_pool", prev))
        prev = f"global_{pooling}_pool"
    return {"class_name": "Functional", "config": {
        "name": name, "layers": layers, "input_layers": [["input_layer", 0, 0]],
        "output_layers": [[prev, 0, 0]]}}


def vgg(blocks=(2, 2, 3, 3, 3), widths=(64, 128, 256, 512, 512), *, name="vgg", **kw) -> Graph:
    """A VGG `Graph`; see `vgg_config` for the options."""
    return graph_from_config(vgg_config(blocks, widths, name=name, **kw))


vgg16 = partial(vgg, (2, 2, 3, 3, 3), name="vgg16")
vgg19 = partial(vgg, (2, 2, 4, 4, 4), name="vgg19")
# Same structure, ~1/16 of the width: for tests that need a VGG but not its cost.
vgg_tiny = partial(vgg, (2, 2, 3, 3, 3), (4, 8, 16, 32, 32), hidden=32, name="vgg_tiny")
