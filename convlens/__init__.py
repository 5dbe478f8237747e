"""convlens: batch explanations for convolutional image classifiers, in JAX.

The public names load lazily, so ``convlens.render`` (which reads stores and draws)
never imports JAX.
"""

__version__ = "0.1.0"

from convlens import _xla  # noqa: E402

_xla.apply_defaults()  # before anything can start a JAX backend

from convlens.errors import ConvlensError  # noqa: E402

_LAZY = {"Explanation": "convlens.api", "explain": "convlens.api", "METHODS": "convlens.kernels.registry",
         "MODELS": "convlens.models.registry", "build_model": "convlens.models.registry",
         "load_model": "convlens.models.registry"}

__all__ = ["ConvlensError", "Explanation", "METHODS", "MODELS", "build_model", "explain", "load_model",
           "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convlens' has no attribute {name!r}")
