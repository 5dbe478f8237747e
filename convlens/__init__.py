"""convlens: batch explanations for convolutional image classifiers, in JAX.

The public names load lazily, so ``convlens.render`` (which reads stores and draws)
never imports JAX. Importing convlens changes no process-wide setting: XLA options
are chosen per computation by the executor (`convlens.engine.executor`).
"""

__version__ = "0.2.0"

from convlens._lazy import lazy  # noqa: E402
from convlens.errors import ConvlensError  # noqa: E402

_LAZY = {"Explanation": "convlens.api", "explain": "convlens.api", "evaluate": "convlens.api",
         "METHODS": "convlens.kernels.registry", "METRICS": "convlens.kernels.metrics.registry",
         "MODELS": "convlens.models.registry", "build_model": "convlens.models.registry",
         "load_model": "convlens.models.registry", "default_method": "convlens.kernels.common",
         "choose_method": "convlens.kernels.common"}

__all__ = ["ConvlensError", "Explanation", "METHODS", "METRICS", "MODELS", "build_model", "choose_method",
           "default_method", "evaluate", "explain", "load_model", "__version__"]


__getattr__ = lazy(globals(), _LAZY)
