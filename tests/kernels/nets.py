"""Small test networks written as Keras configs (no Keras needed to build them)."""

from convlens.models.keras_graph import graph_from_config
from convlens.models.network import Model
from convlens.models.preprocess import Preprocess


def layer(cls, name, inbound, **cfg):
    cfg["name"] = name
    ins = [] if inbound is None else [inbound] if isinstance(inbound, str) else list(inbound)
    return {"class_name": cls, "name": name, "config": cfg,
            "inbound_nodes": [[[i, 0, 0, {}] for i in ins]] if ins else []}


def functional(name, layers, size):
    layers = [layer("InputLayer", "img", None, batch_shape=[None, *size])] + layers
    return Model(graph_from_config({"class_name": "Functional", "config": {
        "name": name, "layers": layers, "input_layers": [["img", 0, 0]],
        "output_layers": [[layers[-1]["name"], 0, 0]]}}), preprocess=Preprocess("rescale"))


def gap_net(classes=6):
    """conv -> conv -> GAP -> dense softmax: the structure CAM needs."""
    return functional("gapnet", [
        layer("Conv2D", "c1", "img", filters=8, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("MaxPooling2D", "p1", "c1", pool_size=[2, 2], strides=[2, 2], padding="valid"),
        layer("Conv2D", "c2", "p1", filters=12, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("GlobalAveragePooling2D", "gap", "c2"),
        layer("Dense", "pred", "gap", units=classes, activation="softmax"),
    ], (16, 16, 3))


def depthwise_net(classes=4):
    """conv -> depthwise (x2, stride 2) -> grouped conv -> separable -> GAP -> dense: every
    kind of grouped convolution the lowerings compute."""
    return functional("dwnet", [
        layer("Conv2D", "c1", "img", filters=8, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("DepthwiseConv2D", "dw", "c1", kernel_size=[3, 3], strides=[2, 2], padding="same", depth_multiplier=2,
              activation="relu"),
        layer("Conv2D", "g", "dw", filters=8, kernel_size=[3, 3], padding="valid", groups=4, activation="relu"),
        layer("SeparableConv2D", "sep", "g", filters=6, kernel_size=[5, 5], padding="same", dilation_rate=[2, 2],
              activation="relu"),
        layer("GlobalAveragePooling2D", "gap", "sep"),
        layer("Dense", "pred", "gap", units=classes, activation="softmax"),
    ], (17, 17, 3))


def mlp(classes=5):
    """flatten -> dense relu -> dense: small enough for a hand-written backward pass."""
    return functional("mlp", [
        layer("Flatten", "flat", "img"),
        layer("Dense", "hidden", "flat", units=16, activation="relu"),
        layer("Dense", "out", "hidden", units=classes, activation="linear"),
    ], (4, 4, 3))


def with_random_biases(model, seed):
    """Random init with random biases too, so no unit is silent by construction."""
    import jax.numpy as jnp
    import numpy as np
    params = model.init(seed)
    rng = np.random.default_rng(seed)
    for name in params:
        if "bias" in params[name]:
            params[name]["bias"] = jnp.asarray(rng.normal(0, 0.2, params[name]["bias"].shape), jnp.float32)
    return params


def binary_net(activation="sigmoid"):
    """`gap_net` ending in one sigmoid (or linear) unit: a two-class classifier."""
    return functional("binarynet", [
        layer("Conv2D", "c1", "img", filters=8, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("MaxPooling2D", "p1", "c1", pool_size=[2, 2], strides=[2, 2], padding="valid"),
        layer("Conv2D", "c2", "p1", filters=12, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("GlobalAveragePooling2D", "gap", "c2"),
        layer("Dense", "pred", "gap", units=1, activation=activation),
    ], (16, 16, 3))


def bn_residual_net(classes=5, pool="MaxPooling2D"):
    """conv -> maxpool (or ``pool``) -> conv+BN (no bias) -> relu -> [conv s2 + BN | 1x1 conv s2] -> Add
    -> relu -> avgpool -> flatten -> dense relu -> dense: every layer an LRP composite
    gives a rule (weighted, norm, pass, gradient) and both kinds of BatchNorm fold."""
    return functional("bnresnet", [
        layer("Conv2D", "c1", "img", filters=6, kernel_size=[3, 3], padding="same", activation="relu"),
        layer(pool, "p1", "c1", pool_size=[2, 2], strides=[2, 2], padding="valid"),
        layer("Conv2D", "c2", "p1", filters=8, kernel_size=[3, 3], padding="same", use_bias=False),
        layer("BatchNormalization", "bn2", "c2", epsilon=1e-3),
        layer("Activation", "r2", "bn2", activation="relu"),
        layer("Conv2D", "c3", "r2", filters=8, kernel_size=[3, 3], strides=[2, 2], padding="same"),
        layer("BatchNormalization", "bn3", "c3", epsilon=1e-3),
        layer("Conv2D", "sc", "r2", filters=8, kernel_size=[1, 1], strides=[2, 2], padding="valid"),
        layer("Add", "add", ["bn3", "sc"]),
        layer("ReLU", "r3", "add"),
        layer("AveragePooling2D", "ap", "r3", pool_size=[2, 2], strides=[1, 1], padding="valid"),
        layer("Flatten", "fl", "ap"),
        layer("Dense", "d1", "fl", units=10, activation="relu"),
        layer("Dense", "pred", "d1", units=classes, activation="softmax"),
    ], (16, 16, 3))


def random_params(model, seed, scale=0.3):
    """Every variable random (kernels ~ N(0, scale), biases and shifts ~ N(0, 0.2),
    normalisation scales and variances around 1): no unit silent, no fold trivial."""
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(seed)
    out = {}
    for name, vs in model.init(seed).items():
        out[name] = {}
        for k, a in vs.items():
            if k in ("gamma", "moving_variance"):
                v = rng.uniform(0.5, 1.5, a.shape)
            elif "kernel" in k:
                v = rng.normal(0, scale, a.shape)
            else:
                v = rng.normal(0, 0.2, a.shape)
            out[name][k] = jnp.asarray(v, jnp.float32)
    return out
