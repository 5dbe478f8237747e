"""Gradient saliency: vanilla gradients, gradient x input, SmoothGrad, integrated
gradients, guided backpropagation and deconvnet.

All attributions are with respect to the pixels (0..255, before the model's
preprocessing), for each target's logit. Noise samples (SmoothGrad) and path steps
(integrated gradients) are evaluated inside one compiled loop, as many copies per
step as fit ``chunk`` images per forward/backward pass (at least one copy per image),
so memory follows the chunk size; sample ``s`` of image ``b`` always draws its noise
from ``fold_in(keys[b], s)``, so results do not depend on the chunk or batch size.
Copies are stacked along the batch axis rather than ``vmap``-ed: on XLA:CPU a vmapped
VGG16 backward pass at 64 images took 2.6x as long as the same 64 images as one batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from convlens.errors import ConvlensError, OptionError
from convlens.kernels import common
from convlens.config import Config, option
from convlens.kernels.spec import INPUT_ATTR, INPUT_MAP, SAMPLE, TARGET, MethodSpec, Output, SharedPass
from convlens.models.network import Model


@dataclasses.dataclass(frozen=True)
class GradientConfig(Config):
    """Plain gradient methods take no options."""


@dataclasses.dataclass(frozen=True)
class SmoothGradConfig(Config):
    """SmoothGrad (Smilkov et al. 2017).

    Attributes:
      samples: noisy copies per image.
      noise: noise standard deviation as a fraction of the pixel range (255).
      chunk: images (copies x batch) per forward/backward pass: memory, not results.
    """

    samples: int = option(50, min=1)
    noise: float = option(0.15, min=0, max=10)
    chunk: int = option(8, min=1)

    _owner = "smoothgrad"


@dataclasses.dataclass(frozen=True)
class IntegratedGradientsConfig(Config):
    """Integrated gradients (Sundararajan et al. 2017).

    Attributes:
      steps: points on the path from the baseline to the image.
      baseline: a pixel value for every pixel (0 = black), or ``"mean"`` (each
        image's per-channel mean colour).
      rule: ``gausslegendre`` (Captum's default), ``trapezoid`` or ``midpoint``.
      chunk: images (path points x batch) per forward/backward pass.
    """

    steps: int = option(64, min=1)
    baseline: float | str = option(0.0, min=0, max=255, choices=("mean",))
    rule: str = option("gausslegendre", choices=("gausslegendre", "trapezoid", "midpoint"))
    chunk: int = option(8, min=1)

    _owner = "integrated_gradients"

    def __post_init__(self):
        if isinstance(self.baseline, str) and self.baseline != "mean":
            try:
                object.__setattr__(self, "baseline", float(self.baseline))
            except ValueError:
                raise OptionError(f"integrated_gradients baseline {self.baseline!r}: give a pixel value "
                                    "(e.g. 0) or 'mean'") from None
        super().__post_init__()
        if self.rule == "trapezoid" and self.steps < 2:
            raise OptionError("integrated_gradients: the trapezoid rule needs steps >= 2")


def _saliency_map(attr):
    return jnp.max(jnp.abs(attr), axis=-1)


def _clean_forward(model, params, images, targets):
    """Logits of the images themselves and the targets chosen from them."""
    logits = common.forward_logits(model, params, images)
    return logits, common.select_targets(logits, targets)


def _input_pass(model: Model, params, images, targets, cfg=None):
    """One forward and backward pass: the targets' gradients w.r.t. the pixels."""
    logits, t, g = common.input_gradients(model, params, images, targets)
    return {"logits": logits, "targets": t, "grads": g}


def _gradient_finish(model, images, cfg, state):
    g = state["grads"]
    return {"attribution": g, "heatmap": _saliency_map(g), "targets": state["targets"], "logits": state["logits"]}


def _gxi_finish(model, images, cfg, state):
    attr = state["grads"] * images[:, None]
    return {"attribution": attr, "heatmap": jnp.sum(attr, axis=-1), "targets": state["targets"],
            "logits": state["logits"]}


def gradient(model: Model, params, images, targets, cfg=None, keys=None):
    """Vanilla gradients (Simonyan et al. 2014): ``attribution [B, T, H, W, C]`` and
    ``heatmap [B, T, H, W]`` = max |gradient| over channels."""
    return _gradient_finish(model, images, cfg, _input_pass(model, params, images, targets))


def gradient_x_input(model: Model, params, images, targets, cfg=None, keys=None):
    """Gradient times pixel value: ``attribution [B, T, H, W, C]``, ``heatmap`` = channel sum."""
    return _gxi_finish(model, images, cfg, _input_pass(model, params, images, targets))


def guided_input_gradients(model: Model, params, images, targets):
    return common.input_gradients(model, params, images, targets, relu_rule="guided")[2]


def _rule_gradient(rule):
    def explain(model: Model, params, images, targets, cfg=None, keys=None):
        # The forward values are the standard ones; only the backward rule differs.
        logits, t, g = common.input_gradients(model, params, images, targets, relu_rule=rule)
        return {"attribution": g, "heatmap": _saliency_map(g), "targets": t, "logits": logits}
    return explain


def _chunked_sum(fn, n: int, per_step: int, weights: np.ndarray, init):
    """``sum_s weights[s] * fn(s)[j]`` over ``s < n``: ``fn`` takes ``per_step`` values of
    ``s`` at once (padded with zero weights) and returns ``[per_step, ...]``; one `lax.scan`."""
    per_step = max(1, min(per_step, n))
    m = -(-n // per_step)
    idx = np.arange(m * per_step).reshape(m, per_step)
    w = np.zeros(m * per_step, np.float32)
    w[:n] = weights
    w = w.reshape(m, per_step)

    def body(acc, xs):
        s, ws = xs
        return acc + jnp.tensordot(ws, fn(s), axes=1), None

    # Unrolled: XLA:CPU runs a rolled loop body several times slower than straight-line code.
    total, _ = jax.lax.scan(body, init, (jnp.asarray(idx), jnp.asarray(w)), unroll=True)
    return total


def _copies_gradients(model, params, make, s, targets):
    """Input gradients of ``len(s)`` copies of the batch made by ``make(s_i) -> [B, H, W, C]``,
    stacked along the batch axis for one pass: ``[len(s), B, T, H, W, C]``."""
    xs = jax.vmap(make)(s)  # [S, B, H, W, C]
    n, b = xs.shape[:2]
    t = jnp.tile(targets, (n, 1))
    g = common.input_gradients(model, params, xs.reshape(n * b, *xs.shape[2:]), t)[2]
    return g.reshape(n, b, *g.shape[1:])


def _per_step(chunk: int, batch: int) -> int:
    return max(1, chunk // max(batch, 1))


def smoothgrad(model: Model, params, images, targets, cfg: SmoothGradConfig, keys):
    """Mean gradient over noisy copies: ``attribution [B, T, H, W, C]``, ``heatmap``
    = max |mean gradient| over channels."""
    logits, t = _clean_forward(model, params, images, targets)
    sigma = cfg.noise * 255.0

    def noisy(s):
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, s), images.shape[1:]))(keys)
        return images + sigma * noise

    init = jnp.zeros((*t.shape, *images.shape[1:]), jnp.float32)
    g = _chunked_sum(lambda s: _copies_gradients(model, params, noisy, s, t), cfg.samples,
                     _per_step(cfg.chunk, images.shape[0]), np.full(cfg.samples, 1.0 / cfg.samples), init)
    return {"attribution": g, "heatmap": _saliency_map(g), "targets": t, "logits": logits}


def path_points(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Points ``alpha`` in [0, 1] and weights for integrating along the path."""
    if steps < 1:
        raise ConvlensError("integrated gradients need steps >= 1")
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1) / 2, w / 2
    if rule == "trapezoid":
        if steps < 2:
            raise ConvlensError("the trapezoid rule needs steps >= 2")
        a = np.linspace(0, 1, steps)
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return a, w
    if rule == "midpoint":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    raise ConvlensError(f"unknown integration rule {rule!r}; choose gausslegendre, trapezoid or midpoint")


def baseline_images(images, baseline):
    if isinstance(baseline, str):
        if baseline != "mean":
            raise ConvlensError(f"unknown baseline {baseline!r}: give a pixel value (e.g. 0) or 'mean'")
        return jnp.broadcast_to(jnp.mean(images, axis=(1, 2), keepdims=True), images.shape)
    return jnp.full_like(images, float(baseline))


def integrated_gradients(model: Model, params, images, targets, cfg: IntegratedGradientsConfig, keys=None):
    """``(x - x0) * integral of the gradient along x0 -> x``: ``attribution [B, T, H, W, C]``,
    ``heatmap`` = channel sum, and ``delta [B, T]`` = sum(attribution) - (f(x) - f(x0)),
    the integration error (Captum's convergence delta)."""
    alphas, weights = path_points(cfg.steps, cfg.rule)
    logits, t = _clean_forward(model, params, images, targets)
    x0 = baseline_images(images, cfg.baseline)
    diff = images - x0
    alphas_j = jnp.asarray(alphas, jnp.float32)

    init = jnp.zeros((*t.shape, *images.shape[1:]), jnp.float32)
    avg = _chunked_sum(lambda s: _copies_gradients(model, params, lambda a: x0 + alphas_j[a] * diff, s, t),
                       cfg.steps, _per_step(cfg.chunk, images.shape[0]), weights, init)
    attr = avg * diff[:, None]
    f = jnp.take_along_axis(logits, t, axis=1)
    f0 = jnp.take_along_axis(common.forward_logits(model, params, x0), t, axis=1)
    delta = jnp.sum(attr, axis=(2, 3, 4)) - (f - f0)
    return {"attribution": attr, "heatmap": jnp.sum(attr, axis=-1), "delta": delta, "targets": t,
            "logits": logits}


_ATTR = (Output("attribution", INPUT_ATTR, "per-pixel, per-channel attribution"),)


def _spec(name, config, fn, heatmap_doc, stochastic, doc, extra=(), shared=None):
    return MethodSpec(name, "gradient", config, fn, _ATTR + (Output("heatmap", INPUT_MAP, heatmap_doc),) + extra,
                      stochastic, doc, shared=shared)


SPECS = (
    _spec("gradient", GradientConfig, gradient, "max |gradient| over channels", False,
          "vanilla gradient of the target logit w.r.t. the pixels",
          shared=SharedPass("input_gradients", _input_pass, _gradient_finish)),
    _spec("gradient_x_input", GradientConfig, gradient_x_input, "channel sum of the attribution", False,
          "gradient x pixel value", shared=SharedPass("input_gradients", _input_pass, _gxi_finish)),
    _spec("smoothgrad", SmoothGradConfig, smoothgrad, "max |mean gradient| over channels", True,
          "SmoothGrad: gradient averaged over noisy copies"),
    _spec("integrated_gradients", IntegratedGradientsConfig, integrated_gradients, "channel sum of the attribution",
          False, "integrated gradients from a baseline image",
          (Output("delta", (SAMPLE, TARGET), "sum(attribution) - (f(x) - f(baseline))"),)),
    _spec("guided_backprop", GradientConfig, _rule_gradient("guided"), "max |attribution| over channels", False,
          "guided backpropagation (ReLU gradient rule)"),
    _spec("deconvnet", GradientConfig, _rule_gradient("deconvnet"), "max |attribution| over channels", False,
          "deconvnet (Zeiler & Fergus ReLU gradient rule)"),
)
