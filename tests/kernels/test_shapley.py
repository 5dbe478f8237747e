"""GradientShap: equal to Captum's on the same draws, exact on a linear model, and
independent of the chunk."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convlens.kernels import shapley as S
from tests.kernels.nets import bn_residual_net, functional, layer, random_params


def test_gradient_shap_equals_captums_on_the_same_draws():
    torch = pytest.importorskip("torch")
    pytest.importorskip("captum")
    from captum.attr import GradientShap

    from tests.kernels.test_propagation import _zennit
    from tests.torch_modules import ModuleTwin
    _zennit()  # the module twin's Add is zennit's Sum
    m = bn_residual_net()
    params = random_params(m, 0)
    rng = np.random.default_rng(1)
    imgs = jnp.asarray(rng.uniform(0, 255, (2, 16, 16, 3)), jnp.float32)
    refs = jnp.asarray(rng.uniform(0, 255, (5, 16, 16, 3)), jnp.float32)
    twin = ModuleTwin(m, {k: {n: np.asarray(a) for n, a in v.items()} for k, v in params.items()}).eval()
    nchw = lambda a: torch.tensor(np.asarray(m.preprocess(a))).permute(0, 3, 1, 2).contiguous()
    targets = jnp.asarray([[1], [3]])
    n, b = 6, 2
    # Captum draws the references with numpy (row b * n + s), then the points.
    np.random.seed(0)
    idx = np.random.choice(5, n * b).reshape(b, n)
    alphas = np.random.uniform(0.0, 1.0, n * b).reshape(b, n)
    np.random.seed(0)
    ref = GradientShap(twin).attribute(nchw(imgs), nchw(refs), n_samples=n, stdevs=0.0,
                                       target=torch.tensor([1, 3])).detach().permute(0, 2, 3, 1).numpy()
    mine = S.gradient_shap_with(m, params, imgs, targets, jnp.stack([refs[idx[:, s]] for s in range(n)]),
                                jnp.asarray(alphas.T, jnp.float32))
    np.testing.assert_allclose(np.asarray(mine[:, 0]), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_gradient_shap_is_exact_on_a_linear_model_and_independent_of_the_chunk():
    """One reference (mid grey): on a linear model every draw's term is (x - r) * w, so the
    attribution sums to f(x) - f(r) exactly, whatever the points drawn."""
    m = functional("linear", [layer("Flatten", "fl", "img"), layer("Dense", "pred", "fl", units=3)], (6, 6, 3))
    params = random_params(m, 2)
    imgs = jnp.asarray(np.random.default_rng(3).uniform(0, 255, (3, 6, 6, 3)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    cfg = S.GradientShapConfig(samples=5, references=1, background="constant", chunk=3)
    out = S.gradient_shap(m, params, imgs, 2, cfg, keys)
    f = lambda a: m.apply(params, m.preprocess(a), logits=True)[0]
    gap = jnp.take_along_axis(f(imgs) - f(jnp.full_like(imgs, 127.5)), out["targets"], 1)
    np.testing.assert_allclose(out["attribution"].sum((2, 3, 4)), gap, rtol=1e-4, atol=1e-4)
    again = S.gradient_shap(m, params, imgs, 2, dataclasses.replace(cfg, chunk=1), keys)
    np.testing.assert_allclose(again["attribution"], out["attribution"], rtol=1e-5, atol=1e-6)
    # Several references: each image's draws, and so its result, do not depend on its batch-mates.
    cfg = dataclasses.replace(cfg, references=4, background="noise")
    full = S.gradient_shap(m, params, imgs, 1, cfg, keys)
    one = S.gradient_shap(m, params, imgs[1:2], 1, cfg, keys[1:2])
    np.testing.assert_allclose(one["attribution"][0], full["attribution"][1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- KernelSHAP

def _game(m, params, img, seg, base, target):
    """The coalition game of one image: ``v(z [N, S]) -> [N]`` scores."""
    fwd = jax.jit(lambda x: m.apply(params, m.preprocess(x), logits=True)[0][:, target])

    def v(z):
        z = np.asarray(z, np.float32)
        on = z[:, np.asarray(seg)] > 0.5  # [N, H, W]
        x = np.where(on[..., None], np.asarray(img)[None], np.asarray(base)[None])
        return np.concatenate([np.asarray(fwd(jnp.asarray(x[i:i + 64]))) for i in range(0, len(x), 64)])
    return v


def _brute_force_shapley(v, m):
    """phi_i = sum over coalitions S without i of |S|! (m - |S| - 1)! / m! (v(S + i) - v(S))."""
    import itertools
    import math
    subsets = list(itertools.product((0, 1), repeat=m))
    vals = dict(zip(subsets, v(np.asarray(subsets))))
    phi = np.zeros(m)
    for s in subsets:
        k = sum(s)
        for i in range(m):
            if not s[i]:
                with_i = s[:i] + (1,) + s[i + 1:]
                phi[i] += math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m) * (vals[with_i] - vals[s])
    return phi


@pytest.fixture(scope="module")
def small():
    m = bn_residual_net()
    params = random_params(m, 21)
    imgs = jnp.asarray(np.random.default_rng(22).uniform(0, 255, (2, 16, 16, 3)), jnp.float32)
    return m, params, imgs, jax.random.split(jax.random.PRNGKey(5), 2)


def test_kernelshap_with_every_coalition_is_the_exact_shapley_value(small):
    m, params, imgs, keys = small
    cfg = S.KernelShapConfig(features=9, samples=600, segmentation="grid", baseline=0.0, chunk=64)
    assert cfg.exact
    out = S.kernel_shap(m, params, imgs, 1, cfg, keys)
    for b in range(2):
        v = _game(m, params, imgs[b], out["segments"][b], jnp.zeros_like(imgs[b]), int(out["targets"][b, 0]))
        want = _brute_force_shapley(v, 9)
        np.testing.assert_allclose(out["values"][b, 0], want, rtol=0, atol=2e-4 * np.abs(want).max())
        full, empty = v(np.ones((1, 9))), v(np.zeros((1, 9)))
        np.testing.assert_allclose(float(out["values"][b, 0].sum()), float((full - empty)[0]), rtol=1e-4, atol=1e-5)


def test_kernelshap_equals_shaps_kernel_explainer(small):
    """Every coalition: shap's values. Sampled: convlens's constrained fit on shap's own
    coalitions and weights gives shap's values (l1_reg off)."""
    shap = pytest.importorskip("shap")
    m, params, imgs, keys = small
    cfg = S.KernelShapConfig(features=9, samples=600, segmentation="grid", baseline=0.0, chunk=64)
    out = S.kernel_shap(m, params, imgs[:1], 1, cfg, keys[:1])
    v = _game(m, params, imgs[0], out["segments"][0], jnp.zeros_like(imgs[0]), int(out["targets"][0, 0]))
    ex = shap.KernelExplainer(v, np.zeros((1, 9)))
    phi = ex.shap_values(np.ones((1, 9)), nsamples=2 ** 9, l1_reg=False, silent=True)
    np.testing.assert_allclose(out["values"][0, 0], np.ravel(phi), rtol=0, atol=2e-4 * np.abs(phi).max())
    # Sampled: 100 of the 510 coalitions.
    np.random.seed(3)
    phi = np.ravel(ex.shap_values(np.ones((1, 9)), nsamples=100, l1_reg=False, silent=True))
    z, w, ey = ex.maskMatrix, ex.kernelWeights, np.ravel(ex.ey)
    got = S.constrained_fit(jnp.asarray(z, jnp.float32)[None], jnp.asarray(ey, jnp.float32)[None, :, None],
                            jnp.asarray(w, jnp.float32)[None], jnp.asarray([[float(np.ravel(ex.fnull)[0])]]),
                            jnp.asarray([[float(np.ravel(ex.fx)[0])]]), jnp.ones((1, 9), bool))
    np.testing.assert_allclose(got[0, 0], phi, rtol=0, atol=2e-4 * np.abs(phi).max())


def test_sampled_kernelshap_converges_to_the_exact_values(small):
    """Fewer coalitions than the 510 of 9 players: drawn, and closer to the exact values
    with more of them; always summing to f(all) - f(none)."""
    m, params, imgs, keys = small
    base = dict(features=9, segmentation="grid", baseline=0.0, chunk=64)
    exact = S.kernel_shap(m, params, imgs, 1, S.KernelShapConfig(samples=600, **base), keys)["values"]
    errs = []
    for n in (24, 480):
        cfg = S.KernelShapConfig(samples=n, **base)
        assert not cfg.exact
        got = S.kernel_shap(m, params, imgs, 1, cfg, keys)["values"]
        np.testing.assert_allclose(got.sum(-1), exact.sum(-1), rtol=1e-4, atol=1e-4)
        errs.append(float(jnp.abs(got - exact).max() / jnp.abs(exact).max()))
    assert errs[1] < 0.5 * errs[0] and errs[1] < 0.2, errs
