"""Test-side Keras helpers: random but non-trivial weights, every save format,
and Keras's own per-layer outputs as the reference."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

FORMATS = ("keras", "weights_h5", "legacy_h5", "published", "published_nested")


def randomize(kmodel, seed: int = 0, gamma=(0.5, 1.5), variance=(0.5, 1.5)) -> None:
    """Kernels keep Keras's random init; biases and BatchNorm statistics get random values
    too (Keras initialises them to constants, which would hide mistakes). ``gamma`` and
    ``variance``: the uniform ranges of scales and variances (deep networks want them
    contracting, or random activations grow without bound)."""
    rng = np.random.default_rng(seed)
    for layer in kmodel.layers:
        if hasattr(layer, "layers"):
            randomize(layer, seed + 1, gamma, variance)
            continue
        new = []
        for w in layer.weights:
            v = np.asarray(w.numpy())
            tail = w.path.split("/")[-1]
            if tail in ("bias", "beta", "moving_mean", "mean"):
                v = rng.normal(0, 0.1, v.shape)
            elif tail == "gamma":
                v = rng.uniform(*gamma, v.shape)
            elif tail in ("moving_variance", "variance"):
                v = rng.uniform(*variance, v.shape)
            new.append(v.astype(np.float32))
        if new:
            layer.set_weights(new)
            if hasattr(layer, "finalize_state"):
                layer.finalize_state()  # Normalization caches its statistics


def keras_outputs(kmodel, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every top-level layer's output (InputLayer excluded) for input ``x``."""
    import keras

    layers = [l for l in kmodel.layers if type(l).__name__ != "InputLayer"]
    # A nested model's `.output` is its own inner tensor; its call in this model is its last node.
    outs = [l._inbound_nodes[-1].output_tensors[0] if hasattr(l, "layers") else l.output for l in layers]
    probe = keras.Model(kmodel.inputs, outs)
    outs = probe.predict(x, verbose=0, batch_size=len(x))
    return {l.name: np.asarray(o) for l, o in zip(layers, outs)}


def _flat_layers(kmodel):
    for layer in kmodel.layers:
        if hasattr(layer, "layers"):
            yield from _flat_layers(layer)
        else:
            yield layer


def write_published(kmodel, path: Path, nested: bool = False, split: int | None = None) -> None:
    """Legacy weights-only .h5 in the layout of Keras's published ImageNet files:
    root ``layer_names``; per layer ``weight_names`` and the datasets, either flat
    (``block1_conv1_W_1:0``, as the original VGG files) or nested (``block1_conv1/kernel:0``).
    ``split`` writes ``layer_names`` as ``layer_names0``, ``layer_names1``... chunks."""
    letters = {"kernel": "W", "bias": "b", "gamma": "gamma", "beta": "beta", "moving_mean": "running_mean",
               "moving_variance": "running_std", "depthwise_kernel": "depthwise_W", "pointwise_kernel": "pointwise_W"}
    layers = list(_flat_layers(kmodel))
    with h5py.File(path, "w") as f:
        names = np.array([l.name.encode() for l in layers])
        if split:
            for i in range(0, len(names), split):
                f.attrs[f"layer_names{i // split}"] = names[i:i + split]
        else:
            f.attrs["layer_names"] = names
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in layers:
            g = f.create_group(layer.name)
            wnames = []
            for w in layer.weights:
                tail = w.path.split("/")[-1]
                wn = f"{layer.name}/{tail}:0" if nested else f"{layer.name}_{letters.get(tail, tail)}_1:0"
                g.create_dataset(wn, data=np.asarray(w.numpy()))
                wnames.append(wn.encode())
            g.attrs["weight_names"] = np.array(wnames, dtype="S") if wnames else np.array([], dtype="S")


def save_all(kmodel, folder: Path, stem: str) -> dict[str, Path]:
    """Saves ``kmodel`` in every format convlens reads; returns format -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "keras": folder / f"{stem}.keras",
        "weights_h5": folder / f"{stem}.weights.h5",
        "legacy_h5": folder / f"{stem}.h5",
        "published": folder / f"{stem}_published.h5",
        "published_nested": folder / f"{stem}_published_nested.h5",
    }
    kmodel.save(paths["keras"])
    kmodel.save_weights(paths["weights_h5"])
    kmodel.save(paths["legacy_h5"])
    write_published(kmodel, paths["published"], split=7)
    write_published(kmodel, paths["published_nested"], nested=True)
    return paths


def assert_close(ours, ref, name):
    """The parity bound of the Keras tests: ``max|diff| <= 1e-4 * max(1, max|keras|)``."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != keras {ref.shape}"
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"{name}: max|diff| {err:.3g} > {tol:.3g}"
