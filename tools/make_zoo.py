"""Writes ``convlens/models/zoo/``: the keras.applications convnets as data (``index.json``
and one ``<name>.json.gz`` of model configs per architecture).

For every convnet of the installed Keras's ``keras.applications`` it records:

* the model config Keras writes for it (with and without the classifier), which convlens
  builds through its one Keras importer, so a built-in and the same model read from a
  Keras file are the same graph by construction;
* where Keras gets its ImageNet weights: the file name, address and published hash that
  ``keras.applications.X(weights="imagenet")`` asks ``keras.utils.get_file`` for
  (captured by calling Keras with that function replaced, nothing downloaded);
* the preprocessing its weights expect (Keras's ``preprocess_input`` mode per module).

Run it with Keras installed (a development step, not a runtime one)::

    KERAS_BACKEND=jax python tools/make_zoo.py
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

OUT = Path(__file__).resolve().parent.parent / "convlens" / "models" / "zoo"

# convlens name -> (keras.applications function, preprocessing mode of its weights)
ZOO = {
    "resnet50": ("ResNet50", "caffe"), "resnet101": ("ResNet101", "caffe"), "resnet152": ("ResNet152", "caffe"),
    "resnet50_v2": ("ResNet50V2", "tf"), "resnet101_v2": ("ResNet101V2", "tf"),
    "resnet152_v2": ("ResNet152V2", "tf"),
    "inception_v3": ("InceptionV3", "tf"), "inception_resnet_v2": ("InceptionResNetV2", "tf"),
    "xception": ("Xception", "tf"),
    "mobilenet": ("MobileNet", "tf"), "mobilenet_v2": ("MobileNetV2", "tf"),
    "mobilenet_v3_small": ("MobileNetV3Small", "none"), "mobilenet_v3_large": ("MobileNetV3Large", "none"),
    "densenet121": ("DenseNet121", "torch"), "densenet169": ("DenseNet169", "torch"),
    "densenet201": ("DenseNet201", "torch"),
    "nasnet_mobile": ("NASNetMobile", "tf"), "nasnet_large": ("NASNetLarge", "tf"),
    **{f"efficientnet_b{i}": (f"EfficientNetB{i}", "none") for i in range(8)},
    **{f"efficientnet_v2_b{i}": (f"EfficientNetV2B{i}", "none") for i in range(4)},
    **{f"efficientnet_v2_{s.lower()}": (f"EfficientNetV2{s}", "none") for s in "SML"},
    **{f"convnext_{s.lower()}": (f"ConvNeXt{s}", "none") for s in ("Tiny", "Small", "Base", "Large", "XLarge")},
    "vgg16": ("VGG16", "caffe"), "vgg19": ("VGG19", "caffe"),
}


class Captured(Exception):
    pass


def weights_source(fn, include_top: bool) -> dict:
    """What Keras asks ``get_file`` for when it loads ``fn``'s ImageNet weights."""
    from keras.src.utils import file_utils
    seen = {}

    def fake_get_file(fname=None, origin=None, cache_subdir="datasets", file_hash=None, **kw):
        seen.update(fname=fname, url=origin, hash=file_hash, subdir=cache_subdir)
        raise Captured

    real = file_utils.get_file
    file_utils.get_file = fake_get_file  # the applications call file_utils.get_file at run time
    try:
        fn(weights="imagenet", include_top=include_top)
    except Captured:
        pass
    finally:
        file_utils.get_file = real
    if seen.get("fname") is None and seen.get("url"):
        seen["fname"] = seen["url"].rsplit("/", 1)[-1]
    return {k: seen.get(k) for k in ("fname", "url", "hash", "subdir")}


def size_dependent_pads(fn, top, size: int) -> list[str]:
    """ZeroPadding2D layers of ``top`` whose padding Keras computes from the size of their
    input (``imagenet_utils.correct_pad``): the i-th padding layer of the model built at
    an even and at an odd input size differs (compared by position: automatic names count
    on across builds)."""
    def pads(m):
        return [l for l in m.layers if type(l).__name__ == "ZeroPadding2D"]
    # Sizes whose downsampled maps take both parities at every depth (odd and even at /2,
    # /4, /8, /16, /32): a padding that depends on its input's size shows at one of them.
    builds = [[l.padding for l in pads(fn(weights=None, include_top=True, input_shape=(n, n, 3)))]
              for n in (96, 97, 98, 100, 104, 112, 128)]
    names = [l.name for l in pads(top)]
    return sorted(names[i] for i in range(len(names)) if len({str(b[i]) for b in builds}) > 1)


def main():
    import keras
    entries = {}
    for name, (cls, mode) in ZOO.items():
        fn = getattr(keras.applications, cls)
        top = fn(weights=None, include_top=True, classifier_activation="softmax")
        notop = fn(weights=None, include_top=False)
        entries[name] = {
            "keras_name": cls, "preprocess": mode,
            # MobileNetV3 accepts any size; its weights were trained at 224.
            "default_size": [s or 224 for s in top.input_shape[1:3]],
            "top_config": json.loads(top.to_json()), "notop_config": json.loads(notop.to_json()),
            "weights": {"top": weights_source(fn, True), "notop": weights_source(fn, False)},
            "size_dependent_pads": size_dependent_pads(fn, top, (top.input_shape[1] or 224)),
            "keras_version": keras.__version__,
        }
        print(f"{name:22s} {cls:20s} {top.input_shape[1:3]} {entries[name]['weights']['top']['fname']}", flush=True)
        del top, notop
        keras.backend.clear_session()
    OUT.mkdir(parents=True, exist_ok=True)
    index = {}
    total = 0
    for name, e in entries.items():
        configs = {"top_config": e.pop("top_config"), "notop_config": e.pop("notop_config")}
        data = json.dumps(configs, separators=(",", ":")).encode()
        # mtime=0: the same configs give the same bytes, so regenerating changes nothing in git
        (OUT / f"{name}.json.gz").write_bytes(gzip.compress(data, 9, mtime=0))
        total += (OUT / f"{name}.json.gz").stat().st_size
        index[name] = e
    (OUT / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}: {len(index)} architectures, {total / 1e6:.1f} MB of compressed configs")


if __name__ == "__main__":
    main()
