"""The Python API: ``convlens.explain(model, params, images, method=..., target=...)``.

Validates the user's input (one-line errors), resolves the method's config and target,
compiles once per (model, method, config, target mode) and returns host arrays with
their dimension names.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convlens.errors import ConvlensError
from convlens.kernels import common
from convlens.kernels.registry import METHODS, MethodSpec, all_outputs
from convlens.models.network import Model


@dataclasses.dataclass
class Explanation:
    """Result of `explain`: host arrays, each with declared dimension names.

    Attributes:
      method, config: what ran (``config.layer`` resolved to a real layer).
      outputs: ``{name: array}``, e.g. ``heatmap [B, T, H, W]``.
      dims: ``{name: dimension names}``.
      targets: ``[B, T]`` class indices explained; logits ``[B, K]``.
    """

    method: str
    config: Any
    outputs: dict[str, np.ndarray]
    dims: dict[str, tuple[str, ...]]
    targets: np.ndarray
    logits: np.ndarray

    @property
    def layer(self) -> str | None:
        return getattr(self.config, "layer", None)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def parse_target(target, n_images: int, n_classes: int) -> np.ndarray | int:
    """``"top1"``, ``"top5"``/``"topk:5"``, a class index, a list of indices (for every
    image), or an array ``[B]`` / ``[B, T]`` -> top-k as an int, or indices ``[B, T]``."""
    if isinstance(target, str):
        m = re.fullmatch(r"top(?:k:|-)?(\d+)", target.strip().lower())
        if m:
            k = int(m.group(1))
            if not 1 <= k <= max(n_classes, 1):
                raise ConvlensError(f"target {target!r}: the model has {n_classes} classes")
            return k
        try:
            target = [int(t) for t in target.split(",")]
        except ValueError:
            raise ConvlensError(f"target {target!r} is not top1/top5/topk:N or class indices like 281,285") from None
    arr = np.asarray(target)
    if arr.dtype.kind not in "iu":
        raise ConvlensError(f"targets must be integer class indices, got {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full((n_images, 1), int(arr))
    elif arr.ndim == 1 and not (hasattr(target, "shape") and len(arr) == n_images):
        arr = np.broadcast_to(arr[None, :], (n_images, len(arr)))
    elif arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n_images:
        raise ConvlensError(f"targets of shape {arr.shape} do not fit {n_images} images: give [B] or [B, T]")
    bad = arr[(arr < 0) | (arr >= n_classes)]
    if bad.size:
        raise ConvlensError(f"target class {int(bad.flat[0])} is out of range: the model has {n_classes} "
                            f"classes (0..{n_classes - 1})")
    return arr.astype(np.int32)


def check_images(model: Model, images) -> np.ndarray:
    """Pixels as float32 ``[B, H, W, C]`` (one image ``[H, W, C]`` is accepted)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ConvlensError(f"images must be [B, H, W, C] (or one [H, W, C]); got shape {x.shape}")
    if x.shape[-1] != model.channels:
        raise ConvlensError(f"images have {x.shape[-1]} channels; model {model.name!r} takes {model.channels} "
                            "(convert grey/RGBA images to RGB)")
    h, w, _ = model.graph.input_shape
    if (h is not None and x.shape[1] != h) or (w is not None and x.shape[2] != w):
        raise ConvlensError(f"images are {x.shape[1]}x{x.shape[2]}; model {model.name!r} takes {h}x{w}: "
                            "resize them first")
    if x.dtype.kind not in "uif":
        raise ConvlensError(f"images must be numeric pixels (0..255), got dtype {x.dtype}")
    return x.astype(np.float32)


def resolve_config(model: Model, spec: MethodSpec, options: dict):
    """The method's config from keyword options, with ``layer`` checked and resolved."""
    names = {f.name for f in dataclasses.fields(spec.config)}
    unknown = set(options) - names
    if unknown:
        raise ConvlensError(f"method {spec.name!r} has no option {', '.join(sorted(unknown))}; "
                            f"its options: {', '.join(sorted(names)) or 'none'}")
    cfg = spec.config(**options)
    if spec.uses_layer:
        if spec.name == "cam":
            from convlens.kernels.cam import cam_structure
            layer = cam_structure(model)[0]
            if cfg.layer not in (None, layer):
                raise ConvlensError(f"CAM is defined at {layer!r} (the layer feeding the global pooling), not "
                                    f"{cfg.layer!r}: drop the layer option")
        else:
            layer = common.check_spatial_layer(model, cfg.layer or common.default_layer(model), spec.name)
        cfg = dataclasses.replace(cfg, layer=layer)
    return cfg


@functools.lru_cache(maxsize=64)
def compiled(model: Model, method: str, cfg, top_k: int | None):
    """One jitted kernel per (model, method, config, target mode); params are arguments,
    never constants."""
    spec = METHODS[method]

    def run(params, images, targets, keys):
        return spec.explain(model, params, images, top_k if top_k is not None else targets, cfg, keys)
    return jax.jit(run)


def image_keys(key, start: int, n: int):
    """Per-image keys ``fold_in(key, global index)``: an image's noise never depends on
    its batch or position in a call."""
    base = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + n))


def explain(model: Model, params, images, method: str = "gradcam", *, target="top1", key=0,
            batch_size: int | None = None, **options) -> Explanation:
    """Explains ``images`` with one method.

    Args:
      model, params: from `convlens.load_model`.
      images: pixels ``[B, H, W, C]`` (uint8 or float 0..255) at the model's input size.
      method: a name in `convlens.METHODS`.
      target: ``"top1"`` (default), ``"top5"``, a class index, a list of indices for every
        image, or an array ``[B]`` / ``[B, T]`` of per-image indices.
      key: an int seed or a JAX key (stochastic methods).
      batch_size: images per compiled call (default: all at once); the last batch is
        padded so nothing recompiles.
      **options: the method's config fields, e.g. ``layer="block5_conv3"``, ``samples=25``.

    Returns:
      An `Explanation`; e.g. Grad-CAM's ``heatmap`` is ``[B, T, H, W]``.
    """
    if method not in METHODS:
        raise ConvlensError(f"unknown method {method!r}; methods: {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    x = check_images(model, images)
    n_classes = model.output_shapes()[model.graph.output][-1]
    tgt = parse_target(target, len(x), n_classes)
    cfg = resolve_config(model, spec, options)
    top_k = tgt if isinstance(tgt, int) else None
    fn = compiled(model, method, cfg, top_k)
    bs = min(batch_size or len(x), len(x))
    pieces = []
    for start in range(0, len(x), bs):
        chunk = x[start:start + bs]
        n = len(chunk)
        t = None if top_k is not None else tgt[start:start + n]
        if n < bs:  # pad to the compiled batch shape; padded rows are dropped below
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
            t = None if t is None else np.concatenate([t, np.repeat(t[-1:], bs - n, axis=0)])
        out = fn(params, jnp.asarray(chunk), None if t is None else jnp.asarray(t), image_keys(key, start, bs))
        pieces.append({k: np.asarray(v)[:n] for k, v in jax.device_get(out).items()})
    merged = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    dims = {o.name: o.dims for o in all_outputs(spec)}
    outputs = {k: v for k, v in merged.items() if k not in ("targets", "logits")}
    return Explanation(method, cfg, outputs, dims, merged["targets"], merged["logits"])
