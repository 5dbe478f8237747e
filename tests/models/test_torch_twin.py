"""The PyTorch twin (tests/torch_twin.py) computes what convlens computes, so reference
libraries and speed comparisons that run on it compare like with like."""

import jax
import numpy as np
import pytest

from convlens.models.registry import build_model
from tests.conftest import photo_batch
from tests.kernels.nets import with_random_biases

torch = pytest.importorskip("torch", reason="PyTorch not installed (CI installs it for this check)")


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("vgg_tiny", 32), ("smallcnn", 150), ("resnet50", 64), ("mobilenet_v2", 64),
                                        ("efficientnet_b0", 64), ("mobilenet_v3_small", 64), ("convnext_tiny", 64),
                                        ("inception_v3", 75), ("densenet121", 64), ("xception", 71)])
def test_twin_matches_convlens_layer_by_layer(name, size):
    from tests.torch_twin import nchw, twin
    fixed = name in ("vgg_tiny", "smallcnn")
    model = build_model(name, input_shape=None if fixed else (size, size, 3))
    params = with_random_biases(model, 1)
    x = np.asarray(model.preprocess(photo_batch((size, size), ("chelsea", "coffee")).astype(np.float32)))
    layers = [n for n in model.layer_names if model.graph.by_name[n].kind != "container" and n != model.graph.output]
    logits, acts = jax.jit(lambda p, v: model.apply(p, v, layers=layers, logits=True))(params, x)
    net = twin(model, params, logits=True, capture=layers)
    with torch.no_grad():
        y = net(nchw(x)).numpy()
    for layer in layers:
        ours = np.asarray(acts[layer])
        theirs = net.outputs[layer].numpy()
        theirs = theirs.transpose(0, 2, 3, 1) if theirs.ndim == 4 else theirs
        tol = 1e-4 * max(1.0, float(np.abs(ours).max()))
        assert np.abs(ours - theirs).max() <= tol, (name, layer, float(np.abs(ours - theirs).max()))
    # convlens reads a single unit as the two-class view [-z, z]; the twin gives z.
    y = np.asarray(model.class_scores(y))
    np.testing.assert_allclose(y, np.asarray(logits), atol=1e-4 * max(1.0, float(np.abs(logits).max())))
