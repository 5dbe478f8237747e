"""A Keras callback that records convlens explanations while a model trains.

    from convlens.keras import ExplainCallback
    cb = ExplainCallback(x_val[:16], methods=["gradcam"], every=1, out="train.zarr",
                         target="label", labels=y_val[:16], preprocess="rescale")
    model.fit(x, y, epochs=10, callbacks=[cb])

At the end of every ``every`` epochs the callback reads the model's current weights
(no file round trip: on the JAX backend the arrays are passed as they are, on others
they are copied to numpy), runs the chosen methods on the fixed images through an
`convlens.training.ExplainRecorder`, and appends the results, with the epoch's logs,
along the store's ``epoch`` axis. The convlens model is built once, from the Keras
model's own config, when training starts; each method compiles once. Importing this
module imports Keras (the user's), never TensorFlow by itself.
"""

from __future__ import annotations

import json

import keras
import numpy as np

from convlens.errors import ConvlensError


def convlens_model(kmodel, preprocess: str = "none", class_names=None):
    """The convlens `Model` of a built Keras model (from ``to_json()``; nothing executed)."""
    from convlens.models.keras_graph import graph_from_config
    from convlens.models.network import Model
    from convlens.models.preprocess import Preprocess

    graph = graph_from_config(json.loads(kmodel.to_json()))
    return Model(graph, preprocess=Preprocess(preprocess), class_names=class_names)


def _keras_layer(kmodel, node):
    """The Keras layer object behind a convlens graph node (nested models followed)."""
    owner = kmodel
    for name in node.scope:
        owner = owner.get_layer(name)
    return owner.get_layer(node.kname)


def params_from_keras(model, kmodel) -> dict:
    """The params tree of ``model`` from the live weights of ``kmodel`` (same layer
    order and names as Keras's ``layer.weights``)."""
    on_jax = keras.backend.backend() == "jax"
    params = {}
    for node_name, specs in model.variable_specs().items():
        layer = _keras_layer(kmodel, model.graph.by_name[node_name])
        ws = layer.weights
        if len(ws) != len(specs):
            raise ConvlensError(f"layer {node_name!r} has {len(ws)} weights in Keras, convlens expects {len(specs)}")
        params[node_name] = {s.name: (w.value if on_jax else np.asarray(w.numpy())) for s, w in zip(specs, ws)}
    return params


class ExplainCallback(keras.callbacks.Callback):
    """Records convlens explanations of fixed ``images`` every ``every`` epochs.

    Args:
      images: pixels ``[N, H, W, 3]`` (0..255) at the model's input size.
      methods: method names or ``{method: options}`` (see ``convlens methods``).
      every: record after every ``every`` epochs (and never during batches).
      out: the Zarr store to write (``overwrite=True`` to replace one).
      target: ``top1`` / ``topk:N`` / class indices, or ``label`` (with ``labels``).
      preprocess: how pixels become the model's input (``none`` when the model rescales
        inside, ``rescale`` for /255 outside ...), as ``convlens --preprocess``.
      class_names: label names, for reports.
    """

    def __init__(self, images, methods=("gradcam",), *, every: int = 1, out="train.zarr", target="top1",
                 labels=None, preprocess: str = "none", class_names=None, seed: int = 0, overwrite: bool = False):
        super().__init__()
        if every < 1:
            raise ConvlensError("every must be at least 1")
        self.images, self.methods, self.every, self.out = np.asarray(images), methods, every, out
        self.target, self.labels, self.preprocess, self.class_names = target, labels, preprocess, class_names
        self.seed, self.overwrite = seed, overwrite
        self.recorder = None
        self.seconds: list[float] = []

    def on_train_begin(self, logs=None):
        from convlens.training import ExplainRecorder

        if self.recorder is None:
            self.cmodel = convlens_model(self.model, self.preprocess, self.class_names)
            self.recorder = ExplainRecorder(self.cmodel, self.images, self.methods, self.out, target=self.target,
                                            labels=self.labels, seed=self.seed, overwrite=self.overwrite,
                                            command="keras ExplainCallback")

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        params = params_from_keras(self.cmodel, self.model)
        self.seconds.append(self.recorder.record(epoch + 1, params, dict(logs or {})))

    def on_train_end(self, logs=None):
        if self.recorder is not None:
            self.recorder.close()
