"""Architectures, Keras import and preprocessing.

Attributes load lazily: ``convlens.models.labels`` and ``preprocess`` are importable
without JAX or Flax (the renderer reads label names), the network only when used."""

from convlens._lazy import lazy

_LAZY = {"Graph": "convlens.models.network", "Model": "convlens.models.network", "Node": "convlens.models.network",
         "Provenance": "convlens.models.network", "Preprocess": "convlens.models.preprocess"}

__all__ = list(_LAZY)


__getattr__ = lazy(globals(), _LAZY)
