"""The Python API: ``convlens.explain(model, params, images, method=..., target=...)``.

A thin facade over the engine: it checks the user's input (one-line errors), resolves
the method's config and the target, and hands the work to the `Executor`, which compiles
once per (model, method, config, target mode), pads the last batch and makes the
per-image keys.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from convlens.errors import ConvlensError
from convlens.models.network import Model
from convlens.pixels import check_images


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

    @property
    def heatmap(self) -> np.ndarray | None:
        """The method's map at input resolution ``[B, T, H, W]`` (``None`` if it has none)."""
        from convlens.kernels.registry import METHODS
        name = METHODS[self.method].heatmap
        return None if name is None else self.outputs[name]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def resolve(model: Model, method: str, options: dict | None = None):
    """``method``'s config for ``model`` from keyword options (checked, layer resolved)."""
    from convlens.kernels.registry import resolve as _resolve
    return _resolve(model, method, options)


def explain(model: Model, params, images, method: str | None = None, *, target="top1", key=0,
            batch_size: int | None = None, **options) -> Explanation:
    """Explains ``images`` with one method.

    Args:
      model, params: from `convlens.load_model`.
      images: pixels ``[B, H, W, C]`` (uint8 or float 0..255) at the model's input size.
      method: a name in `convlens.METHODS`; default: the one `default_method` picks from
        the graph (Grad-CAM on a GAP head, HiRes-CAM on a Flatten head), named in the
        result's ``method``.
      target: ``"top1"`` (default), ``"top5"``, a class index, a list of indices for every
        image, an array ``[B]`` / ``[B, T]`` of per-image indices, or ``"positive"`` /
        ``"positive:T"`` (a multi-label model's classes above probability 0.5; the slots
        of other classes hold target -1 and NaN maps).
      key: an int seed or a JAX key (stochastic methods); image ``i`` uses ``fold_in(key, i)``.
      batch_size: images per compiled call (default: all at once); the last batch is
        padded so nothing recompiles.
      **options: the method's config fields, e.g. ``layer="block5_conv3"``, ``samples=25``.

    Returns:
      An `Explanation`; e.g. Grad-CAM's ``heatmap`` is ``[B, T, H, W]``.
    """
    from convlens.engine import targets as tg
    from convlens.engine.executor import Executor, Explain
    from convlens.kernels.common import default_method
    from convlens.kernels.registry import METHODS
    from convlens.models.labels import class_probabilities

    method = method or default_method(model)
    cfg = resolve(model, method, options)
    spec = METHODS[method]
    x = check_images(model, images)
    t = tg.parse(target, len(x), tg.n_classes(model), labelled=False)
    if batch_size is not None and batch_size < 1:
        raise ConvlensError("batch_size must be at least 1")
    bs = min(batch_size or len(x), len(x))
    comp = Explain(model, method, cfg, t.top_k)
    inputs = {"images": x}
    if t.top_k is None:
        inputs["targets"] = t.for_items(np.arange(len(x)))
    # Measuring XLA settings pays off only for repeated work: several batches of it.
    with Executor(params, batch=bs, key=key, tune=-(-len(x) // bs) >= 4) as ex:
        merged = ex.map({method: comp}, inputs)[method]
    bad = [name for name, v in merged.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        warnings.warn(f"{method} produced non-finite values in {', '.join(bad)} (check its options and the "
                      "model's outputs)", RuntimeWarning, stacklevel=2)
    merged = tg.mask_positives(merged, spec.dims, class_probabilities(merged["logits"], model.output_activation), t)
    outputs = {k: v for k, v in merged.items() if k not in ("targets", "logits")}
    return Explanation(method, cfg, outputs, spec.dims, merged["targets"], merged["logits"])
