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


def evaluate(metric: str, model: Model | None = None, params=None, images=None, targets=None, maps=None, *,
             method: str | None = None, method_options: dict | None = None, masks=None, segments=None, key=0,
             batch_size: int | None = None, replay: dict | None = None, **options) -> dict[str, np.ndarray]:
    """Scores explanation maps with one quality metric: convlens's
    ``quantus.Metric(...)(model, x_batch, y_batch, a_batch)``.

    Args:
      metric: a metric's name (``convlens metrics`` lists them with their options).
      model, params: the classifier, for metrics that score images, re-run the method or
        randomise its weights (``convlens metrics`` says which need it).
      images: pixels ``[B, H, W, C]`` (0..255) at the model's input size.
      targets: the classes the maps explain ``[B]``; default: each image's top class.
      maps: ``[B, H, W]`` (an `Explanation`'s ``heatmap [B, T, H, W]`` gives its first
        target's); default: ``method``'s maps, computed here.
      method: the method the maps come from (robustness and randomisation metrics re-run
        it); its options in ``method_options``.
      masks: object masks ``[B, H, W]`` (localisation metrics).
      segments: superpixels ``[B, H, W]`` (IROF; default: SLIC, as Quantus).
      key: an int seed or a JAX key; item ``i`` draws from ``fold_in(key, i)``, so a score
        does not depend on the batch size.
      batch_size: items per compiled call (default: all at once).
      replay: arrays replacing the metric's draws (``noises``, ``subsets``, ``fills``,
        ``y_off``: see `convlens.METRICS[metric].replay`), for parity with another
        implementation; the batch is then computed at once.
      **options: the metric's options, checked against its declaration (``steps=16``).

    Returns:
      ``{"score": [B], ...}``: the score (NaN where undefined) and whatever else the
      metric gives per item (``curve [B, S]`` ...).

    Example::

        e = convlens.explain(model, params, x, "gradcam")
        convlens.evaluate("pixel_flipping", model, params, x, e.targets[:, 0], e.heatmap, steps=32)
        convlens.evaluate("avg_sensitivity", model, params, x, maps=e.heatmap, method="gradcam")
        convlens.evaluate("sparseness", maps=e.heatmap)
    """
    from convlens.engine.quality import Plan, evaluate as run, layers_with_weights, superpixels
    from convlens.engine.targets import n_classes
    from convlens.kernels.metrics.registry import METRICS, resolve as resolve_metric
    from convlens.kernels.registry import METHODS

    cfg = resolve_metric(metric, options)
    spec = METRICS[metric]
    unknown = set(replay or {}) - set(spec.replay)
    if unknown:
        raise ConvlensError(f"{metric} replays {', '.join(spec.replay) or 'no draws'}, not {', '.join(sorted(unknown))}")
    requires = set(spec.requires)
    if maps is None and method is None:
        raise ConvlensError(f"{metric} scores maps: give maps= or method= (the method to compute them)")
    if maps is None or "method" in requires:
        requires |= {"model", "method"}
    if "model" in requires and (model is None or params is None):
        raise ConvlensError(f"{metric} needs the model: give model= and params=")
    if "method" in requires and method is None:
        raise ConvlensError(f"{metric} re-runs the method the maps come from: give method= (e.g. method='gradcam')")
    if "masks" in requires and masks is None:
        raise ConvlensError(f"{metric} needs object masks: give masks= [B, H, W]")
    arrays: dict[str, np.ndarray] = {}
    if maps is not None:
        a = np.asarray(maps, np.float32)
        a = a[:, 0] if a.ndim == 4 else a
        if a.ndim != 3:
            raise ConvlensError(f"maps must be [B, H, W] (or an explanation's heatmap [B, T, H, W]); got {a.shape}")
        arrays["maps"] = a
    if model is not None:
        x = check_images(model, images)
        arrays["images"] = x
        if targets is None:
            from convlens.engine.executor import Executor, Forward
            with Executor(params, batch=min(batch_size or len(x), len(x)), tune=False) as ex:
                targets = np.argmax(ex.map({"f": Forward(model)}, {"images": x})["f"]["logits"], axis=-1)
        arrays["targets"] = np.asarray(targets, np.int32).reshape(len(x))
    elif images is not None:  # maps-only metrics ignore them
        arrays["images"] = np.asarray(images, np.float32)
    if masks is not None:
        arrays["masks"] = np.asarray(masks, bool)
    if "segments" in spec.needs:
        arrays["segments"] = np.asarray(segments, np.int32) if segments is not None else superpixels(arrays["images"])
    mspec = mcfg = None
    if method is not None:
        if method not in METHODS:
            raise ConvlensError(f"unknown method {method!r}; methods: {', '.join(sorted(METHODS))}")
        mspec, mcfg = METHODS[method], resolve(model, method, method_options)
    plan = Plan(model, [metric], {metric: cfg}, mspec, mcfg, maps_given=maps is not None,
                n_segments=int(arrays["segments"].max()) + 1 if "segments" in arrays else 0,
                num_classes=n_classes(model) if model is not None else 0,
                layers=layers_with_weights(model, params) if model is not None else (), every_output=True)
    n = len(next(iter(arrays.values())))
    for k, v in arrays.items():
        if len(v) != n:
            raise ConvlensError(f"{k} has {len(v)} items, the maps or images {n}")
    out = run(model, params, plan, arrays, key=key, batch=batch_size, replay=replay)
    return {k.split(":", 1)[1]: v for k, v in out.items()}
