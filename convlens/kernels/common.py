"""Pieces every gradient method shares: target choice, one forward pass with
gradients for many targets, and resizing maps to the input."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from convlens.errors import ConvlensError
from convlens.models.network import Model

Array = jax.Array
Targets = Array | int


def select_targets(logits: Array, targets: Targets) -> Array:
    """``[B, T]`` class indices: given, or the top-``targets`` classes of ``logits``
    (class scores: a binary model's two-class view, so its top class is the predicted one)."""
    if isinstance(targets, int):
        return jax.lax.top_k(logits, targets)[1].astype(jnp.int32)
    return targets.astype(jnp.int32)


def per_target(pull: Callable[[Array], Array], targets: Array, n_classes: int) -> Array:
    """Runs a pullback once per target column: cotangent one-hot ``[B, K]`` -> ``[B, T, ...]``."""
    cot = jax.nn.one_hot(targets, n_classes, dtype=jnp.float32)  # [B, T, K]
    return jax.vmap(pull, in_axes=1, out_axes=1)(cot)


def layer_gradients(model: Model, params, images: Array, layer: str, targets: Targets,
                    relu_rule: str = "standard"):
    """One forward pass; the activation at ``layer`` and the gradient of each target's
    logit with respect to it.

    Returns:
      ``(logits [B, K], targets [B, T], acts [B, h, w, c], grads [B, T, h, w, c])``.
    """
    x = model.preprocess(images)
    shape = jax.eval_shape(lambda: model.features(params, x, layer))

    def f(delta):
        logits, acts = model.apply(params, x, layers=[layer], perturb={layer: delta}, logits=True,
                                   relu_rule=relu_rule)
        return logits, acts[layer]

    (logits, acts), pull = jax.vjp(f, jnp.zeros(shape.shape, shape.dtype))
    t = select_targets(logits, targets)
    grads = per_target(lambda c: pull((c, jnp.zeros_like(acts)))[0], t, logits.shape[-1])
    return logits, t, acts, grads


def input_gradients(model: Model, params, images: Array, targets: Targets, relu_rule: str = "standard"):
    """Gradient of each target's logit with respect to the pixels, from one forward pass.

    Args:
      images: pixels ``[N, H, W, C]``; targets: ``[N, T]`` or top-k as an int.

    Returns:
      ``(logits [N, K], targets [N, T], grads [N, T, H, W, C])``.
    """
    def f(px):
        return model.apply(params, model.preprocess(px), logits=True, relu_rule=relu_rule)[0]

    logits, pull = jax.vjp(f, images)
    t = select_targets(logits, targets)
    return logits, t, per_target(lambda c: pull(c)[0], t, logits.shape[-1])


def probabilities(model: Model, logits: Array) -> Array:
    """Scores as the model reports them: softmax / sigmoid of the logits, or the logits."""
    act = model.output_activation
    if act == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if act == "sigmoid":
        return jax.nn.sigmoid(logits)
    return logits


def forward_logits(model: Model, params, images: Array) -> Array:
    return model.apply(params, model.preprocess(images), logits=True)[0]


def upsample(maps: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of ``[..., h, w]`` maps to ``[..., H, W]`` (half-pixel centres, as
    OpenCV's ``resize``)."""
    return jax.image.resize(maps, (*maps.shape[:-2], *size), method="bilinear")


def default_layer(model: Model) -> str:
    """The last layer with a spatial output that is not a pooling layer: for VGG16
    ``block5_conv3`` (Keras's Grad-CAM example), for ResNet50 ``conv5_block3_out``."""
    shapes = model.output_shapes()
    for node in reversed(model.graph.nodes):
        s = shapes[node.name]
        if len(s) == 4 and node.kind not in ("pool", "input") and s[1] * s[2] > 1:
            return node.name
    raise ConvlensError(f"model {model.name!r} has no spatial layer (4-D output) to explain")


FLATTENING = ("flatten", "reshape")  # layer kinds that turn positions into separate features


def head_kind(model: Model, layer: str) -> str:
    """How the class scores read ``layer``'s positions: ``"flatten"`` when a path from it
    to the output turns a spatial map into a vector position by position (Flatten /
    Reshape: each position has its own weights, so gradients averaged over positions
    cancel), ``"pooled"`` when every path pools over positions first (GAP heads: a
    position's weights are the same everywhere), ``"other"`` otherwise."""
    g = model.graph
    start = g.node(layer).name
    below = {start}
    for n in g.nodes[g.order[start] + 1:]:
        if below.intersection(n.inputs):
            below.add(n.name)
    above = {g.output}
    for n in reversed(g.nodes):
        if n.name in above:
            above.update(n.inputs)
    on_path = [n for n in g.nodes if n.name in below and n.name in above]
    shapes = model.output_shapes()
    # A 1x1 map (MobileNet's pooled-then-reshaped features) has a single position: nothing to cancel.
    if any(n.kind in FLATTENING and any(len(shapes[i]) == 4 and shapes[i][1] * shapes[i][2] > 1
                                       for i in n.inputs) for n in on_path):
        return "flatten"
    if any(n.kind == "global_pool" for n in on_path):
        return "pooled"
    return "other"


@dataclasses.dataclass(frozen=True)
class Choice:
    """The method convlens picks for a model when none is named, and why (in words)."""

    method: str
    why: str


def choose_method(model: Model, layer: str | None = None) -> Choice:
    """The method a run uses when none is named: Grad-CAM where the head pools ``layer``
    (default: `default_layer`) over its positions (GAP heads), HiRes-CAM where it flattens
    them (there Grad-CAM's position-averaged gradients cancel; HiRes-CAM's element-wise
    weights are the exact contributions). The one place this choice is made: the CLI, the
    Python API, live and the demo all ask here."""
    try:
        layer = layer or default_layer(model)
        if len(model.output_shapes()[model.graph.node(layer).name]) != 4:
            return Choice("gradcam", "")  # not spatial: the method's own error says so
    except ConvlensError:
        return Choice("gradcam", "")  # no such layer or no spatial layer: likewise
    kind = head_kind(model, layer)
    why = {"flatten": f"the head flattens {layer!r} position by position, where Grad-CAM's averaged gradients "
                      "cancel",
           "pooled": f"the head pools {layer!r} over its positions"}.get(
        kind, f"the head does not flatten {layer!r} position by position")
    return Choice("hirescam" if kind == "flatten" else "gradcam", why)


def default_method(model: Model, layer: str | None = None) -> str:
    """The name `choose_method` picks."""
    return choose_method(model, layer).method


def check_spatial_layer(model: Model, layer: str, method: str) -> str:
    node = model.graph.node(layer)
    shape = model.output_shapes()[node.name]
    if len(shape) != 4:
        spatial = [n for n, s in model.output_shapes().items() if len(s) == 4 and n != model.graph.input]
        raise ConvlensError(
            f"{method} needs a spatial layer (output [B, h, w, c]); {layer!r} ({node.cls}) outputs "
            f"{list(shape[1:])}. Spatial layers: {', '.join(spatial[-8:])}")
    return node.name


# ---------------------------------------------------------------- many forward passes per image
# Perturbation methods (occlusion, LIME, RISE, Score-CAM, Ablation-CAM) evaluate many
# modified copies of each image. Copies are built on the device a step at a time, ``per``
# copies of every image per forward pass, so peak memory follows the step, never the
# number of copies; which copies share a pass never changes a result.

def image_bytes(model: Model, size: tuple[int, int], skip: frozenset = frozenset(),
                after: str | None = None) -> int:
    """Peak activation bytes of one forward pass of one image: the largest layer's input
    and output together (XLA frees the rest of a forward-only pass as it goes).
    ``after``: count only the layers after this one (a head-only pass)."""
    shapes = model.output_shapes(1, size)
    names = list(shapes)
    if after is not None:
        names = names[names.index(model.graph.node(after).name):]
    sizes = [math.prod(shapes[n][1:]) for n in names if n not in skip]
    return 4 * 2 * max(sizes + [1])


def copies_per_step(chunk: int, memory_mb: int, batch: int, copies: int, per_image_bytes: int) -> int:
    """Copies of each image per forward pass (times ``batch`` images): ``chunk`` images a
    pass, or (``chunk`` 0) as many as ``memory_mb`` of activations allows."""
    images = chunk or max(1, (memory_mb << 20) // max(per_image_bytes, 1))
    per = max(1, min(images // max(batch, 1), copies))
    if chunk:
        return per
    # As few steps as the budget allows, evenly filled: padding the last step wastes work
    # (169 positions at 41 per step would compute 205).
    steps = -(-copies // per)
    return -(-copies // steps)


def index_steps(idx: Array, per: int) -> Array:
    """Copy indices ``[B, Q]`` -> ``[steps, B, per]`` (the last step padded by repeating
    the last index; `map_steps` drops the padding)."""
    b, q = idx.shape
    n = -(-q // per)
    if n * per > q:
        idx = jnp.concatenate([idx, jnp.repeat(idx[:, -1:], n * per - q, axis=1)], axis=1)
    return jnp.moveaxis(idx.reshape(b, n, per), 1, 0)


def map_steps(fn: Callable[[Array], Array], idx: Array, per: int) -> Array:
    """``fn(indices [B, per]) -> [B, per, ...]`` over copy indices ``idx [B, Q]``, ``per``
    at a time (one `lax.map`), as ``[B, Q, ...]``."""
    q = idx.shape[1]
    out = jax.lax.map(fn, index_steps(idx, per))  # [steps, B, per, ...]
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(out.shape[0], -1, *out.shape[3:])[:, :q]


def target_scores(model: Model, logits: Array, targets: Array, score: str = "logit") -> Array:
    """Each target's score: logits ``[B, ..., K]`` (e.g. ``[B, copies, K]``) and targets
    ``[B, T]`` -> ``[B, ..., T]``; the logit, or (``score="prob"``) the probability the
    model reports (softmax/sigmoid)."""
    if score == "prob":
        logits = probabilities(model, logits)
    elif score != "logit":
        raise ConvlensError(f"unknown score {score!r}: logit or prob")
    t = targets.reshape(targets.shape[0], *([1] * (logits.ndim - 2)), targets.shape[-1])
    return jnp.take_along_axis(logits, jnp.broadcast_to(t, (*logits.shape[:-1], targets.shape[-1])), axis=-1)
