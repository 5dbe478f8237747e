"""convlens: batch explanations for convolutional image classifiers, in JAX."""

__version__ = "0.1.0"

from convlens import _xla  # noqa: E402

_xla.apply_defaults()  # before anything below can start a JAX backend

from convlens.errors import ConvlensError  # noqa: E402
from convlens.explain import Explanation, explain  # noqa: E402
from convlens.kernels.registry import METHODS  # noqa: E402
from convlens.models.registry import MODELS, build_model, load_model  # noqa: E402

__all__ = ["ConvlensError", "Explanation", "METHODS", "MODELS", "build_model", "explain", "load_model",
           "__version__"]
