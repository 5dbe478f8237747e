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
# Every compiled program goes into a cache shared with the subprocesses the CLI tests
# start, so a program compiled once in the session is loaded, not compiled, the next time.
# (LLVM's -O0 was tried: the fast tier compiled quicker, but with it the full suite took
# 86 minutes on CI, most of them in tests that run programs, not compile them.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="convlens-test-xla-")
    # Only programs worth keeping: Keras compiles thousands of tiny initialisers.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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
def _release_keras_sessions():
    """After each test module, Keras's session goes. Compiled programs stay (a later module
    reuses them): each XLA:CPU executable maps hundreds of memory regions, and the
    executor drops them all before a compile that would cross Linux's cap
    (`executor._guard_regions`; the cap once crashed CI in the Keras zoo test)."""
    yield
    import sys
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
