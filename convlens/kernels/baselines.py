"""What a removed region shows: baselines shared by the perturbation methods
(occlusion, LIME, RISE, Score-CAM) — a pixel value, the image's mean colour, the image
blurred, or a given image — in pixel space (0..255, before the model's preprocessing)."""

from __future__ import annotations

import hashlib
import math

import jax.numpy as jnp
import numpy as np

from convlens.errors import OptionError
from convlens.models.layers import depthwise_conv

# What a baseline option may name besides a pixel value (0..255); "image:" takes a path.
BASELINE_CHOICES = ("mean", "blur", "image:")


class Pixels:
    """An image held by a config (hashable by content): a given baseline image.

    ``Pixels.load(path)`` reads a file; in stores it is recorded as its path and sha256.
    """

    def __init__(self, array, name: str = ""):
        self.array = np.ascontiguousarray(np.asarray(array, np.float32))
        self.name = name
        self.sha256 = hashlib.sha256(self.array.tobytes() + str(self.array.shape).encode()).hexdigest()

    @classmethod
    def load(cls, path: str) -> Pixels:
        from convlens.pixels import read_image  # the file is read below the kernels
        return cls(read_image(path), name=str(path))

    def __hash__(self):
        return hash(self.sha256)

    def __eq__(self, other):
        return isinstance(other, Pixels) and other.sha256 == self.sha256

    def __json__(self):
        return {"image": self.name, "sha256": self.sha256, "shape": list(self.array.shape)}

    def __repr__(self):
        return f"Pixels({self.name or self.array.shape})"


def gaussian_blur(images, sigma: float):
    """Separable Gaussian blur of ``[B, H, W, C]`` (reflected borders), as two depthwise
    convolutions."""
    if sigma <= 0:
        return images
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    c = images.shape[-1]
    x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    for shape in ((2 * r + 1, 1, c, 1), (1, 2 * r + 1, c, 1)):
        kern = jnp.asarray(np.broadcast_to(k.reshape(shape[:2] + (1, 1)), shape))
        x = depthwise_conv(x, kern, padding="VALID")
    return x


def parse_baseline(value, method: str, extra: tuple[str, ...] = ()):
    """A baseline option as given (command line or Python) -> a pixel value, ``"mean"``,
    ``"blur"``, one of ``extra``, or a `Pixels` image (``"image:PATH"``)."""
    if isinstance(value, dict) and "sha256" in value:  # a stored config read back
        value = f"image:{value.get('image', '')}"
    if isinstance(value, Pixels) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        if not isinstance(value, Pixels) and not (math.isfinite(value) and 0 <= value <= 255):
            raise OptionError(f"{method} baseline {value!r}: a pixel value must be a finite number in 0..255")
        return value if isinstance(value, Pixels) else float(value)
    if isinstance(value, str):
        if value.startswith("image:"):
            return Pixels.load(value[len("image:"):])
        if value in ("mean", "blur", *extra):
            return value
        try:
            return parse_baseline(float(value), method, extra)
        except ValueError:
            pass
    choices = ", ".join(f"'{c}'" for c in ("mean", "blur", *extra))
    raise OptionError(f"{method} baseline {value!r}: give a pixel value (0 = black), {choices} or 'image:PATH'")


def baseline_images(images, cfg):
    """What a removed region shows, per image ``[B, H, W, C]`` (pixel space), from a
    config with ``baseline`` and ``blur_sigma``."""
    return baseline_pixels(images, cfg.baseline, cfg.blur_sigma)


def baseline_pixels(images, b, blur_sigma: float = 8.0):
    """``images [B, H, W, C]`` replaced by the baseline ``b`` (see `parse_baseline`)."""
    if isinstance(b, Pixels):
        from convlens.pixels import fit, to_rgb_uint8
        px = fit(to_rgb_uint8(b.array), images.shape[1:3], "squash").astype(np.float32)
        return jnp.broadcast_to(jnp.asarray(px), images.shape)
    if b == "mean":
        return jnp.broadcast_to(jnp.mean(images, axis=(1, 2), keepdims=True), images.shape)
    if b == "blur":
        return gaussian_blur(images, blur_sigma)
    return jnp.full_like(images, float(b))
