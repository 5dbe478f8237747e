"""Overhead of `convlens.keras.ExplainCallback` per epoch, as a share of the epoch it follows.

    python benchmarks/callback_overhead.py [--images 512] [--probe 16] [--epochs 4]

Keras 3 on the JAX backend trains the *Deep Learning with Python* convnet (150x150,
sigmoid) on the shapes data set upsampled to 150x150; the same run is repeated with the
callback recording HiRes-CAM and vanilla gradients of ``--probe`` fixed images after
every epoch. Figures: the mean epoch time without the callback (the baseline, epochs 2..N
so Keras's own compilation is excluded), the callback's seconds per call (the first call,
which compiles, reported apart), and their ratio; and the number of compilations of each
method (it must stay 1 however many epochs run).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import machine  # noqa: E402
from PIL import Image  # noqa: E402

from convlens import demo  # noqa: E402
from convlens.keras import ExplainCallback  # noqa: E402


def dlwp_convnet():
    L = keras.layers
    return keras.Sequential([
        keras.Input((150, 150, 3)),
        L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(2), L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(2),
        L.Conv2D(128, 3, activation="relu"), L.MaxPooling2D(2), L.Conv2D(128, 3, activation="relu"),
        L.MaxPooling2D(2), L.Flatten(), L.Dropout(0.5), L.Dense(512, activation="relu"),
        L.Dense(1, activation="sigmoid")])


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds, self.t = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.t)


def run(x, y, epochs, callbacks):
    keras.utils.set_random_seed(0)
    m = dlwp_convnet()
    m.compile(optimizer=keras.optimizers.Adam(3e-4), loss="binary_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    t0 = time.perf_counter()
    h = m.fit(x / np.float32(255), y.astype(np.float32), epochs=epochs, batch_size=32, verbose=0,
              callbacks=[timer, *callbacks])
    return time.perf_counter() - t0, timer.seconds, h.history


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--probe", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args()
    small, y, _, _ = demo.shapes(a.images, seed=0)
    x = np.stack([np.asarray(Image.fromarray(i).resize((150, 150), Image.BILINEAR)) for i in small]).astype(np.float32)
    base_total, base_epochs, base_hist = run(x, y, a.epochs, [])
    with tempfile.TemporaryDirectory() as d:
        cb = ExplainCallback(x[:a.probe], ["hirescam", "gradient"], out=f"{d}/train.zarr", labels=y[:a.probe],
                             preprocess="rescale")
        cb_total, cb_epochs, cb_hist = run(x, y, a.epochs, [cb])
        compiles = {m: fn._cache_size() for m, fn in cb.recorder.fns.items()}
    steady = float(np.mean(cb.seconds[1:]))
    epoch = float(np.mean(base_epochs[1:]))
    res = {"machine": machine(), "keras": keras.__version__, "backend": keras.backend.backend(),
           "model": "DLwP convnet 150x150", "train_images": a.images, "batch": 32, "epochs": a.epochs,
           "probe_images": a.probe, "methods": ["hirescam", "gradient"],
           "epoch_s": epoch, "epoch_s_all": base_epochs, "callback_s_first": cb.seconds[0],
           "callback_s_steady": steady, "callback_s_all": cb.seconds,
           "overhead_per_epoch": steady / epoch, "fit_s_without": base_total, "fit_s_with": cb_total,
           "fit_ratio": cb_total / base_total, "compilations": compiles,
           "losses_identical": base_hist["loss"] == cb_hist["loss"]}
    print(json.dumps(res, indent=1))
    out = HERE / "results" / "callback_overhead.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"epoch {epoch:.2f} s; callback {steady:.3f} s per call ({steady / epoch:.1%} of an epoch; first call "
          f"{cb.seconds[0]:.2f} s with compilation); compilations {compiles}")


if __name__ == "__main__":
    main()
