"""Shared fixtures. Keras (test-only) runs on the JAX backend: set before any import."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
# The executor remembers its XLA choices per machine; tests start with an empty memory of
# their own, so no run depends on what an earlier one measured.
if "CONVLENS_CACHE" not in os.environ:
    import tempfile
    os.environ["CONVLENS_CACHE"] = tempfile.mkdtemp(prefix="convlens-test-cache-")
# Tests check numbers, not speed: XLA's own settings throughout (measuring the candidates
# would compile every kernel three times); tests/test_architecture.py tests the tuning itself.
os.environ.setdefault("CONVLENS_XLA", "default")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    # Keep test output free of TensorFlow-less tfds chatter and absl warnings.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def photo_batch(size, names=("chelsea", "coffee", "astronaut", "rocket")) -> np.ndarray:
    """Real photos bundled with scikit-image, resized to ``size`` (H, W): uint8 [B, H, W, 3]."""
    from PIL import Image
    from skimage import data

    out = []
    for n in names:
        img = getattr(data, n)()
        out.append(np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR)))
    return np.stack(out)


@pytest.fixture(scope="session")
def photos224():
    return photo_batch((224, 224))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop the compiled programs it left behind. Each XLA:CPU
    executable maps hundreds of memory regions; a whole suite in one process otherwise
    crosses Linux's cap (vm.max_map_count, 65530) in the Keras zoo test and the next
    compile segfaults (CI did, twice). The executor guards its own compiles
    (`executor._guard_regions`); the tests' own jits and Keras's are released here."""
    yield
    import sys
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    if "jax" in sys.modules:
        from convlens.engine import executor
        executor.clear_cache()
