"""Occlusion against independent truths: the whole-image identity, a naive loop, Captum,
and incremental == brute force."""

import sys
from pathlib import Path

import numpy as np
import pytest

import convlens
from convlens.errors import ConvlensError
from convlens.kernels import baselines, incremental, occlusion
from tests.kernels.nets import gap_net, layer, functional, with_random_biases


def rand_images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype("float32")


@pytest.fixture(scope="module")
def tiny():
    return convlens.load_model("vgg_tiny", random_init=0)


@pytest.fixture(scope="module")
def small():
    return convlens.load_model("smallcnn", random_init=1)


_FORWARD = {}


def logits_of(model, params, x):
    import jax
    if model not in _FORWARD:  # one compiled forward per model, not one per call
        _FORWARD[model] = jax.jit(lambda p, a: model.apply(p, model.preprocess(a), logits=True)[0])
    return np.asarray(_FORWARD[model](params, x))


@pytest.mark.parametrize("baseline", [0.0, 127.0, "mean", "blur"])
def test_whole_image_window_is_f_minus_f_baseline(tiny, baseline):
    model, params = tiny
    x = rand_images(3, (32, 32))
    e = convlens.explain(model, params, x, "occlusion", window=32, stride=5, baseline=baseline, target="top3")
    assert e["sensitivity"].shape == (3, 3, 1, 1)
    if baseline == "mean":
        base = np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    elif baseline == "blur":
        import jax.numpy as jnp
        base = np.asarray(baselines.gaussian_blur(jnp.asarray(x), 8.0))
    else:
        base = np.full_like(x, baseline)
    f, f0 = logits_of(model, params, x), logits_of(model, params, np.ascontiguousarray(base, np.float32))
    want = np.take_along_axis(f - f0, e.targets, axis=1)
    np.testing.assert_allclose(e["sensitivity"][:, :, 0, 0], want, rtol=1e-5, atol=1e-6)
    # One window covers everything: the heatmap is that drop everywhere.
    np.testing.assert_allclose(e["heatmap"], np.broadcast_to(want[:, :, None, None], e["heatmap"].shape),
                               rtol=1e-5, atol=1e-6)


def test_given_image_baseline(tiny, tmp_path):
    from PIL import Image
    model, params = tiny
    x = rand_images(2, (32, 32))
    img = np.random.default_rng(5).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "base.png")
    e = convlens.explain(model, params, x, "occlusion", window=32, baseline=f"image:{tmp_path / 'base.png'}")
    f0 = logits_of(model, params, np.repeat(img[None].astype(np.float32), 2, 0))
    want = np.take_along_axis(logits_of(model, params, x) - f0, e.targets, axis=1)
    np.testing.assert_allclose(e["sensitivity"][:, :, 0, 0], want, rtol=1e-5, atol=1e-6)
    assert e.config.baseline.__json__()["sha256"]


def naive_occlusion(model, params, img, target, window, stride, base_value=0.0):
    """One occluded image at a time, Captum's geometry written out by hand."""
    h, w = img.shape[:2]
    ny = int(np.ceil((h - window[0]) / stride[0])) + 1
    nx = int(np.ceil((w - window[1]) / stride[1])) + 1
    f = logits_of(model, params, img[None])[0, target]
    sens = np.zeros((ny, nx))
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for i in range(ny):
        for j in range(nx):
            y0, x0 = i * stride[0], j * stride[1]
            occ = img.copy()
            occ[y0:y0 + window[0], x0:x0 + window[1]] = base_value
            sens[i, j] = f - logits_of(model, params, occ[None])[0, target]
            total[y0:y0 + window[0], x0:x0 + window[1]] += sens[i, j]
            count[y0:y0 + window[0], x0:x0 + window[1]] += 1
    return sens, np.where(count > 0, total / np.maximum(count, 1), 0.0)


@pytest.mark.parametrize("window, stride", [((8, 8), (4, 4)), ((7, 5), (6, 4)), ((4, 4), (9, 9))])
def test_matches_naive_loop(tiny, window, stride):
    model, params = tiny
    x = rand_images(2, (32, 32), seed=3)
    e = convlens.explain(model, params, x, "occlusion", window=window, stride=stride, target=[1, 7])
    for b in range(2):
        for ti, t in enumerate((1, 7)):
            sens, heat = naive_occlusion(model, params, x[b], t, window, stride)
            np.testing.assert_allclose(e["sensitivity"][b, ti], sens, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(e["heatmap"][b, ti], heat, rtol=1e-4, atol=1e-6)


def test_probability_drop(tiny):
    model, params = tiny
    x = rand_images(1, (32, 32))
    e = convlens.explain(model, params, x, "occlusion", window=32)
    p = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # noqa: E731
    f, f0 = logits_of(model, params, x)[0], logits_of(model, params, np.zeros_like(x))[0]
    t = e.targets[0, 0]
    np.testing.assert_allclose(e["prob_drop"][0, 0, 0, 0], p(f)[t] - p(f0)[t], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{}, {"incremental": True}])
def test_same_result_for_every_chunk_size(tiny, mode):
    model, params = tiny
    x = rand_images(3, (32, 32), seed=4)
    ref = convlens.explain(model, params, x, "occlusion", window=6, stride=5, chunk=10_000, target="top2", **mode)
    for chunk in (1, 7, 64):
        other = convlens.explain(model, params, x, "occlusion", window=6, stride=5, chunk=chunk, target="top2",
                                 **mode)
        for name in ref.outputs:
            np.testing.assert_allclose(other[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=f"{name} {chunk}")


@pytest.mark.slow
@pytest.mark.parametrize("window, stride", [(8, 6), (5, 9), (16, 16), (32, 12), (3, 11)])
def test_incremental_equals_brute_force_small_convnet(small, window, stride):
    model, params = small
    x = rand_images(2, (150, 150), seed=6)
    a = convlens.explain(model, params, x, "occlusion", window=window, stride=stride)
    b = convlens.explain(model, params, x, "occlusion", window=window, stride=stride, incremental=True)
    scale = np.abs(a["sensitivity"]).max()
    assert scale > 0
    np.testing.assert_allclose(b["sensitivity"], a["sensitivity"], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("window, stride", [((64, 64), (48, 48)), ((40, 24), (96, 100))])
def test_incremental_equals_brute_force_vgg16(window, stride):
    model, params = convlens.load_model("vgg16", random_init=0)
    x = rand_images(1, (224, 224), seed=7)
    a = convlens.explain(model, params, x, "occlusion", window=window, stride=stride, target="top2")
    b = convlens.explain(model, params, x, "occlusion", window=window, stride=stride, target="top2",
                         incremental=True)
    scale = np.abs(a["sensitivity"]).max()
    np.testing.assert_allclose(b["sensitivity"], a["sensitivity"], rtol=1e-4, atol=1e-4 * scale)
    assert incremental.describe(model, (224, 224), b.config, occlusion.axis_masks(224, window[0], stride[0]),
                                occlusion.axis_masks(224, window[1], stride[1]))  # some layers incremental


@pytest.mark.slow
def test_approximate_mode_is_close(small):
    model, params = small
    x = rand_images(1, (150, 150), seed=8)
    a = convlens.explain(model, params, x, "occlusion", window=16, stride=8)
    b = convlens.explain(model, params, x, "occlusion", window=16, stride=8, incremental=True, tau=0.5)
    corr = np.corrcoef(a["sensitivity"].ravel(), b["sensitivity"].ravel())[0, 1]
    assert corr > 0.9


def test_incremental_refuses_branching_graphs():
    model = functional("branchy", [
        layer("Conv2D", "c1", "img", filters=4, kernel_size=[3, 3], padding="same", activation="relu"),
        layer("Conv2D", "c2", "c1", filters=4, kernel_size=[3, 3], padding="same"),
        {"class_name": "Add", "name": "add", "config": {"name": "add"},
         "inbound_nodes": [[["c1", 0, 0, {}], ["c2", 0, 0, {}]]]},
        layer("GlobalAveragePooling2D", "gap", "add"),
        layer("Dense", "out", "gap", units=3),
    ], (16, 16, 3))
    params = with_random_biases(model, 0)
    x = rand_images(1, (16, 16))
    convlens.explain(model, params, x, "occlusion", window=4)  # brute force works on any graph
    with pytest.raises(ConvlensError, match="sequential chain.*without incremental"):
        convlens.explain(model, params, x, "occlusion", window=4, incremental=True)


def test_bad_options():
    model = gap_net()
    params = with_random_biases(model, 0)
    x = rand_images(1, (16, 16))
    # tau < 1 approximates the incremental mode, and so turns it on wherever it is given
    # (`convlens occlusion --tau` and `explain -o tau=` alike).
    from convlens.kernels.occlusion import OcclusionConfig
    assert OcclusionConfig(tau=0.5).incremental and not OcclusionConfig().incremental
    with pytest.raises(ConvlensError, match="baseline 'grey'"):
        convlens.explain(model, params, x, "occlusion", baseline="grey")
    with pytest.raises(ConvlensError, match="window=0 is out of range"):
        convlens.explain(model, params, x, "occlusion", window=0)
    with pytest.raises(ConvlensError, match="baseline nan: a pixel value must be a finite number"):
        convlens.explain(model, params, x, "occlusion", baseline=float("nan"))
    # A window larger than the image would give one position and a constant map.
    with pytest.raises(ConvlensError, match="window 20x20 is larger than the model's 16x16 input"):
        convlens.explain(model, params, x, "occlusion", window=20)


@pytest.mark.slow
def test_matches_captum(small):
    torch = pytest.importorskip("torch", reason="PyTorch not installed (CI installs it for this check)")
    ca = pytest.importorskip("captum.attr", reason="Captum not installed (CI installs it for this check)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from common import torch_model
    model, params = small
    weights = {k: {n: np.asarray(v) for n, v in vs.items()} for k, vs in params.items()}
    net = torch_model("smallcnn", weights, inplace=False, squash=False)
    x = rand_images(2, (150, 150), seed=9)
    # Class 1 of the single unit's two-class view is its logit z, Captum's target 0.
    e = convlens.explain(model, params, x, "occlusion", target=1, window=(20, 12), stride=(9, 7), baseline=0.0)
    xt = torch.from_numpy((x / 255.0).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        attr = ca.Occlusion(net).attribute(xt, sliding_window_shapes=(3, 20, 12), strides=(3, 9, 7),
                                           baselines=0.0, target=0, perturbations_per_eval=64)
    theirs = attr.numpy().sum(1) / 3  # the same value on each channel
    np.testing.assert_allclose(e["heatmap"][:, 0], theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_drilldown(tiny):
    """Coarse positions and the refined ones are exact; the rest is the coarse map spread
    bilinearly; refined positions are where the coarse drop is largest."""
    model, params = tiny
    x = rand_images(2, (32, 32), seed=10)
    ref = convlens.explain(model, params, x, "occlusion", window=6, stride=3)["sensitivity"][:, 0]
    gy, gx = ref.shape[1:]
    coarse, weights = occlusion.coarse_to_fine(gy, gx)
    none = convlens.explain(model, params, x, "occlusion", window=6, stride=3, drilldown=0.0)["sensitivity"][:, 0]
    np.testing.assert_allclose(none.reshape(2, -1)[:, coarse], ref.reshape(2, -1)[:, coarse], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(none.reshape(2, -1), ref.reshape(2, -1)[:, coarse] @ weights.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(none[:, 1, 0], (ref[:, 0, 0] + ref[:, 2, 0]) / 2, rtol=1e-5, atol=1e-6)
    half = convlens.explain(model, params, x, "occlusion", window=6, stride=3, drilldown=0.5,
                            incremental=True)["sensitivity"][:, 0]
    exact = np.isclose(half, ref, rtol=1e-5, atol=1e-6).reshape(2, -1)
    rest = gy * gx - len(coarse)
    assert (exact.sum(1) >= len(coarse) + int(np.ceil(0.5 * rest))).all()
    for b in range(2):  # refined = the largest coarse-interpolated drops
        interp = np.abs(none[b].ravel())
        interp[coarse] = -np.inf
        top = np.argsort(-interp)[: int(np.ceil(0.5 * rest))]
        assert exact[b, top].all()
