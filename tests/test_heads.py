"""Binary and multi-label heads, end to end, on Keras models trained here with planted cues.

* A cats-vs-dogs-style binary convnet (Flatten + one sigmoid unit, legacy .h5, folders of
  PNGs): the default run picks HiRes-CAM, both classes' maps are non-empty and point at
  their own cue, the audit flags both cues with their counts; Grad-CAM run explicitly is
  flagged degenerate with the suggestion.
* A tagging model (GAP + two sigmoid units, each label its own cue): ``positive`` targets
  explain exactly the labels Keras scores above one half, masked slots are -1/NaN, and the
  audit treats each label as a class.
"""

import json

import numpy as np
import pytest

import convlens
from convlens.engine import schema
from convlens import demo
from convlens.cli import main
from convlens.engine import runner, sources, store

keras = pytest.importorskip("keras")

SIZE = 64
S = SIZE // 8  # cue side
TL = (slice(S // 2, S // 2 + S), slice(S // 2, S // 2 + S))  # grid cell (0, 0) of 4x4
BR = (slice(SIZE - S // 2 - S, SIZE - S // 2), slice(SIZE - S // 2 - S, SIZE - S // 2))  # cell (3, 3)


def scene(rng):
    """A textured background and one object of muted random colour near the centre."""
    img = demo._background(rng, SIZE)
    m = demo._shape_mask(int(rng.integers(0, 3)), *rng.uniform(SIZE * 0.35, SIZE * 0.65, 2),
                         rng.uniform(SIZE / 8, SIZE / 4.5), SIZE)
    img[m] = rng.uniform(60, 200, 3) * 0.8 + img[m] * 0.2
    return img


def binary_data(n, seed):
    """Class 0 ('cat') carries a white square in the top-left corner, class 1 ('dog') the
    same square in the bottom-right: one cue per class."""
    rng = np.random.default_rng(seed)
    x, y = np.empty((n, SIZE, SIZE, 3), np.uint8), rng.integers(0, 2, n).astype(np.int32)
    for i in range(n):
        img = scene(rng)
        img[TL if y[i] == 0 else BR] = 250.0
        x[i] = np.clip(img, 0, 255)
    return x, y


def tagging_data(n, seed):
    """Two independent labels: 'sun' = a yellow square top-left, 'sea' = a blue square
    bottom-right (an image has none, either or both)."""
    rng = np.random.default_rng(seed)
    x, y = np.empty((n, SIZE, SIZE, 3), np.uint8), rng.integers(0, 2, (n, 2)).astype(np.int32)
    for i in range(n):
        img = scene(rng)
        if y[i, 0]:
            img[TL] = (250.0, 220.0, 10.0)
        if y[i, 1]:
            img[BR] = (20.0, 40.0, 250.0)
        x[i] = np.clip(img, 0, 255)
    return x, y


def fit(head, x, y, loss, seed, epochs=6, lr=1e-3):
    """Trains the same weights whatever ran before in the process: every initializer has
    its own seed and the batches keep their order (Keras's global seeding alone gave
    another model when the process had trained one before)."""
    L = keras.layers
    keras.utils.set_random_seed(seed)
    init = iter(range(1000 * seed, 1000 * seed + 100))

    def seeded(layer):
        if hasattr(layer, "kernel_initializer"):
            layer.kernel_initializer = keras.initializers.GlorotUniform(seed=next(init))
        return layer
    m = keras.Sequential([keras.Input((SIZE, SIZE, 3)), L.Rescaling(1 / 255.0),
                          *map(seeded, [L.Conv2D(16, 3, activation="relu", name="conv1"), L.MaxPooling2D(2),
                                        L.Conv2D(32, 3, activation="relu", name="conv2"), L.MaxPooling2D(2),
                                        L.Conv2D(64, 3, activation="relu", name="conv3"), *head])])
    m.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=["accuracy"])
    m.fit(x.astype(np.float32), y.astype(np.float32), epochs=epochs, batch_size=32, verbose=0, shuffle=False)
    return m


@pytest.fixture(scope="module")
def cats_dogs(tmp_path_factory):
    """The binary model as a legacy .h5 and a held-out folder ``cat/`` ``dog/`` of PNGs."""
    from PIL import Image
    tmp = tmp_path_factory.mktemp("catsdogs")
    x, y = binary_data(600, 0)
    m = fit([keras.layers.Flatten(), keras.layers.Dense(1, activation="sigmoid")], x, y, "binary_crossentropy", 1)
    m.save(tmp / "cats_dogs.h5")
    xe, ye = binary_data(120, 1)
    assert ((m.predict(xe.astype(np.float32), verbose=0)[:, 0] > 0.5) == ye).mean() > 0.95
    for i, (img, label) in enumerate(zip(xe, ye)):
        d = tmp / "held_out" / ("cat", "dog")[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    return tmp, ye


def cli(capsys, *args) -> str:
    """Runs the command line; its output and messages."""
    with pytest.raises(SystemExit) as e:
        main(list(map(str, args)))
        raise SystemExit(0)
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    return out.out + out.err


def audit_of(path, method):
    root = store.open_store(path)
    return root.attrs["audit"]["methods"][method]


@pytest.mark.slow
def test_binary_flatten_head_default_run_points_at_both_cues(cats_dogs, capsys):
    tmp, ye = cats_dogs
    out = tmp / "default.zarr"
    r = cli(capsys, "run", tmp / "cats_dogs.h5", "--data", tmp / "held_out", "--out", out)
    assert "method: hirescam (chosen from the graph: the head flattens 'conv3'" in r
    root = store.open_store(out)
    assert list(root.attrs["methods"]) == ["hirescam"] and root.attrs["head"] == "binary"
    # top1 explains the predicted class, recorded in the two-class view the labels use
    p = root["predictions/topk_prob"][:]
    np.testing.assert_array_equal(root["hirescam/targets"][:, 0], root["predictions/topk_index"][:, 0])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert (root["hirescam/targets"][:, 0] == root["labels"][:]).mean() > 0.95
    cli(capsys, "audit", out, "--quality", "deletion,insertion,average_drop,increase_in_confidence",
        "--quality-items", 16)
    a = audit_of(out, "hirescam")
    empty = a["summary"]["empty_by_class"]
    for c in ("0", "1"):
        e, total = empty[c]
        assert total > 40 and 1 - e / total >= 0.95, empty
    flags = {(f["kind"], f.get("class_name")): f for f in a["flags"]}
    assert {("class_location", "cat"), ("class_location", "dog")} <= set(flags), a["flags"]
    assert not {k for k, _ in flags} & {"empty_maps", "degenerate", "sanity"}, a["flags"]
    assert flags["class_location", "cat"]["cell"] == [0, 0] and flags["class_location", "dog"]["cell"] == [3, 3]
    for name, c in (("cat", 0), ("dog", 1)):
        f = flags["class_location", name]
        assert f["class_items"] == int((ye == c).sum()) and f["items"] >= 0.95 * f["class_items"]
        assert f"of the {f['items']} items of class {name!r}" in f["why"] and not f["weak"]


@pytest.mark.slow
def test_binary_flatten_head_gradcam_is_flagged_degenerate(cats_dogs, capsys):
    tmp, ye = cats_dogs
    out = tmp / "gradcam.zarr"
    cli(capsys, "run", tmp / "cats_dogs.h5", "--data", tmp / "held_out", "--out", out, "-m", "gradcam")
    r = cli(capsys, "audit", out, "--quality", "none")
    a = audit_of(out, "gradcam")
    kinds = {f["kind"]: f for f in a["flags"]}
    # Averaged over the Flatten head's positions, the gradients of one class cancel: most
    # of its maps are empty (the precondition, measured here independently of the audit).
    root = store.open_store(out)
    e = convlens.explain(*convlens.load_model(tmp / "cats_dogs.h5"), root["inputs"][:], "gradcam")["heatmap"][:, 0]
    ye = root["labels"][:]  # the folder's order: cat/ then dog/
    empty_share = [float((np.maximum(e[ye == c], 0).reshape((ye == c).sum(), -1).max(axis=1) <= 0).mean())
                   for c in (0, 1)]
    assert max(empty_share) >= 0.5, empty_share
    deg = kinds["degenerate"]
    assert deg["instead"] == ["hirescam", "layercam"]
    assert "flattens 'conv3'" in deg["why"] and "-m hirescam" in deg["why"]
    assert "degenerate" in r and "-m hirescam" in r  # printed, not only stored
    by_class = kinds["empty_maps"]["by_class"]
    worst = ("cat", "dog")[int(np.argmax(empty_share))]
    assert by_class[worst][0] == round(empty_share[int(np.argmax(empty_share))] * by_class[worst][1])
    # A class flag resting on the few non-empty maps of a class says so.
    for f in a["flags"]:
        if f["kind"].startswith("class_") and f["items"] < f["class_items"]:
            assert f"only {f['items']} of its {f['class_items']} items" in f["why"]


@pytest.fixture(scope="module")
def tagging(tmp_path_factory):
    x, y = tagging_data(800, 0)
    m = fit([keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="sigmoid")], x, y,
            "binary_crossentropy", 0, epochs=15, lr=3e-3)
    tmp = tmp_path_factory.mktemp("tagging")
    m.save(tmp / "tagger.keras")
    xe, ye = tagging_data(96, 1)
    probs = m.predict(xe.astype(np.float32), verbose=0)
    assert ((probs > 0.5) == ye).all(axis=1).mean() > 0.9
    return tmp, xe, ye, probs


@pytest.mark.slow
def test_multilabel_positive_targets_and_audit_per_label(tagging):
    tmp, xe, ye, probs = tagging
    model, params = convlens.load_model(tmp / "tagger.keras", class_names=("sun", "sea"))
    assert model.multilabel and convlens.default_method(model) == "gradcam"
    out = tmp / "tags.zarr"
    runner.run(model, params, sources.ArraySource(xe), {"gradcam": {}}, out, target="positive", progress=False)
    root = store.open_store(out)
    assert root.attrs["head"] == "multilabel"
    assert (root["status"][:] == schema.DONE).all()  # an item without a positive label is not a failure
    t, heat = root["gradcam/targets"][:], root["gradcam/heatmap"][:]
    for i in range(len(xe)):
        # Exactly the labels Keras scores above one half, the most probable first.
        want = [k for k in np.argsort(-probs[i], kind="stable") if probs[i, k] > 0.5]
        got = [k for k in t[i] if k >= 0]
        assert got == want, (i, probs[i], t[i])
        assert (t[i, len(want):] == -1).all() and np.isnan(heat[i, len(want):]).all()
        assert np.isfinite(heat[i, :len(want)]).all()
    # The API masks the same way.
    e = convlens.explain(model, params, xe[:8], target="positive")
    np.testing.assert_array_equal(e.targets, t[:8])
    np.testing.assert_allclose(e["heatmap"], heat[:8], rtol=1e-4, atol=1e-6)
    findings = convlens_audit(out)
    a = findings["gradcam"]
    assert a["summary"]["maps"] == int((t >= 0).sum()) and a["summary"]["items"] == int((t >= 0).any(1).sum())
    assert a["summary"]["items_without_positive"] == int((t < 0).all(1).sum()) > 0
    flags = {(f["kind"], f.get("class_name")): f for f in a["flags"]}
    assert flags["class_location", "sun"]["cell"] == [0, 0], a["flags"]
    assert flags["class_location", "sea"]["cell"] == [3, 3], a["flags"]
    for k, name in enumerate(("sun", "sea")):
        assert flags["class_location", name]["class_items"] == int((t == k).sum())
    mean = store.open_store(out)["audit/gradcam/class_mean"][:]
    assert mean[0][:16, :16].sum() > 0.3 and mean[1][-16:, -16:].sum() > 0.3  # each label's mean map at its cue
    from convlens.render.report import report
    page = report(out, tmp / "report.html")[0].read_text()
    assert "sun" in page and "sea" in page


def convlens_audit(out):
    from convlens.engine.audit import AuditConfig, audit
    audit(out, AuditConfig(quality="none", controls=False), progress=None)
    return json.loads(json.dumps(store.open_store(out).attrs["audit"]["methods"]))
