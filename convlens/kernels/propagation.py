"""Relevance propagation: LRP composites (zennit's, by name).

Each method is one forward pass and one backward pass whose layers propagate relevance
by their rules (`convlens.models.propagation`), seeded with the target's class score:
``R = one_hot(target) * score``. So relevance sums to the target's logit, layer by layer,
up to the share the biases and stabilisers absorb.

Attributions are relevance per pixel and channel (the model's preprocessing is an
affine map per channel, possibly reordering channels: relevance moves through it
unchanged, to the channel it came from); the heatmap is their channel sum.
`relevance` also returns the relevance of any layer's output, per unit, for the
microscope and the audit's concepts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from convlens.config import Config, option
from convlens.errors import OptionError
from convlens.kernels import common
from convlens.kernels.spec import INPUT_ATTR, INPUT_MAP, SAMPLE, TARGET, MethodSpec, Output
from convlens.models import propagation as prop
from convlens.models.network import Model


@dataclasses.dataclass(frozen=True)
class LRPConfig(Config):
    """Layer-wise relevance propagation (Bach et al. 2015) with one of zennit's composites.

    Attributes:
      epsilon: the epsilon rule's epsilon (dense layers).
      stabilizer: added, with their sign, to every other rule's denominators.
      gamma: the gamma rule's weight of positive parameters (epsilon_gamma_box).
      canonize: fold each BatchNormalization into the convolution before it, as
        zennit's canonizers do.
      rules: rules over the composite's, as LAYER:RULE pairs separated by commas, where
        LAYER is a layer name or a Keras class (e.g. block1_conv1:flat,Dense:epsilon);
        rules: epsilon, zplus, alphabeta, gamma, flat, wsquare, zbox, norm, pass, gradient.
    """

    epsilon: float = option(1e-6, min=0)
    stabilizer: float = option(1e-6, above=0)
    gamma: float = option(0.25, min=0)
    canonize: bool = True
    rules: str = ""

    _owner = "lrp"

    def __post_init__(self):
        self.overrides()  # a malformed pair is an error now, not at the first batch
        super().__post_init__()

    def overrides(self) -> dict[str, str]:
        out = {}
        for pair in (p.strip() for p in self.rules.split(",") if p.strip()):
            layer, sep, rule = pair.partition(":")
            if not sep or not layer.strip() or rule.strip() not in prop.RULES:
                raise OptionError(f"lrp.rules: {pair!r} is not LAYER:RULE with a rule among "
                                  f"{', '.join(prop.RULES)} (e.g. rules=block1_conv1:flat,Dense:epsilon)")
            out[layer.strip()] = rule.strip()
        return out


def input_bounds(model: Model, params, layer: str):
    """The value range of ``layer``'s input for pixels in 0..255, per channel:
    ``(low [C], high [C])`` (what the ``zbox`` rule needs of the first layer)."""
    node = model.graph.node(layer)
    size = model.input_size
    px = jnp.stack([jnp.zeros((*size, model.channels)), jnp.full((*size, model.channels), 255.0)])
    x = model.preprocess(px)
    src = node.inputs[0]
    a = x if src == model.graph.input else model.intermediates(params, x, [src])[src]
    a = a.reshape(-1, a.shape[-1])
    return jnp.min(a, axis=0), jnp.max(a, axis=0)


def rules_for(model: Model, params, composite: str, cfg: LRPConfig):
    """``(rules, params)``: the composite's rule per layer and the params with the
    normalisations folded (`convlens.models.propagation.rule_map`)."""
    bounds = None
    first_rule = prop.COMPOSITES[composite][2]
    overrides = cfg.overrides()
    if first_rule == "zbox" or "zbox" in overrides.values():
        first = next((n.name for n in model.graph.nodes if n.kind == "conv"), None)
        zbox_layers = [n for n, r in overrides.items() if r == "zbox"]
        bounds = input_bounds(model, params, zbox_layers[0] if zbox_layers else first)
    rules, folds = prop.rule_map(model, composite, epsilon=cfg.epsilon, stabilizer=cfg.stabilizer, gamma=cfg.gamma,
                                 overrides=overrides, canonize=cfg.canonize, input_bounds=bounds)
    if not folds:
        return rules, params
    params, biases = prop.fold_batchnorm(model.graph, params, folds)
    return tuple((n, dataclasses.replace(r, bias=biases[n]) if n in biases else r) for n, r in rules), params


def relevance(model: Model, params, images, targets, composite: str, cfg: LRPConfig | None = None,
              layers=()):
    """LRP with ``composite`` (a name in `convlens.models.propagation.COMPOSITES`).

    Args:
      images: pixels ``[B, H, W, C]``; targets: ``[B, T]`` or top-k as an int.
      layers: layer names whose output relevance to return too.

    Returns:
      ``(logits [B, K], targets [B, T], relevance [B, T, H, W, C] per pixel,
      {layer: relevance [B, T, ...] of its output})``.
    """
    cfg = cfg or LRPConfig()
    rules, p = rules_for(model, params, composite, cfg)
    layers = model.resolve_layers(layers) if layers else ()
    x, pre_pull = jax.vjp(model.preprocess, images)
    shapes = jax.eval_shape(lambda: model.intermediates(p, x, layers)) if layers else {}
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}

    def f(x, deltas):
        return model.apply(p, x, perturb=deltas, logits=True, rules=rules)[0]

    scores, pull = jax.vjp(f, x, zeros)
    t = common.select_targets(scores, targets)
    seed = scores
    if model.binary:  # class 0's score is -z: relevance of z is -(-z) conserved, not the gradient's sign flip
        seed = scores * jnp.asarray([-1.0, 1.0], scores.dtype)
    rx, rl = jax.vmap(lambda c: pull(c * seed), in_axes=1, out_axes=1)(
        jax.nn.one_hot(t, scores.shape[-1], dtype=scores.dtype))
    # Per pixel: the preprocessing's pullback divided by its slope moves each value's
    # relevance to its pixel unchanged (a channel reorder included).
    slope = pre_pull(jnp.ones_like(x))[0]
    per_pixel = jax.vmap(lambda r: pre_pull(r)[0] / slope, in_axes=1, out_axes=1)(rx)
    return scores, t, per_pixel, rl


def _method(composite: str):
    def explain(model: Model, params, images, targets, cfg: LRPConfig, keys=None):
        scores, t, rel, _ = relevance(model, params, images, targets, composite, cfg)
        return {"attribution": rel, "heatmap": jnp.sum(rel, axis=-1), "targets": t, "logits": scores}
    explain.__name__ = f"lrp_{composite}"
    return explain


def _check(composite):
    def check(model, cfg):
        prop.rule_map(model, composite, overrides=cfg.overrides(), canonize=cfg.canonize,
                      input_bounds=((0.0,), (1.0,)))
    return check


_DOCS = {
    "epsilon_plus": "LRP: z+ in convolutions, epsilon in dense layers (zennit's EpsilonPlus)",
    "epsilon_plus_flat": "LRP: EpsilonPlus with the flat rule in the first layer (zennit's EpsilonPlusFlat)",
    "epsilon_alpha2_beta1": "LRP: alpha=2 beta=1 in convolutions, epsilon in dense layers",
    "epsilon_alpha2_beta1_flat": "LRP: EpsilonAlpha2Beta1 with the flat rule in the first layer",
    "epsilon_gamma_box": "LRP: gamma in convolutions, z-box in the first, epsilon in dense layers",
}

# ---------------------------------------------------------------- DeepLIFT

@dataclasses.dataclass(frozen=True)
class DeepLiftConfig(Config):
    """DeepLIFT with the rescale rule (Shrikumar et al. 2017), as Captum's DeepLift.

    Attributes:
      baseline: the reference image: a pixel value for every pixel (0 = black), or
        ``"mean"`` (each image's per-channel mean colour).
    """

    baseline: float | str = option(0.0, choices=("mean",))

    _owner = "deeplift"


@dataclasses.dataclass(frozen=True)
class DeepLiftShapConfig(Config):
    """DeepLiftShap: DeepLIFT averaged over a set of references (Captum's DeepLiftShap).

    Attributes:
      background: the references: ``noise`` (uniform random images drawn from the
        image's key), ``blur`` (the image blurred at ``samples`` widths from 1 to 32
        pixels, log-spaced) or ``constant`` (grey images from black to white).
      samples: references per image.
      chunk: images (references x batch) per forward/backward pass: memory, not results.
    """

    background: str = option("noise", choices=("noise", "blur", "constant"))
    samples: int = option(8, min=1)
    chunk: int = option(16, min=1)

    _owner = "deeplift_shap"


def deeplift_with(model: Model, params, images, baselines, targets):
    """DeepLIFT-rescale of ``images [B, H, W, C]`` against ``baselines`` (same shape).

    Returns ``(logits [B, K], targets [B, T], attribution [B, T, H, W, C],
    delta [B, T])`` with ``delta = sum(attribution) - (f(x) - f(x0))`` (Captum's
    convergence delta: 0 up to rounding on networks of the supported layers)."""
    rules = prop.deeplift_rules(model)
    b = images.shape[0]

    def f(px):
        return model.apply(params, model.preprocess(px), logits=True, rules=rules)[0]

    scores, pull = jax.vjp(f, jnp.concatenate([images, baselines]))
    t = common.select_targets(scores[:b], targets)
    # One cotangent on both halves, as Captum's (its rules give both the same multipliers).
    hot = jax.nn.one_hot(jnp.concatenate([t, t]), scores.shape[-1], dtype=scores.dtype)
    grads = jax.vmap(lambda c: pull(c)[0][:b], in_axes=1, out_axes=1)(hot)
    attr = grads * (images - baselines)[:, None]
    fx, f0 = (jnp.take_along_axis(s, t, axis=1) for s in (scores[:b], scores[b:]))
    return scores[:b], t, attr, jnp.sum(attr, axis=(2, 3, 4)) - (fx - f0)


def deeplift(model: Model, params, images, targets, cfg: DeepLiftConfig, keys=None):
    from convlens.kernels.gradients import baseline_images
    logits, t, attr, delta = deeplift_with(model, params, images, baseline_images(images, cfg.baseline), targets)
    return {"attribution": attr, "heatmap": jnp.sum(attr, axis=-1), "delta": delta, "targets": t, "logits": logits}


def references(images, keys, background: str, samples: int):
    """``samples`` references per image ``[S, B, H, W, C]`` (see `DeepLiftShapConfig`)."""
    import numpy as np

    from convlens.kernels.baselines import gaussian_blur
    if background == "blur":
        sigmas = np.geomspace(1.0, 32.0, samples) if samples > 1 else np.asarray([8.0])
        return jnp.stack([gaussian_blur(images, float(s)) for s in sigmas])
    if background == "noise":
        return jax.vmap(lambda s: jax.vmap(lambda k: jax.random.uniform(
            jax.random.fold_in(k, s), images.shape[1:], maxval=255.0))(keys))(jnp.arange(samples))
    levels = jnp.linspace(0.0, 255.0, samples) if samples > 1 else jnp.asarray([127.5])
    return jnp.broadcast_to(levels[:, None, None, None, None], (samples, *images.shape))


def deeplift_shap(model: Model, params, images, targets, cfg: DeepLiftShapConfig, keys):
    """DeepLIFT against each reference, averaged: ``attribution [B, T, H, W, C]``, and
    ``delta [B, T]`` = sum(attribution) - (f(x) - mean f(references))."""
    refs = references(images, keys, cfg.background, cfg.samples)
    logits = common.forward_logits(model, params, images)
    t = common.select_targets(logits, targets)
    per = max(1, min(cfg.samples, cfg.chunk // max(images.shape[0], 1)))

    def step(s):  # `per` references at once, stacked into the batch
        n = s.shape[0]
        r = refs[s].reshape(-1, *images.shape[1:])
        x = jnp.tile(images, (n, 1, 1, 1))
        _, _, a, d = deeplift_with(model, params, x, r, jnp.tile(t, (n, 1)))
        return a.reshape(n, *images.shape[:1], *a.shape[1:]), d.reshape(n, -1, t.shape[1])
    idx = jnp.arange(-(-cfg.samples // per) * per).reshape(-1, per)

    def body(acc, s):
        keep = (s < cfg.samples).astype(jnp.float32)
        a, d = step(jnp.minimum(s, cfg.samples - 1))
        return (acc[0] + jnp.tensordot(keep, a, 1), acc[1] + jnp.tensordot(keep, d, 1)), None
    init = (jnp.zeros((*t.shape, *images.shape[1:]), jnp.float32), jnp.zeros(t.shape, jnp.float32))
    (attr, delta), _ = jax.lax.scan(body, init, idx, unroll=True)
    attr, delta = attr / cfg.samples, delta / cfg.samples
    return {"attribution": attr, "heatmap": jnp.sum(attr, axis=-1), "delta": delta, "targets": t, "logits": logits}


_DELTA = Output("delta", (SAMPLE, TARGET), "sum(attribution) - (f(x) - f(baseline)): completeness error")
_ATTR = (Output("attribution", INPUT_ATTR, "contribution per pixel and channel"),
         Output("heatmap", INPUT_MAP, "contribution per pixel (channel sum)"), _DELTA)

SPECS = (
    MethodSpec("deeplift", "propagation", DeepLiftConfig, deeplift, _ATTR, False,
               "DeepLIFT (rescale rule) against a baseline image, as Captum's DeepLift"),
    MethodSpec("deeplift_shap", "propagation", DeepLiftShapConfig, deeplift_shap, _ATTR, True,
               "DeepLiftShap: DeepLIFT averaged over references (uniform noise images by default)"),
) + tuple(
    MethodSpec(f"lrp_{c}", "propagation", LRPConfig, _method(c),
               (Output("attribution", INPUT_ATTR, "relevance per pixel and channel"),
                Output("heatmap", INPUT_MAP, "relevance per pixel (channel sum)")),
               False, _DOCS[c], check=_check(c))
    for c in prop.COMPOSITES)
