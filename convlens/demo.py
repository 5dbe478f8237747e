"""The built-in demo: a classifier with a planted shortcut, caught by convlens.

``shapes`` is a synthetic data set of 64x64 photos-in-miniature: a textured background
and one object (a disc, square or triangle of random colour and size, near the centre).
In the *shortcut* version the label does not depend on the object at all: class
``stamped`` images carry a small white stamp in the top-right corner, class ``clean``
ones do not — the way a watermark or a scanner tag can give a class away in a real data
set. In the *control* version the label is the object's colour (reddish or bluish; any
shape) and there is no stamp.
Object masks come with every image.

`run_demo` trains a small convnet on the shortcut data on the spot (seconds on a CPU),
explains a held-out set with Grad-CAM, CAM and occlusion through the engine, audits the
store, renders the pictures and writes the HTML report.
"""

from __future__ import annotations

import numpy as np

from convlens.models.keras_graph import graph_from_config
from convlens.models.network import Model
from convlens.models.preprocess import Preprocess

DEMO_MARKER = ".convlens-demo"
# The quality metrics the demo ranks its methods with (a quick set: a minute on a CPU).
DEMO_QUALITY = ("road_gain,faithfulness_estimate,pointing_game,relevance_rank_accuracy,auc,sparseness,"
                "random_logit,mprt")
SIZE = 64
STAMP = (slice(5, 12), slice(50, 57))  # rows, columns of the stamp: the top-right corner
SHORTCUT_CLASSES = ("clean", "stamped")
CONTROL_CLASSES = ("red", "blue")


def _background(rng, size):
    base = rng.uniform(40, 200, 3)
    grad = np.linspace(-30, 30, size)
    img = base + grad[:, None, None] * rng.uniform(-1, 1, 3) + grad[None, :, None] * rng.uniform(-1, 1, 3)
    img = img + rng.normal(0, 12, (size, size, 3))
    return img


def _shape_mask(kind, cy, cx, r, size):
    yy, xx = np.mgrid[:size, :size]
    if kind == 0:  # disc
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 1:  # square
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    # triangle, apex up
    return (yy <= cy + r * 0.8) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)


def shapes(n: int, seed: int = 0, shortcut: bool = True, size: int = SIZE):
    """``(images [N, S, S, 3] uint8, labels [N], masks [N, S, S] bool, class_names)``."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    labels = np.empty(n, np.int32)
    for i in range(n):
        img = _background(rng, size)
        label = int(rng.integers(0, 2))
        kind = int(rng.integers(0, 3))
        r = rng.uniform(8, 14)
        cy, cx = rng.uniform(22, 42, 2)
        m = _shape_mask(kind, cy, cx, r, size)
        if shortcut:
            colour = rng.uniform(0, 255, 3)
        else:  # the object's colour is the label: red-dominant or blue-dominant
            hi, lo = rng.uniform(170, 255), rng.uniform(0, 90, 2)
            colour = np.array([hi, lo[0], lo[1]]) if label == 0 else np.array([lo[0], lo[1], hi])
        img[m] = colour * 0.8 + img[m] * 0.2
        if shortcut and label == 1:
            img[STAMP] = 250.0
            img[STAMP[0], STAMP[1].start] = img[STAMP[0].start, STAMP[1]] = 20.0  # a dark edge, like a stamp
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        masks[i], labels[i] = m, label
    return images, labels, masks, SHORTCUT_CLASSES if shortcut else CONTROL_CLASSES


def model_config(classes: int = 2, name: str = "shapes_cnn") -> dict:
    """A small convnet ending in global average pooling + dense, so CAM applies too."""
    def conv(name, filters):
        return {"class_name": "Conv2D", "config": {"name": name, "filters": filters, "kernel_size": [3, 3],
                                                   "padding": "same", "activation": "relu"}}

    def pool(name):
        return {"class_name": "MaxPooling2D", "config": {"name": name, "pool_size": [2, 2], "strides": [2, 2]}}
    layers = [{"class_name": "InputLayer", "config": {"batch_shape": [None, SIZE, SIZE, 3], "name": "input_layer"}},
              conv("conv1", 16), pool("pool1"), conv("conv2", 32), pool("pool2"), conv("conv3", 64),
              conv("conv4", 64),
              {"class_name": "GlobalAveragePooling2D", "config": {"name": "gap"}},
              {"class_name": "Dense", "config": {"name": "predictions", "units": classes, "activation": "softmax"}}]
    return {"class_name": "Sequential", "config": {"name": name, "layers": layers}}


def demo_model(class_names=SHORTCUT_CLASSES) -> Model:
    return Model(graph_from_config(model_config(len(class_names))), preprocess=Preprocess("tf"),
                 class_names=class_names)


def train(model: Model, images, labels, *, epochs: int = 6, batch: int = 64, lr: float = 3e-3, seed: int = 0,
          log=None):
    """Trains ``model`` with Adam on softmax cross-entropy; returns params (deterministic).

    An epoch is a `Loop` of the executor (one compiled step, dispatched ``n / batch``
    times; params and Adam's state stay on the device until the epoch ends)."""
    import jax
    import jax.numpy as jnp
    import optax

    from convlens.engine.executor import Batch, Executor, Loop

    opt = optax.adam(lr)
    n = len(images) // batch * batch
    steps = n // batch

    def start(ps, inputs, keys):
        p, s = ps
        return p, s, jnp.zeros(steps), jnp.zeros(steps)

    def step(ps, inputs, keys, state, i):
        p, s, losses, accs = state
        sel = jax.lax.dynamic_slice(inputs["order"], (i * batch,), (batch,))
        x, y = inputs["images"][sel], inputs["labels"][sel]

        def loss_fn(q):
            logits = model.apply(q, model.preprocess(x), logits=True)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits
        (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s, losses.at[i].set(loss),
                accs.at[i].set(jnp.mean(jnp.argmax(logits, -1) == y)))

    def finish(ps, inputs, keys, state):
        p, s, losses, accs = state
        return {"params": p, "opt_state": s, "loss": losses, "accuracy": accs}

    epoch_loop = Loop(("demo-train", model.computation, lr, batch, steps), ("images", "labels", "order"), start, step,
                      finish, steps, "train", whole=True)
    params = model.init(seed)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    data = {"images": np.asarray(images, np.float32), "labels": np.asarray(labels, np.int32)}
    with Executor(None, batch=len(images), tune=False) as ex:
        for epoch in range(epochs):
            order = np.zeros(len(images), np.int32)
            order[:n] = rng.permutation(len(images))[:n]
            out = ex.run({"t": epoch_loop}, Batch({**data, "order": order}, np.arange(len(images))),
                         params=(params, state))["t"]
            params, state = out["params"], out["opt_state"]
            if log:
                log(f"epoch {epoch + 1}/{epochs}: loss {float(np.mean(out['loss'])):.3f}, "
                    f"accuracy {float(np.mean(out['accuracy'])):.3f}")
    return params


def accuracy(model: Model, params, images, labels) -> float:
    from convlens.engine.executor import Executor, Forward
    with Executor(params, batch=min(256, len(images)), tune=False) as ex:
        logits = ex.map({"f": Forward(model)}, {"images": np.asarray(images, np.float32)})["f"]["logits"]
    return float((np.argmax(logits, -1) == labels).mean())


def write_folder(root, images, labels, masks, class_names):
    """Images as ``root/images/<class>/<i>.png`` and masks as ``root/masks/<class>/<i>.png``."""
    from pathlib import Path

    from PIL import Image
    root = Path(root)
    for i, (img, lab, m) in enumerate(zip(images, labels, masks)):
        cls = class_names[lab]
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / cls / f"{i:04d}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / cls / f"{i:04d}.png")
    return root / "images", root / "masks"


def run_demo(out="convlens-demo", *, train_size: int = 2000, test_size: int = 160, epochs: int = 5,
             log=print) -> dict:
    """The end-to-end demo (see the module docstring); returns where things are and what
    the audit found."""
    import shutil
    import time
    from pathlib import Path

    from convlens.engine import audit, runner
    from convlens.engine.sources import folder_source
    from convlens.models.keras_io import save_h5_model
    from convlens.models.registry import load_model
    from convlens.render.report import report
    from convlens.render.tables import table

    from convlens.engine.ownership import claim_folder
    out = Path(out)
    claim_folder(out, DEMO_MARKER, "demo --out")  # new, empty, or an earlier demo's: nothing else
    for child in out.iterdir():  # an earlier demo's files: the demo makes them again
        if child.name != DEMO_MARKER:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    t0 = time.perf_counter()
    log(f"1/5 data: {train_size} training and {test_size} held-out 64x64 images; the label is given by a small "
        "stamp in the top-right corner, not by the object")
    x, y, _, names = shapes(train_size, seed=0)
    xt, yt, mt, _ = shapes(test_size, seed=1)
    images, masks = write_folder(out / "data", xt, yt, mt, names)
    log("2/5 training a small convnet on the spot (Flax + optax)")
    model = demo_model(names)
    params = train(model, x, y, epochs=epochs, log=lambda s: log("    " + s))
    weights = save_h5_model(model, params, out / "shapes_cnn.h5", model_config(len(names)))
    model, params = load_model(str(weights), preprocess="tf", class_names=names)  # as a user would
    log(f"    held-out accuracy {accuracy(model, params, xt, yt):.3f}; model saved to {weights}")
    store = out / "shapes.zarr"
    log("3/5 explaining the held-out images with Grad-CAM, CAM and occlusion (the engine, from an image folder)")
    from convlens.kernels.common import default_method
    log(f"    Grad-CAM is convlens's default for this model ({default_method(model)}): its head averages the last "
        "feature maps (GlobalAveragePooling), where Grad-CAM equals CAM; on a Flatten head, where Grad-CAM's "
        "averaged gradients cancel, the default is HiRes-CAM")
    src = folder_source(images, masks)  # as `convlens run --data images --masks masks`
    s = runner.run(model, params, src, {"gradcam": {}, "cam": {}, "occlusion": {"window": 12, "stride": 4}},
                   store, target="label", batch_size=16, progress=False, command="convlens demo")
    log(f"    {s.done} images in {s.seconds:.1f} s -> {store}")
    log("4/5 auditing: shortcut flags, faithfulness metrics, sanity check, and which method to trust (quality "
        "metrics against a random and an edge-map control)")
    findings = audit.audit(store, audit.AuditConfig(quality=DEMO_QUALITY, quality_items=32, progress=False))
    log("5/5 rendering pictures and the HTML report")
    pages = report(store, out / "report.html")
    flags = [(m, f) for m, e in findings.items() for f in e["flags"]]
    from convlens.engine.store import open_store
    from convlens.render.tables import quality_table
    quality = open_store(store).attrs["audit"]["quality"]
    seconds = time.perf_counter() - t0
    text = table(findings) + "\n\n" + quality_table(quality)
    shortcut = [(m, f) for m, f in flags if f["kind"] == "class_location"]
    if shortcut:
        m, f = shortcut[0]
        found = (f"FOUND: the model's decisions for class {f['class_name']!r} rest on the {f['where']} — the planted "
                 f"stamp ({m}: {f['share_of_items']:.0%} of the class's items peak there).")
    else:
        found = "The audit did not flag the planted shortcut (unexpected: see the report)."
    summary = f"\n{text}\n\n{found}\nReport: {Path(pages[0]).resolve()}  (open it in a browser; done in {seconds:.0f} s)"
    return {"report": pages[0], "store": store, "findings": findings, "flags": flags, "quality": quality,
            "seconds": seconds, "text": text, "summary": summary}
