"""Intermediate activations and raw filter weights."""

from __future__ import annotations

import jax.numpy as jnp

from convlens.errors import ConvlensError
from convlens.models.network import Model


def activations(model: Model, params, images, layers):
    """Outputs of ``layers`` (names, ``"all"`` or ``"conv"``) for pixels ``images
    [B, H, W, C]``, from one forward pass: ``{layer: [B, ...]}``."""
    return model.apply(params, model.preprocess(images), layers=layers)[1]


def filter_images(model: Model, params, layer: str) -> dict:
    """A conv layer's kernels as images, min-max normalised over the whole layer to [0, 1].

    Returns:
      ``kernel``: raw ``[kh, kw, c_in, c_out]`` (Keras's HWIO layout);
      ``filters``: for a layer reading RGB (3 input channels) ``[c_out, kh, kw, 3]``
      colour images, otherwise ``[c_out, c_in, kh, kw]`` grey tiles.
    """
    node = model.graph.node(layer)
    if node.kind != "conv":
        raise ConvlensError(f"{layer!r} is a {node.cls}, not a convolution; conv layers: "
                            + ", ".join(model.conv_layer_names))
    v = params[node.name]
    k = v["kernel"] if "kernel" in v else v["depthwise_kernel"]
    lo, hi = jnp.min(k), jnp.max(k)
    norm = (k - lo) / jnp.maximum(hi - lo, 1e-12)
    if k.shape[2] == 3:
        tiles = jnp.transpose(norm, (3, 0, 1, 2))
    else:
        tiles = jnp.transpose(norm, (3, 2, 0, 1))
    return {"kernel": k, "filters": tiles}
