"""Audits: a planted shortcut is found (and a control raises nothing); faithfulness
metrics match a naive loop; the randomisation check tells model-blind maps apart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convlens
from convlens import demo
from convlens.engine import audit, runner, sources, store
from convlens.errors import ConvlensError
from convlens.kernels import metrics


def trained(shortcut):
    x, y, _, names = demo.shapes(2000, seed=0, shortcut=shortcut)
    model = demo.demo_model(names)
    params = demo.train(model, x, y, epochs=5)
    xe, ye, me, _ = demo.shapes(160, seed=1, shortcut=shortcut)
    assert demo.accuracy(model, params, xe, ye) > 0.95
    return model, params, sources.ArraySource(xe, ye, class_names=names, masks=me)


@pytest.fixture(scope="module")
def shortcut_model():
    return trained(True)


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory, shortcut_model):
    model, params, src = shortcut_model
    out = tmp_path_factory.mktemp("audit") / "shortcut.zarr"
    runner.run(model, params, src, {"gradcam": {}, "occlusion": {"window": 12, "stride": 6}}, out, target="label",
               batch_size=16, progress=False)
    return model, params, out


@pytest.mark.slow
def test_planted_shortcut_is_flagged_where_it_is(shortcut_run):
    model, params, out = shortcut_run
    findings = audit.audit(out, audit.AuditConfig(sample=8, sanity_items=2), model=model, params=params,
                           progress=None)
    for method in ("gradcam", "occlusion"):
        loc = [f for f in findings[method]["flags"] if f["kind"] == "class_location"]
        assert len(loc) == 1, findings[method]["flags"]
        assert loc[0]["class_name"] == "stamped" and loc[0]["cell"] == [0, 3]  # the stamp: top-right corner
        assert loc[0]["share_of_items"] > 0.9 and "top-right corner" in loc[0]["why"]
        assert any(f["kind"] == "off_object" for f in findings[method]["flags"])
        # The most suspicious items are stamped ones.
        root = store.open_store(out)
        labels = root["labels"][:]
        top = [s["index"] for s in findings[method]["summary"]["most_suspicious"][:5]]
        assert all(labels[i] == 1 for i in top)
    root = store.open_store(out)
    assert store.validate(root) == []
    assert root["audit/gradcam/grid_mass"].shape == (160, 4, 4)
    assert root["audit/gradcam/class_mean"].shape == (2, 64, 64)
    assert root.attrs["audit"]["methods"]["gradcam"]["flags"]
    from convlens.render.tables import compare_table
    text = compare_table(out)
    assert "gradcam" in text and "occlusion" in text


@pytest.mark.slow
def test_control_raises_no_flag(tmp_path):
    model, params, src = trained(False)
    out = tmp_path / "control.zarr"
    runner.run(model, params, src, {"gradcam": {}, "occlusion": {"window": 12, "stride": 6}}, out, target="label",
               batch_size=16, progress=False)
    findings = audit.audit(out, audit.AuditConfig(metrics=False, sanity=False), progress=None)
    for method, e in findings.items():
        assert e["flags"] == [], (method, e["flags"])


def naive_curves(model, params, img, sal, target, steps, rep):
    order = np.argsort(-sal.ravel(), kind="stable")
    h, w = sal.shape
    counts = np.round(np.linspace(0, h * w, steps + 1)).astype(int)
    f = jax.jit(lambda p, x: jax.nn.softmax(model.apply(p, model.preprocess(x), logits=True)[0], -1))
    dele, ins = [], []
    for c in counts:
        moved = np.zeros(h * w, bool)
        moved[order[:c]] = True
        moved = moved.reshape(h, w)[..., None]
        dele.append(float(f(params, np.where(moved, rep, img)[None])[0, target]))
        ins.append(float(f(params, np.where(moved, img, rep)[None])[0, target]))
    frac = counts / (h * w)
    return np.array(dele), np.array(ins), np.trapezoid(dele, frac), np.trapezoid(ins, frac)


@pytest.mark.parametrize("replacement", ["blur", 0.0])
def test_deletion_insertion_match_naive_loop(replacement):
    model = demo.demo_model()
    params = model.init(3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    sal = rng.random((2, 1, 64, 64)).astype(np.float32)
    t = np.array([[0], [1]], np.int32)
    cfg = metrics.FaithfulnessConfig(steps=8, replacement=replacement, chunk=5)
    out = jax.device_get(metrics.faithfulness(model, params, jnp.asarray(x), jnp.asarray(sal), jnp.asarray(t), cfg))
    rep = np.asarray(metrics.replacement_images(jnp.asarray(x), cfg))
    for b in range(2):
        d, i, da, ia = naive_curves(model, params, x[b], sal[b, 0], t[b, 0], 8, rep[b])
        np.testing.assert_allclose(out["deletion"][b, 0], d, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["insertion"][b, 0], i, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["deletion_auc"][b, 0], da, rtol=1e-4)
        np.testing.assert_allclose(out["insertion_auc"][b, 0], ia, rtol=1e-4)
        # Average drop: the image kept where the (normalised) map says.
        m = sal[b, 0] / sal[b, 0].max()
        f = jax.nn.softmax(model.apply(params, model.preprocess(jnp.asarray(np.stack([
            x[b], x[b] * m[..., None] + rep[b] * (1 - m[..., None])]))), logits=True)[0], -1)
        p, pk = float(f[0, t[b, 0]]), float(f[1, t[b, 0]])
        np.testing.assert_allclose(out["drop"][b, 0], max(0.0, p - pk) / p, rtol=1e-4, atol=1e-7)
        assert out["increase"][b, 0] == float(pk > p)


@pytest.mark.slow
def test_sanity_check_separates_gradcam_from_an_input_only_method(shortcut_run):
    model, params, _ = shortcut_run
    x, _, _, _ = demo.shapes(4, seed=5)

    def gradcam(p):
        return convlens.explain(model, p, x, "gradcam", target=[1])["heatmap"][:, 0]

    def edges(p):  # ignores the model: an edge detector standing in for a model-blind method
        g = x.mean(-1)
        return np.abs(np.diff(g, axis=0, append=0)) + np.abs(np.diff(g, axis=1, append=0))
    _, _, rho_g = audit.sanity_check(model, params, gradcam)
    _, _, rho_e = audit.sanity_check(model, params, edges)
    assert rho_g[-1].mean() < 0.5  # Grad-CAM's maps change once the model is random
    np.testing.assert_allclose(rho_e, 1.0)  # the edge maps do not change at all
    assert rho_e[-1].mean() >= audit.AuditConfig().sanity_threshold


def test_audit_errors(tmp_path):
    from tests.kernels.nets import gap_net, with_random_biases
    with pytest.raises(ConvlensError, match="no such store"):
        audit.audit(tmp_path / "nope.zarr")
    model = gap_net()
    src = sources.ArraySource(np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "small.zarr"
    runner.run(model, with_random_biases(model, 0), src, ["gradcam"], out, progress=False)
    with pytest.raises(ConvlensError, match="no heatmaps of nosuch"):
        audit.audit(out, methods=["nosuch"])
    with pytest.raises(ConvlensError, match="audit: grid=0 is out of range"):
        audit.AuditConfig(grid=0)


# LIME on a 64-cell grid: SLIC cuts these flat 64x64 pictures into ~14 superpixels, too
# coarse to isolate the stamp on every item (it still flags it on 63% of them).
NEW_METHODS = {"scorecam": {}, "ablationcam": {}, "eigencam": {},
               "lime": {"samples": 300, "features": 64, "segmentation": "grid"}, "rise": {"samples": 300}}


@pytest.mark.slow
def test_gradient_free_and_sampling_methods_find_the_planted_shortcut(shortcut_model, tmp_path):
    """Registered like the others, the new methods go through the engine, the audit (with
    its faithfulness metrics and randomisation check) and the renderer with no special
    case, and the class-discriminative ones point at the planted stamp."""
    from convlens.render.render import render_store
    model, params, src = shortcut_model
    sub = sources.ArraySource(src.images[:48], src.labels[:48], class_names=src.class_names, masks=src.masks[:48])
    out = tmp_path / "new.zarr"
    s = runner.run(model, params, sub, NEW_METHODS, out, target="label", batch_size=16, progress=False)
    assert (s.done, s.failed) == (48, 0)
    assert store.validate(store.open_store(out)) == []
    findings = audit.audit(out, audit.AuditConfig(sample=4, sanity_items=2, min_items=6), model=model, params=params,
                           progress=None)
    for method in ("scorecam", "ablationcam", "lime", "rise"):
        loc = [f for f in findings[method]["flags"] if f["kind"] == "class_location"]
        assert loc and all(f["where"].startswith("top-right corner") for f in loc), (method, findings[method]["flags"])
    for method in NEW_METHODS:
        assert "deletion_auc" in findings[method]["faithfulness"], findings[method]["faithfulness"]
        assert "rank_correlation" in findings[method]["sanity"], findings[method]["sanity"]
    groups = render_store(out, tmp_path / "pics")
    assert len(groups["overlays"]) >= 48 and any(p.name == "lime_contact.png" for p in groups["overlays"])


def test_a_flat_peak_is_placed_at_its_centre_not_its_first_pixel():
    """Piecewise-constant maps (LIME superpixels, occlusion windows) peak on plateaus; a
    raw argmax would put every such peak at the plateau's top-left pixel."""
    heat = np.zeros((3, 8, 8), np.float32)
    heat[0, 4:8, 4:8] = 1.0  # a plateau in the bottom-right quarter
    heat[1, 2, 5] = 2.0  # a unique maximum
    heat[1, 6:8, 0:2] = 1.5
    heat[2, 0:2, 0:8] = 1.0  # a wide plateau along the top
    idx = audit.peak_pixels(heat)
    assert [divmod(int(i), 8) for i in idx] == [(5, 5), (2, 5), (0, 3)]
    stats = audit.item_statistics(heat, audit.AuditConfig(grid=2))
    assert stats["peak_cell"].tolist() == [3, 1, 0]


def test_quality_metrics_with_controls_intervals_and_ranking(tmp_path, shortcut_model):
    """The catalogue over a store: per-item scores of each method and of the two
    controls are stored, each summary carries a bootstrap interval containing its mean,
    and the pointing game (object masks, a shortcut model) is judged from the intervals;
    the ranking uses the informative metrics only."""
    import shutil

    from convlens.engine import store
    model, params, src = shortcut_model
    out = tmp_path / "q.zarr"
    runner.run(model, params, src, {"gradcam": {}}, out, target="label", batch_size=16, progress=False)
    cfg = audit.AuditConfig(metrics=False, sanity=False, quality="sparseness,pixel_flipping,pointing_game,auc",
                            quality_items=16, quality_options="pixel_flipping.steps=4")
    audit.audit(out, cfg, model=model, params=params, progress=None)
    root = store.open_store(out)
    q = root.attrs["audit"]["quality"]
    assert set(q["scores"]) == {"gradcam", "control_random", "control_sobel"}
    for src_name in q["scores"]:
        scores = np.asarray(root[f"audit/{src_name}/metrics/sparseness"][:])
        assert np.isfinite(scores).sum() == 16
        s = q["scores"][src_name]["sparseness"]
        assert s["ci"][0] <= s["mean"] <= s["ci"][1]
        assert s["mean"] == pytest.approx(np.nanmean(scores), rel=1e-6)
    assert root["audit/gradcam/metrics/pixel_flipping_curve"].shape[1] == 4
    used = [m for m, v in q["informative"].items() if v["informative"]]
    assert q["ranking"][0]["metrics"] == used
    for m, v in q["informative"].items():  # the verdict follows from the stored intervals
        hi = q["higher_is_better"][m]
        g, r = q["scores"]["gradcam"][m], q["scores"]["control_random"][m]
        assert v["informative"] == (g["ci"][0] > r["ci"][1] if hi else g["ci"][1] < r["ci"][0])
    shutil.rmtree(out)


def test_quality_randomisation_tests_agree_with_the_sanity_check(tmp_path, shortcut_model):
    """MPRT in the catalogue (one compiled program per batch) against the audit's sanity
    check (a host loop over the same stages, seed and items): the same rank correlations
    stage by stage. The controls ignore the weights: correlation 1, eMPRT ratio 1."""
    from convlens.engine import store
    model, params, src = shortcut_model
    out = tmp_path / "r.zarr"
    runner.run(model, params, src, {"gradcam": {}}, out, target="label", batch_size=16, progress=False)
    cfg = audit.AuditConfig(metrics=False, sanity=True, sanity_items=8, quality="mprt,efficient_mprt",
                            quality_items=8)
    audit.audit(out, cfg, model=model, params=params, progress=None)
    root = store.open_store(out)
    attrs = root.attrs["audit"]
    sanity = attrs["methods"]["gradcam"]["sanity"] if "methods" in attrs else attrs["gradcam"]["sanity"]
    curve = np.asarray(root["audit/gradcam/metrics/mprt_curve"][:])
    rows = curve[np.isfinite(curve).all(axis=1)]
    assert rows.shape == (8, len(sanity["rank_correlation"]))
    np.testing.assert_allclose(np.nanmean(rows, axis=0), sanity["rank_correlation"], atol=1e-4)
    for control in ("control_random", "control_sobel"):
        np.testing.assert_allclose(np.asarray(root[f"audit/{control}/metrics/mprt"][:])[:8], 1.0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(root[f"audit/{control}/metrics/efficient_mprt"][:])[:8], 1.0,
                                   atol=1e-5)


def test_quality_option_errors_are_one_line():
    from convlens.errors import OptionError
    with pytest.raises(OptionError, match="unknown metric 'roadd'"):
        audit.AuditConfig(quality="roadd")
    with pytest.raises(OptionError, match="has no option 'nois'"):
        audit.AuditConfig(quality="road_morf", quality_options="road_morf.nois=0")
