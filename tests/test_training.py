"""Explanations during training: the Keras callback and the recorder for Flax loops."""

import numpy as np
import pytest

import convlens
from convlens import demo
from convlens.engine import store
from convlens.errors import ConvlensError

keras = pytest.importorskip("keras")


def build():
    """The *Deep Learning with Python* cats-vs-dogs convnet (150x150, sigmoid output)."""
    from keras import layers
    return keras.Sequential([
        keras.Input((150, 150, 3)),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(128, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(128, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(), layers.Dropout(0.5),
        layers.Dense(512, activation="relu"), layers.Dense(1, activation="sigmoid")])


@pytest.fixture(scope="module")
def data():
    """The shapes data set (label = a planted stamp), upsampled to 150x150."""
    from PIL import Image
    x, y, _, names = demo.shapes(96, seed=3)
    x = np.stack([np.asarray(Image.fromarray(i).resize((150, 150), Image.BILINEAR)) for i in x])
    return x, y, names


def fit(x, y, callbacks, epochs=4):
    keras.utils.set_random_seed(0)
    m = build()
    m.compile(optimizer=keras.optimizers.Adam(3e-4), loss="binary_crossentropy", metrics=["accuracy"])
    h = m.fit(x.astype(np.float32) / 255.0, y.astype(np.float32), epochs=epochs, batch_size=16, verbose=0,
              shuffle=True, callbacks=callbacks(m))
    return m, h.history


@pytest.mark.slow
def test_callback_records_each_epoch_as_explain_would(data, tmp_path):
    from convlens.keras import ExplainCallback, convlens_model
    from convlens.models.keras_io import load_weights
    x, y, names = data
    probe = x[:6]
    out = tmp_path / "train.zarr"
    cb = []

    def with_cb(m):
        saver = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda e, logs: m.save_weights(str(tmp_path / f"e{e + 1}.weights.h5")))
        cb.append(ExplainCallback(probe, ["hirescam", "gradient"], out=str(out), labels=y[:6], preprocess="rescale"))
        cb.append(ExplainCallback(probe, ["gradient"], every=2, out=str(tmp_path / "every2.zarr"),
                                  preprocess="rescale"))
        return [saver, *cb]
    m, hist = fit(x, y, with_cb)
    _, plain = fit(x, y, lambda m: [])
    np.testing.assert_array_equal(hist["loss"], plain["loss"])  # the callback changes nothing in training
    root = store.open_store(out)
    assert list(root["epoch"][:]) == [1, 2, 3, 4]
    assert hist["accuracy"][-1] > 0.75  # it learned the stamp, so the maps mean something
    assert root["hirescam/heatmap"].shape == (4, 6, 1, 150, 150)
    assert root["hirescam/heatmap"].metadata.dimension_names == ("epoch", "sample", "target", "y", "x")
    np.testing.assert_allclose(root["metrics/loss"][:], hist["loss"], rtol=1e-6)
    np.testing.assert_allclose(root["metrics/accuracy"][:], hist["accuracy"], rtol=1e-6)
    assert len(cb[0].seconds) == 4
    every2 = store.open_store(tmp_path / "every2.zarr")
    assert list(every2["epoch"][:]) == [2, 4]
    np.testing.assert_array_equal(every2["gradient/heatmap"][1], root["gradient/heatmap"][3])
    from convlens.engine import executor
    # compiled once, not per epoch
    assert all(executor.signatures(c) == 1 for c in cb[0].recorder.comps.values())
    cm = convlens_model(m, "rescale")
    for k, e in enumerate((1, 2, 3, 4)):
        params = load_weights(cm, tmp_path / f"e{e}.weights.h5")
        for method in ("hirescam", "gradient"):
            ref = convlens.explain(cm, params, probe, method)
            np.testing.assert_allclose(root[f"{method}/heatmap"][k], ref["heatmap"], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{method} epoch {e}")
    # The positive class (a single sigmoid explains its logit). Grad-CAM, which averages the
    # gradients over space, is negative everywhere on this Flatten head; HiRes-CAM is exact.
    assert root["hirescam/heatmap"][3].max() > 0
    for method in ("hirescam", "gradient"):  # the maps did evolve
        assert not np.allclose(root[f"{method}/heatmap"][0], root[f"{method}/heatmap"][3])


def test_recorder_for_flax_loops(tmp_path):
    from convlens.training import ExplainRecorder
    x, y, _, names = demo.shapes(64, seed=4)
    model = demo.demo_model(names)
    rec = ExplainRecorder(model, x[:4], {"hirescam": {}}, tmp_path / "flax.zarr", target="label", labels=y[:4])
    p0, p1 = model.init(0), model.init(1)
    rec.record(0, p0, {"loss": 0.7})
    rec.record(5, p1, {"loss": 0.2, "acc": 0.9})
    rec.close()
    root = store.open_store(tmp_path / "flax.zarr")
    assert list(root["epoch"][:]) == [0, 5]
    np.testing.assert_allclose(root["hirescam/heatmap"][1], convlens.explain(model, p1, x[:4], "hirescam",
                                                                            target=y[:4])["heatmap"], rtol=1e-5)
    assert np.isnan(root["metrics/acc"][0]) and root["metrics/acc"][1] == pytest.approx(0.9)
    from PIL import Image
    from convlens.render.render import render_store
    from convlens.render.report import report
    files = render_store(tmp_path / "flax.zarr", tmp_path / "pics")["training"]
    names_ = {p.relative_to(tmp_path / "pics").as_posix() for p in files}
    assert {"training/hirescam.gif", "training/metrics.png", "training/hirescam/item3.png"} <= names_
    gif = Image.open(tmp_path / "pics" / "training" / "hirescam.gif")
    assert gif.n_frames == 2  # one frame per recorded epoch
    strip = np.asarray(Image.open(tmp_path / "pics" / "training" / "hirescam" / "item0.png"))
    assert strip.shape[1] > 3 * strip.shape[0] / 2  # input + 2 epochs side by side
    from convlens.engine.info import info_text
    assert "hirescam recorded after epochs [0, 5]" in info_text(tmp_path / "flax.zarr")
    page = report(tmp_path / "flax.zarr", tmp_path / "r.html")[0].read_text()
    assert "<h2>Training</h2>" in page and "hirescam.gif" in page and "Galleries" not in page
    with pytest.raises(ConvlensError, match="unknown method"):
        ExplainRecorder(model, x[:4], ["nosuch"], tmp_path / "x.zarr")
