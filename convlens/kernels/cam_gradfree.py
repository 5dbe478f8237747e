"""Gradient-free class activation maps: Score-CAM, Ablation-CAM and Eigen-CAM.

They share the CAM skeleton of `convlens.kernels.cam` — ``ReLU(sum_c w_c A_c)`` over
the activations ``A`` of a spatial layer (`cam.cam_from_weights`) — and differ in where
the channel weights ``w`` come from:

* Score-CAM (Wang et al. 2020): each channel, upsampled to the input and min-max
  normalised, masks the image; ``w`` comes from the target's score on the masked image:
  a softmax over the channels of those logits (``score="channel_softmax"``, as
  pytorch-grad-cam) or the target's probability (``score="prob"``, the authors' code).
  ``channels=N`` masks with only the N channels of highest spatial variance (Faster
  Score-CAM); the others weigh 0.
* Ablation-CAM (Desai & Ramaswamy 2020): ``w_c = (y - y_c) / y``, the relative drop of
  the target's logit when channel ``c`` is set to 0. The layer's activations are computed
  once; only the rest of the network runs on the ablated copies (where skip connections
  bypass the layer, the whole network runs with the channel removed through ``perturb``).
* Eigen-CAM (Muhammad & Yeasin 2020): no target at all; ``w`` is the first right singular
  vector of the centred activations ``[h*w, c]``, so the map is ``ReLU`` of their
  projection on the first principal component. Its sign, arbitrary in an SVD, is chosen
  so that ``sum(w) >= 0``: the map then grows with the layer's overall activation (for
  a ReLU layer, where the features are). The same map is returned for every target.

Masked images and ablated copies are built on the device ``chunk`` images per forward
pass (`common.map_steps`), so memory follows the chunk, never ``B x C`` copies; the
result does not depend on the chunk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from convlens.config import Config, option
from convlens.errors import ConvlensError
from convlens.kernels import common
from convlens.kernels.baselines import BASELINE_CHOICES, baseline_images, parse_baseline
from convlens.kernels.cam import CAM_OUTPUTS, RELU, CamConfig, cam_from_weights, resolve_layer
from convlens.kernels.spec import LAYER_SPATIAL, MethodSpec
from convlens.models.network import Model

NORM_EPS = 1e-8  # pytorch-grad-cam's min-max normalisation of the masks


@dataclasses.dataclass(frozen=True)
class ScoreCamConfig(Config):
    """Options of Score-CAM.

    Attributes:
      layer: the spatial layer whose channels become masks; ``None`` picks
        `common.default_layer`.
      channels: mask with only this many channels, those of highest spatial variance
        (Faster Score-CAM); 0 = every channel.
      score: ``channel_softmax`` (softmax over channels of the masked images' target
        logits, as pytorch-grad-cam) or ``prob`` (the target's probability on each
        masked image, as the authors' code).
      baseline: what masked-out pixels show: a pixel value (0 = black, as multiplying
        the image by the mask), ``mean``, ``blur`` or ``image:PATH``.
      blur_sigma: Gaussian sigma (pixels) of the ``blur`` baseline.
      chunk: masked images per forward pass; 0 picks it from ``memory_mb``.
      memory_mb: activation memory per forward pass the automatic chunk aims at.
    """

    layer: str | None = None
    channels: int = option(0, min=0)
    score: str = option("channel_softmax", choices=("channel_softmax", "prob"))
    baseline: float | str = option(0.0, min=0, max=255, choices=BASELINE_CHOICES)
    blur_sigma: float = option(8.0, above=0)
    chunk: int = option(0, min=0)
    memory_mb: int = option(1024, min=1)

    _owner = "scorecam"

    def __post_init__(self):
        object.__setattr__(self, "baseline", parse_baseline(self.baseline, "scorecam"))
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class AblationCamConfig(Config):
    """Options of Ablation-CAM.

    Attributes:
      layer: the spatial layer whose channels are ablated (set to 0).
      chunk: ablated copies per pass of the rest of the network; 0 picks it from ``memory_mb``.
      memory_mb: activation memory per pass the automatic chunk aims at.
    """

    layer: str | None = None
    chunk: int = option(0, min=0)
    memory_mb: int = option(1024, min=1)

    _owner = "ablationcam"


def _layer_forward(model: Model, params, images, layer: str, targets):
    """One forward pass: ``(logits [B, K], targets [B, T], acts [B, h, w, c])``."""
    logits, acts = model.apply(params, model.preprocess(images), layers=[layer], logits=True)
    return logits, common.select_targets(logits, targets), acts[layer]


def _out(cam, images, t, logits):
    return {"cam": cam, "heatmap": common.upsample(cam, images.shape[1:3]), "targets": t, "logits": logits}


def channel_masks(acts, chans, size: tuple[int, int]):
    """Channels ``chans [B, n]`` of ``acts [B, h, w, c]`` upsampled to ``size`` and
    min-max normalised per map: ``[B, n, H, W]`` in [0, 1]."""
    m = jnp.take_along_axis(jnp.moveaxis(acts, -1, 1), chans[:, :, None, None], axis=1)
    m = common.upsample(m, size)
    lo = jnp.min(m, axis=(2, 3), keepdims=True)
    hi = jnp.max(m, axis=(2, 3), keepdims=True)
    return (m - lo) / (hi - lo + NORM_EPS)


def score_cam(model: Model, params, images, targets, cfg: ScoreCamConfig, keys=None):
    """Score-CAM: ``cam [B, T, h, w]`` and ``heatmap [B, T, H, W]`` (see the module docstring)."""
    layer = resolve_layer(model, cfg, "scorecam")
    logits, t, a = _layer_forward(model, params, images, layer, targets)
    b, _, _, c = a.shape
    size = images.shape[1:3]
    n = c if cfg.channels == 0 else min(cfg.channels, c)
    if n < c:
        chans = jax.lax.top_k(jnp.var(a, axis=(1, 2)), n)[1]  # [B, n]
    else:
        chans = jnp.broadcast_to(jnp.arange(c), (b, c))
    base = baseline_images(images, cfg)
    per = common.copies_per_step(cfg.chunk, cfg.memory_mb, b, n, common.image_bytes(model, size))

    def step(k):  # channel indices [B, per]
        m = channel_masks(a, k, size)[..., None]  # [B, per, H, W, 1]
        x = base[:, None] + m * (images - base)[:, None]
        per_ = k.shape[1]
        return common.forward_logits(model, params, x.reshape(b * per_, *images.shape[1:])).reshape(b, per_, -1)

    lz = common.map_steps(step, chans, per)  # [B, n, K]
    if cfg.score == "channel_softmax":
        w_sel = jax.nn.softmax(common.target_scores(model, lz, t), axis=1)  # over channels
    else:
        w_sel = common.target_scores(model, lz, t, "prob")
    w = jnp.zeros((b, t.shape[1], c), jnp.float32)
    w = w.at[jnp.arange(b)[:, None, None], jnp.arange(t.shape[1])[None, :, None], chans[:, None, :]].set(
        jnp.moveaxis(w_sel, 1, 2))
    return _out(cam_from_weights(a[:, None], w[:, :, None, None, :]), images, t, logits)


def head_only(model: Model, layer: str) -> bool:
    """Whether every path from the input to the output passes through ``layer`` (then the
    rest of the network can run from its output alone)."""
    try:
        model.graph.plan((model.graph.output,), frozenset([layer]))
        return True
    except ConvlensError:
        return False


def ablation_scores(model: Model, params, images, layer: str, acts, chunk: int, memory_mb: int):
    """Logits with each channel of ``layer`` set to 0, one copy per channel:
    ``[B, c, K]``."""
    b, h, w, c = acts.shape
    size = images.shape[1:3]
    head = head_only(model, layer)
    per_bytes = common.image_bytes(model, size, after=layer if head else None)
    per = common.copies_per_step(chunk, memory_mb, b, c, per_bytes)
    x = model.preprocess(images)

    def step(k):  # channel indices [B, per]
        per_ = k.shape[1]
        off = jax.nn.one_hot(k, c, dtype=acts.dtype)[:, :, None, None, :]  # [B, per, 1, 1, c]
        if head:
            z = (acts[:, None] * (1.0 - off)).reshape(b * per_, h, w, c)
            out = model.head(params, z, layer, logits=True)
        else:  # skip connections bypass the layer: remove the channel inside the full network
            delta = -(acts[:, None] * off).reshape(b * per_, h, w, c)
            out = model.apply(params, jnp.repeat(x, per_, axis=0), perturb={layer: delta}, logits=True)[0]
        return out.reshape(b, per_, -1)

    return common.map_steps(step, jnp.broadcast_to(jnp.arange(c), (b, c)), per)


def ablation_cam(model: Model, params, images, targets, cfg: AblationCamConfig, keys=None):
    """Ablation-CAM: ``cam [B, T, h, w]`` and ``heatmap [B, T, H, W]`` (see the module docstring)."""
    layer = resolve_layer(model, cfg, "ablationcam")
    logits, t, a = _layer_forward(model, params, images, layer, targets)
    lz = ablation_scores(model, params, images, layer, a, cfg.chunk, cfg.memory_mb)  # [B, c, K]
    y = common.target_scores(model, logits, t)  # [B, T]
    yk = common.target_scores(model, lz, t)  # [B, c, T]
    # A target logit of exactly 0 would divide by zero: keep its sign, bound its size.
    safe = jnp.where(y >= 0, jnp.maximum(y, 1e-7), jnp.minimum(y, -1e-7))
    w = jnp.moveaxis((y[:, None, :] - yk) / safe[:, None, :], 1, 2)  # [B, T, c]
    return _out(cam_from_weights(a[:, None], w[:, :, None, None, :]), images, t, logits)


def principal_direction(acts):
    """First principal direction of each image's activations ``[B, h, w, c]`` as
    ``(centred [B, h, w, c], direction [B, c])``, signed so that ``sum(direction) >= 0``."""
    b, h, w, c = acts.shape
    m = acts.reshape(b, h * w, c)
    m = m - jnp.mean(m, axis=1, keepdims=True)
    v = jnp.linalg.svd(m, full_matrices=False)[2][:, 0, :]
    v = v * jnp.where(jnp.sum(v, axis=-1, keepdims=True) < 0, -1.0, 1.0)
    return m.reshape(b, h, w, c), v


def eigen_cam(model: Model, params, images, targets, cfg: CamConfig, keys=None):
    """Eigen-CAM: ``cam [B, T, h, w]`` and ``heatmap [B, T, H, W]``, the same map for
    every target (see the module docstring)."""
    layer = resolve_layer(model, cfg, "eigencam")
    logits, t, a = _layer_forward(model, params, images, layer, targets)
    centred, v = principal_direction(a)
    cam = cam_from_weights(centred[:, None], v[:, None, None, None, :])  # [B, 1, h, w]
    cam = jnp.broadcast_to(cam, (cam.shape[0], t.shape[1], *cam.shape[2:]))
    return _out(cam, images, t, logits)


SPECS = (
    MethodSpec("scorecam", "cam", ScoreCamConfig, score_cam, CAM_OUTPUTS, False,
               "Score-CAM: channel weights from the target's score on channel-masked images (no gradients)",
               layer=LAYER_SPATIAL, when_empty=RELU),
    MethodSpec("ablationcam", "cam", AblationCamConfig, ablation_cam, CAM_OUTPUTS, False,
               "Ablation-CAM: channel weights = relative logit drop with the channel set to 0", layer=LAYER_SPATIAL,
               when_empty=RELU),
    MethodSpec("eigencam", "cam", CamConfig, eigen_cam, CAM_OUTPUTS, False,
               "Eigen-CAM: first principal component of the activations (class-agnostic)", layer=LAYER_SPATIAL,
               when_empty=RELU),
)
