"""Feature visualisation by gradient ascent: one input image per unit (filter, neuron or
class), many units at once.

The batch axis holds one image per unit; unit ``n`` gets its own index ``units[n]`` and
its own PRNG key, so a unit's image never depends on its batch-mates. `visualize` runs
the whole ascent inside one ``lax.fori_loop``; `start` / `advance` / `finish` are the
same computation in pieces, which `convlens.engine.atlas` dispatches as a host loop of
compiled steps where that is faster (XLA:CPU runs these loop bodies several times
slower inside a ``while`` loop; no value returns to the host between steps either way).

Objectives are small composable values (Lucid's ``objectives``): `channel`, `neuron`,
`deepdream`, `class_logit`, and sums, differences and scalings of them::

    obj = channel("block4_conv1") - 0.5 * deepdream("block4_conv1")

Each maps ``(activations, logits, units)`` to one score per image.

Recipes:

* ``classic`` (*Deep Learning with Python*, Chollet): start from grey noise (pixel
  value 128 +/- 10), ascend the objective with the gradient divided by its RMS, step 1
  pixel unit, 40 steps; deprocess by standardising the image, x0.1, +0.5, clip to
  [0, 1], x255.
* ``lucid`` (Olah et al., Distill 2017; Lucid's ``render_vis`` defaults): the image is
  parameterised as a Fourier spectrum scaled by 1/frequency, in decorrelated colour
  space (ImageNet's colour-correlation square root), squashed by a sigmoid; every step
  applies random jitter, scaling and rotation (pad 12, jitter 8, scale 0.9..1.1,
  rotate -10..10 degrees, jitter 4); Adam (learning rate 0.05), 256 steps. Scale and
  rotation are one bilinear affine resampling at a fixed size (Lucid resizes instead),
  which keeps shapes static.

Pixels are optimised in 0..255 space and go through the model's own preprocessing, so a
caffe-mode VGG and a rescaling convnet are treated alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convlens.config import Config, option
from convlens.models.network import Model

# ---------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class Objective:
    """A score per image from ``(acts {layer: [N, ...]}, logits [N, K] or None, units [N])``."""

    def layers(self) -> tuple[str, ...]:
        return ()

    def needs_logits(self) -> bool:
        return False

    def __call__(self, acts, logits, units):
        raise NotImplementedError

    def __add__(self, other):
        return Sum(((1.0, self), (1.0, other)))

    def __sub__(self, other):
        return Sum(((1.0, self), (-1.0, other)))

    def __mul__(self, w):
        return Sum(((float(w), self),))

    __rmul__ = __mul__

    def __neg__(self):
        return Sum(((-1.0, self),))


@dataclasses.dataclass(frozen=True)
class channel(Objective):  # noqa: N801 - reads like Lucid's objectives
    """Mean activation of channel ``units[n]`` of ``layer`` (a filter)."""

    layer: str

    def layers(self):
        return (self.layer,)

    def __call__(self, acts, logits, units):
        a = acts[self.layer]
        picked = jnp.take_along_axis(a, units.reshape(-1, *(1,) * (a.ndim - 1)), axis=-1)
        return jnp.mean(picked, axis=tuple(range(1, a.ndim)))


@dataclasses.dataclass(frozen=True)
class neuron(Objective):  # noqa: N801
    """Activation of channel ``units[n]`` at one position of ``layer`` (default: the centre)."""

    layer: str
    y: int | None = None
    x: int | None = None

    def layers(self):
        return (self.layer,)

    def __call__(self, acts, logits, units):
        a = acts[self.layer]
        y = a.shape[1] // 2 if self.y is None else self.y
        x = a.shape[2] // 2 if self.x is None else self.x
        return jnp.take_along_axis(a[:, y, x, :], units[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class deepdream(Objective):  # noqa: N801
    """Mean squared activation of the whole layer (DeepDream); ignores ``units``."""

    layer: str

    def layers(self):
        return (self.layer,)

    def __call__(self, acts, logits, units):
        a = acts[self.layer]
        return jnp.mean(a * a, axis=tuple(range(1, a.ndim)))


@dataclasses.dataclass(frozen=True)
class class_logit(Objective):  # noqa: N801
    """The logit (score before softmax/sigmoid) of class ``units[n]``."""

    def needs_logits(self):
        return True

    def __call__(self, acts, logits, units):
        return jnp.take_along_axis(logits, units[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Sum(Objective):
    """``sum_i w_i * objective_i``."""

    terms: tuple[tuple[float, Objective], ...]

    def layers(self):
        return tuple(dict.fromkeys(n for _, o in self.terms for n in o.layers()))

    def needs_logits(self):
        return any(o.needs_logits() for _, o in self.terms)

    def __call__(self, acts, logits, units):
        return sum(w * o(acts, logits, units) for w, o in self.terms)

    def __mul__(self, w):
        return Sum(tuple((float(w) * a, o) for a, o in self.terms))


def evaluate(model: Model, params, objective: Objective, pixels, units):
    """The objective of images in pixel space ``[N, S, S, 3]``: ``[N]``."""
    x = model.preprocess(pixels)
    if objective.needs_logits():
        logits, acts = model.apply(params, x, layers=objective.layers(), logits=True)
    else:
        logits, acts = None, model.intermediates(params, x, objective.layers())
    return objective(acts, logits, units)


# ---------------------------------------------------------------- recipes

RECIPES = ("classic", "lucid")
# Square root of ImageNet's colour correlation (Lucid), normalised by its largest column norm.
_COLOR = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float32)
COLOR_CORRELATION = _COLOR / np.max(np.linalg.norm(_COLOR, axis=0))


@dataclasses.dataclass(frozen=True)
class AscentConfig(Config):
    """Options of a feature visualisation.

    Attributes:
      recipe: classic (Deep Learning with Python) or lucid (Fourier parameterisation,
        transforms, Adam; see the module docstring).
      size: image side in pixels.
      steps: ascent steps (0: the recipe's own, 40 classic / 256 lucid).
      lr: step size (0: the recipe's own, 1 pixel unit classic / Adam 0.05 lucid).
      unroll: steps per ``fori_loop`` iteration; 0: every step for the classic recipe
        (on XLA:CPU a rolled loop of VGG16 forward+backward steps runs 3.5x slower than
        the same 40 steps unrolled, which compile in seconds), 1 for Lucid (its hundreds
        of steps take too long to compile unrolled). Speed only.
    """

    recipe: str = option("classic", choices=RECIPES)
    size: int = option(128, min=8, max=4096)
    steps: int = option(0, min=0, max=100_000)
    lr: float = option(0.0, min=0)
    unroll: int = option(0, min=0)

    _owner = "ascent"

    @property
    def n_steps(self) -> int:
        return self.steps or (40 if self.recipe == "classic" else 256)

    @property
    def loop_unroll(self) -> int:
        if self.unroll:
            return self.unroll
        return max(self.n_steps, 1) if self.recipe == "classic" else 1

    @property
    def step_size(self) -> float:
        return self.lr or (1.0 if self.recipe == "classic" else 0.05)


def classic_init(keys, size: int):
    """Grey noise, 128 +/- 10, one image per key: ``[N, S, S, 3]``."""
    return jax.vmap(lambda k: 128.0 + jax.random.uniform(k, (size, size, 3), minval=-10.0, maxval=10.0))(keys)


def classic_step(model: Model, params, objective, cfg: AscentConfig, pixels, units):
    """One gradient-ascent step, the gradient divided by its RMS per image."""
    g = jax.grad(lambda px: jnp.sum(evaluate(model, params, objective, px, units)))(pixels)
    rms = jnp.sqrt(jnp.mean(g * g, axis=(1, 2, 3), keepdims=True))
    return pixels + cfg.step_size * g / (rms + 1e-5)


def deprocess(pixels):
    """*Deep Learning with Python*'s ``deprocess_image``: ``[N, S, S, 3]`` -> uint8."""
    x = pixels - jnp.mean(pixels, axis=(1, 2, 3), keepdims=True)
    x = x / (jnp.std(x, axis=(1, 2, 3), keepdims=True) + 1e-5) * 0.1 + 0.5
    return (jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def _freq_scale(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    return (1.0 / np.maximum(freqs, 1.0 / size)).astype(np.float32)  # 1/f, decay power 1


def lucid_init(keys, size: int):
    """Random spectra (sd 0.01), ``[N, 2, 3, S, S//2 + 1]`` (real and imaginary parts)."""
    shape = (2, 3, size, size // 2 + 1)
    return jax.vmap(lambda k: 0.01 * jax.random.normal(k, shape))(keys)


def lucid_pixels(spectrum):
    """Spectra -> pixels ``[N, S, S, 3]`` in 0..255 (Fourier basis, decorrelated colour, sigmoid)."""
    size = spectrum.shape[-2]
    scale = jnp.asarray(_freq_scale(size))
    z = (spectrum[:, 0] + 1j * spectrum[:, 1]) * scale
    img = jnp.fft.irfft2(z, s=(size, size), axes=(-2, -1)) / 4.0  # [N, 3, S, S]
    img = jnp.einsum("nchw,dc->nhwd", img, jnp.asarray(COLOR_CORRELATION))
    return jax.nn.sigmoid(img) * 255.0


_SCALES = np.asarray([1 + (i - 5) / 50.0 for i in range(11)], np.float32)
_ANGLES = np.asarray(list(range(-10, 11)) + 5 * [0], np.float32)


def _affine(img, scale, angle_deg):
    """Scale and rotate ``[H, W, C]`` about its centre, bilinear, same size."""
    h, w = img.shape[:2]
    a = jnp.deg2rad(angle_deg)
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    dy, dx = (yy - cy) / scale, (xx - cx) / scale
    sy = cy + jnp.cos(a) * dy - jnp.sin(a) * dx
    sx = cx + jnp.sin(a) * dy + jnp.cos(a) * dx
    return jnp.stack([jax.scipy.ndimage.map_coordinates(img[..., c], [sy, sx], order=1, mode="nearest")
                      for c in range(img.shape[-1])], axis=-1)


def lucid_transform(pixels, keys):
    """Lucid's standard transforms, per image with its own key: ``[N, S, S, 3]`` ->
    ``[N, S + 12, S + 12, 3]``."""
    def one(img, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        img = jnp.pad(img, ((12, 12), (12, 12), (0, 0)), constant_values=0.5 * 255.0)
        size = img.shape[0] - 8
        o = jax.random.randint(k1, (2,), 0, 9)
        img = jax.lax.dynamic_slice(img, (o[0], o[1], 0), (size, size, 3))
        img = _affine(img, jax.random.choice(k2, jnp.asarray(_SCALES)), jax.random.choice(k3, jnp.asarray(_ANGLES)))
        o = jax.random.randint(k4, (2,), 0, 5)
        return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (size - 4, size - 4, 3))
    return jax.vmap(one)(pixels, keys)


# ---------------------------------------------------------------- the kernel


def start(model: Model, params, objective: Objective, units, cfg: AscentConfig, keys):
    """The starting state of an ascent: ``(state, start_scores [N])``. The state is the
    pixels (classic) or the spectra, Adam's state and the per-image step keys (lucid)."""
    units = units.astype(jnp.int32)
    ks = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    init_keys, step_keys = ks[:, 0], ks[:, 1]
    if cfg.recipe == "classic":
        px0 = classic_init(init_keys, cfg.size)
        return (px0,), evaluate(model, params, objective, px0, units)
    spec0 = lucid_init(init_keys, cfg.size)
    opt = optax.adam(cfg.step_size)
    return (spec0, opt.init(spec0), step_keys), evaluate(model, params, objective, lucid_pixels(spec0), units)


def advance(model: Model, params, objective: Objective, units, cfg: AscentConfig, state, i):
    """Step ``i`` of the ascent: state -> state."""
    units = units.astype(jnp.int32)
    if cfg.recipe == "classic":
        return (classic_step(model, params, objective, cfg, state[0], units),)
    spec, opt_state, step_keys = state

    def loss(sp):
        k = jax.vmap(lambda kk: jax.random.fold_in(kk, i))(step_keys)
        return -jnp.sum(evaluate(model, params, objective, lucid_transform(lucid_pixels(sp), k), units))
    g = jax.grad(loss)(spec)
    upd, opt_state = optax.adam(cfg.step_size).update(g, opt_state, spec)
    return optax.apply_updates(spec, upd), opt_state, step_keys


def finish(model: Model, params, objective: Objective, units, cfg: AscentConfig, state, start_scores) -> dict:
    """The result: ``patterns [N, S, S, 3]`` uint8, ``scores [N]`` (the objective on the
    final image) and ``start_scores [N]``."""
    units = units.astype(jnp.int32)
    if cfg.recipe == "classic":
        px = state[0]
        patterns = deprocess(px)
    else:
        px = lucid_pixels(state[0])
        patterns = jnp.clip(jnp.round(px), 0, 255).astype(jnp.uint8)
    return {"patterns": patterns, "scores": evaluate(model, params, objective, px, units),
            "start_scores": start_scores}


def visualize(model: Model, params, objective: Objective, units, cfg: AscentConfig, keys) -> dict:
    """Optimises one image per unit, the whole ascent in one ``lax.fori_loop``.

    Args:
      model, params: the network.
      objective: what to maximise (e.g. ``channel("block3_conv1")``).
      units: ``[N]`` int32, the unit of each image (filter / class index).
      cfg: an `AscentConfig`.
      keys: ``[N]`` PRNG keys, one per image.

    Returns:
      ``patterns [N, S, S, 3]`` uint8, ``scores [N]`` (the objective on the final image),
      ``start_scores [N]`` (on the starting image). `start`, `advance` and `finish` are
      the same computation in pieces, for a host loop of compiled steps.
    """
    state, s0 = start(model, params, objective, units, cfg, keys)
    state = jax.lax.fori_loop(0, cfg.n_steps, lambda i, st: advance(model, params, objective, units, cfg, st, i),
                              state, unroll=cfg.loop_unroll)
    return finish(model, params, objective, units, cfg, state, s0)


def conv_flops(model: Model, layer: str, size: int) -> int:
    """FLOPs of one forward pass up to ``layer`` for one image (the layer types' ``flops`` trait)."""
    return model.flops(1, (size, size), upto=layer)
