"""Input preprocessing, owned by the model spec and computed in jnp.

Modes follow ``keras.applications.imagenet_utils.preprocess_input``:

* ``caffe``: RGB -> BGR, minus the ImageNet channel means, no scaling (VGG16/19, ResNet50);
* ``tf``: scale to [-1, 1] (MobileNetV2);
* ``torch``: scale to [0, 1], minus mean, over std per RGB channel;
* ``rescale``: multiply by ``scale`` (1/255 by default: the *Deep Learning with Python* convnet);
* ``none``: pixels as float32 0..255 (models that preprocess inside, e.g. with a Rescaling layer).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from convlens.errors import ConvlensError

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("caffe", "tf", "torch", "rescale", "none")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A preprocessing mode; calling it maps pixels ``[B, H, W, 3]`` (0..255) to model input.

    ``shift`` is subtracted from the pixels before anything else: a model that sees
    ``x + shift`` as it saw ``x`` (the compensated model of the input-invariance test)."""

    mode: str = "none"
    scale: float = 1.0 / 255.0
    shift: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConvlensError(f"unknown preprocessing {self.mode!r}; choose one of {', '.join(MODES)}")

    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if self.shift:
            x = x - self.shift
        if self.mode == "caffe":
            return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - jnp.asarray(TORCH_MEAN)) / jnp.asarray(TORCH_STD)
        if self.mode == "rescale":
            return x * self.scale
        return x

    def invert(self, x):
        """Model input back to pixels (0..255 float), for showing optimised inputs."""
        return self._invert(x) + self.shift

    def _invert(self, x):
        x = jnp.asarray(x, jnp.float32)
        if self.mode == "caffe":
            return (x + jnp.asarray(CAFFE_MEAN_BGR, jnp.float32))[..., ::-1]
        if self.mode == "tf":
            return (x + 1.0) * 127.5
        if self.mode == "torch":
            return (x * jnp.asarray(TORCH_STD) + jnp.asarray(TORCH_MEAN)) * 255.0
        if self.mode == "rescale":
            return x / self.scale
        return x

    def describe(self) -> str:
        name = f"rescale(x{self.scale:g})" if self.mode == "rescale" else self.mode
        return name + (f" of pixels minus {self.shift:g}" if self.shift else "")
