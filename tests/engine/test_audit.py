"""Audits: a planted shortcut is found (and a control raises nothing); faithfulness
metrics match a naive loop; the randomisation check tells model-blind maps apart; the
quality metrics over a store keep their books (intervals, verdicts, ranking)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convlens.engine import schema
from convlens import demo
from convlens.engine import audit, runner, sources, store
from convlens.errors import ConvlensError
from convlens.kernels.metrics import faithful
from tests.kernels.nets import gap_net, with_random_biases


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
    findings = audit.audit(out, audit.AuditConfig(quality_items=8, quality_options="mprt.stages=2"), model=model,
                           params=params)
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
    assert schema.validate(root) == []
    assert root["audit/gradcam/grid_mass"].shape == (160, 4, 4)
    assert root["audit/gradcam/class_mean"].shape == (2, 64, 64)
    assert root.attrs["audit"]["methods"]["gradcam"]["flags"]
    q = root.attrs["audit"]["quality"]
    assert q["metrics"] == ["deletion", "insertion", "average_drop", "increase_in_confidence", "mprt"]
    assert findings["gradcam"]["quality"]["deletion"]["items"] == 8
    from convlens.render.tables import compare_table
    text = compare_table(out)
    assert "gradcam" in text and "occlusion" in text and "control_random" in text
    assert text.count("Ranking") == 1  # one ranking


@pytest.mark.slow
def test_control_raises_no_flag(tmp_path):
    model, params, src = trained(False)
    out = tmp_path / "control.zarr"
    runner.run(model, params, src, {"gradcam": {}, "occlusion": {"window": 12, "stride": 6}}, out, target="label",
               batch_size=16, progress=False)
    findings = audit.audit(out, audit.AuditConfig(quality="none"))
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
def test_deletion_insertion_and_average_drop_match_naive_loops(replacement):
    model = demo.demo_model()
    params = model.init(3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    sal = rng.random((2, 64, 64)).astype(np.float32)
    t = np.array([0, 1], np.int32)

    def score(im):
        return jax.nn.softmax(model.apply(params, model.preprocess(im), logits=True)[0], -1)
    args = (score, jnp.asarray(x), jnp.asarray(sal), jnp.asarray(t))
    opts = {"replacement": replacement, "blur_sigma": 10.0}
    dele, ins = faithful.deletion(*args, steps=8, **opts), faithful.insertion(*args, steps=8, **opts)
    drop, inc = faithful.average_drop(*args, **opts), faithful.increase_in_confidence(*args, **opts)
    rep = np.asarray(faithful._replacement(jnp.asarray(x), replacement, 10.0))
    for b in range(2):
        d, i, da, ia = naive_curves(model, params, x[b], sal[b], t[b], 8, rep[b])
        np.testing.assert_allclose(dele["curve"][b], d, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ins["curve"][b], i, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(dele["score"][b], da, rtol=1e-4)
        np.testing.assert_allclose(ins["score"][b], ia, rtol=1e-4)
        # Average drop: the image kept where the (normalised) map says.
        m = sal[b] / sal[b].max()
        f = np.asarray(score(jnp.asarray(np.stack([x[b], x[b] * m[..., None] + rep[b] * (1 - m[..., None])]))))
        p, pk = float(f[0, t[b]]), float(f[1, t[b]])
        np.testing.assert_allclose(drop["score"][b], max(0.0, p - pk) / p, rtol=1e-4, atol=1e-7)
        assert float(inc["score"][b]) == float(pk > p)


@pytest.mark.slow
def test_sanity_flag_separates_gradcam_from_an_input_only_map(shortcut_model, tmp_path):
    """The model-randomisation test through the audit: Grad-CAM's maps change once the
    model is random, a Sobel edge map (run as a method) does not and is flagged."""
    model, params, src = shortcut_model
    sub = sources.ArraySource(src.images[:16], src.labels[:16], class_names=src.class_names)
    out = tmp_path / "sanity.zarr"
    runner.run(model, params, sub, ["gradcam", "control_sobel"], out, target="label", batch_size=8, progress=False)
    findings = audit.audit(out, audit.AuditConfig(quality="mprt", quality_items=8, controls=False), model=model,
                           params=params, progress=None)
    assert findings["gradcam"]["quality"]["mprt"]["mean"] < 0.5
    assert findings["control_sobel"]["quality"]["mprt"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert [f["kind"] for f in findings["control_sobel"]["flags"] if f["kind"] == "sanity"] == ["sanity"]
    assert not any(f["kind"] == "sanity" for f in findings["gradcam"]["flags"])


def test_audit_errors(tmp_path):
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
    assert schema.validate(store.open_store(out)) == []
    findings = audit.audit(out, audit.AuditConfig(quality_items=4, quality_options="mprt.stages=2", min_items=6),
                           model=model, params=params, progress=None)
    for method in ("scorecam", "ablationcam", "lime", "rise"):
        loc = [f for f in findings[method]["flags"] if f["kind"] == "class_location"]
        assert loc and all(f["where"].startswith("top-right corner") for f in loc), (method, findings[method]["flags"])
    for method in NEW_METHODS:
        assert set(findings[method]["quality"]) == {"deletion", "insertion", "average_drop", "increase_in_confidence",
                                                    "mprt"}, findings[method]["quality"]
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


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A store of 16 items with masks from a small untrained net: enough to keep the books."""
    model = gap_net()
    params = with_random_biases(model, 4)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros((16, 16, 16), bool)
    masks[:, 3:12, 4:13] = True
    src = sources.ArraySource(x, rng.integers(0, 6, 16), masks=masks)
    out = tmp_path_factory.mktemp("quality") / "q.zarr"
    runner.run(model, params, src, {"gradcam": {}}, out, target="label", batch_size=8, progress=False)
    return model, params, out


def test_quality_metrics_with_controls_intervals_and_ranking(small_run):
    """The metrics over a store: per-item scores of the method and of the two controls are
    stored, each summary carries a bootstrap interval containing its mean, the verdicts
    follow from the intervals, and the ranking uses the informative metrics only."""
    model, params, out = small_run
    cfg = audit.AuditConfig(quality="sparseness,pixel_flipping,pointing_game,auc", quality_items=12,
                            quality_options="pixel_flipping.steps=4", batch=5, progress=False)
    audit.audit(out, cfg, model=model, params=params)
    root = store.open_store(out)
    q = root.attrs["audit"]["quality"]
    assert set(q["scores"]) == {"gradcam", "control_random", "control_sobel"}
    for src_name in q["scores"]:
        scores = np.asarray(root[f"audit/{src_name}/metrics/sparseness"][:])
        assert np.isfinite(scores).sum() == 12
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
    # The random control is drawn per item: its scores do not depend on the batch size.
    scores = np.asarray(root["audit/control_random/metrics/sparseness"][:])
    cfg1 = audit.AuditConfig(quality="sparseness", quality_items=12, batch=1, progress=False)
    audit.audit(out, cfg1, model=model, params=params)
    again = np.asarray(store.open_store(out)["audit/control_random/metrics/sparseness"][:])
    np.testing.assert_allclose(again, scores, rtol=1e-5, equal_nan=True)


def test_mprt_over_a_store_equals_a_layer_loop(small_run):
    """MPRT over a store (one compiled program per batch) against a host loop over the
    same stages and random weights: the same rank correlations stage by stage. The
    controls ignore the weights: correlation 1, eMPRT ratio 1."""
    from scipy.stats import spearmanr

    import convlens
    from convlens.engine.quality import FRESH_SEED, layers_with_weights
    from convlens.kernels.metrics.randomise import cascade
    model, params, out = small_run
    cfg = audit.AuditConfig(quality="mprt,efficient_mprt", quality_items=6, quality_options="mprt.stages=3",
                            progress=False)
    audit.audit(out, cfg, model=model, params=params)
    root = store.open_store(out)
    curve = np.asarray(root["audit/gradcam/metrics/mprt_curve"][:])[:6]
    x = root["inputs"][:6].astype(np.float32)
    t = root["gradcam/targets"][:6]
    ref = convlens.explain(model, params, x, "gradcam", target=t)["heatmap"][:, 0]
    fresh, p = model.init(FRESH_SEED), dict(params)
    for k, stage in enumerate(cascade(layers_with_weights(model, params), 3)):
        for name in stage:
            p[name] = fresh[name]
        m = convlens.explain(model, p, x, "gradcam", target=t)["heatmap"][:, 0]
        want = [spearmanr(np.abs(ref[b]).ravel(), np.abs(m[b]).ravel())[0] for b in range(6)]
        np.testing.assert_allclose(curve[:, k], np.nan_to_num(want, nan=np.nan), rtol=1e-4, atol=1e-4)
    for control in ("control_random", "control_sobel"):
        np.testing.assert_allclose(np.asarray(root[f"audit/{control}/metrics/mprt"][:])[:6], 1.0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(root[f"audit/{control}/metrics/efficient_mprt"][:])[:6], 1.0,
                                   atol=1e-5)


def test_quality_option_errors_are_one_line():
    from convlens.errors import OptionError
    with pytest.raises(OptionError, match="unknown metric 'roadd'"):
        audit.AuditConfig(quality="roadd")
    with pytest.raises(OptionError, match="has no option nois"):
        audit.AuditConfig(quality="road_morf", quality_options="road_morf.nois=0")
    with pytest.raises(OptionError, match="steps=-3 is out of range"):
        audit.AuditConfig(quality="deletion", quality_options="deletion.steps=-3")
    with pytest.raises(OptionError, match="no option baseline"):
        audit.AuditConfig(quality="sparseness", quality_options="sparseness.baseline=black")
