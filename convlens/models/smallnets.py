"""Small convnets, starting with the cats-vs-dogs convnet of *Deep Learning with
Python* (Chollet, ch. 5): 150x150x3 -> Conv 32/64/128/128 (3x3, ReLU), each
followed by 2x2 max-pooling -> Flatten -> Dropout(0.5) -> Dense 512 ReLU -> Dense 1
sigmoid. Layer names are the ones Keras gives a freshly built Sequential model.
"""

from __future__ import annotations

from convlens.models.keras_graph import graph_from_config
from convlens.models.network import Graph


def smallcnn_config(input_shape=(150, 150, 3), widths=(32, 64, 128, 128), hidden=512, dropout=0.5,
                    units=1, name="smallcnn") -> dict:
    """A Keras Sequential config of the book's convnet (``units`` > 1 gives a softmax head)."""
    layers = [{"class_name": "InputLayer", "config": {"batch_shape": [None, *input_shape], "name": "input_layer"}}]
    for i, w in enumerate(widths):
        sfx = f"_{i}" if i else ""
        layers.append({"class_name": "Conv2D", "config": {
            "name": f"conv2d{sfx}", "filters": w, "kernel_size": [3, 3], "activation": "relu", "padding": "valid"}})
        layers.append({"class_name": "MaxPooling2D", "config": {
            "name": f"max_pooling2d{sfx}", "pool_size": [2, 2], "strides": [2, 2], "padding": "valid"}})
    layers += [
        {"class_name": "Flatten", "config": {"name": "flatten"}},
        {"class_name": "Dropout", "config": {"name": "dropout", "rate": dropout}},
        {"class_name": "Dense", "config": {"name": "dense", "units": hidden, "activation": "relu"}},
        {"class_name": "Dense", "config": {"name": "dense_1", "units": units,
                                           "activation": "sigmoid" if units == 1 else "softmax"}},
    ]
    return {"class_name": "Sequential", "config": {"name": name, "layers": layers}}


def smallcnn(**kw) -> Graph:
    """The *Deep Learning with Python* cats-vs-dogs convnet as a `Graph`."""
    return graph_from_config(smallcnn_config(**kw))
