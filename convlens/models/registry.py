"""Built-in models, and the one entry point that turns a user's MODEL argument
(a built-in name or a Keras file) into a `Model` and its params."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

from convlens.config import Config, option
from convlens.errors import ConvlensError, OptionError
from convlens.models import smallnets, vgg
from convlens.models.labels import imagenet_class_names
from convlens.models.network import PRECISIONS, Graph, Model, Params, Provenance
from convlens.models.preprocess import MODES, Preprocess


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A built-in architecture.

    Attributes:
      name: the CLI name.
      build: ``build(include_top=..., input_shape=..., pooling=...) -> Graph``.
      preprocess: the preprocessing its weights expect.
      class_names: ``() -> labels`` for the full classifier, or ``None``.
      default_size: ``(H, W)`` the weights were trained at.
      description: one line for ``convlens models``.
      headless: whether ``include_top=False`` is meaningful.
      imagenet: ``include_top -> {"fname", "url", "hash"}`` of Keras's published ImageNet
        weights, or ``None``.
      fixed_size: whether the classifier fixes the input size (a Flatten before Dense).
    """

    name: str
    build: Callable[..., Graph]
    preprocess: Preprocess
    class_names: Callable[[], tuple[str, ...]] | None
    default_size: tuple[int, int]
    description: str
    headless: bool = True
    imagenet: Callable[[bool], dict | None] | None = None
    fixed_size: bool = False


def _binary(*names):
    return lambda: names


def _vgg(fn):
    def build(include_top=True, input_shape=None, pooling=None):
        return fn(include_top=include_top, input_shape=input_shape, pooling=pooling)
    return build


def _zoo_specs() -> dict[str, ModelSpec]:
    from convlens.models import zoo
    out = {}
    for name, e in zoo.entries().items():
        if name in ("vgg16", "vgg19"):
            continue  # built by convlens.models.vgg (the same config); their weights come from here
        out[name] = ModelSpec(name, functools.partial(zoo.build, name), Preprocess(e["preprocess"]),
                              imagenet_class_names, tuple(e["default_size"]),
                              f"Keras's {e['keras_name']} (keras.applications; --weights imagenet)",
                              imagenet=functools.partial(zoo.weights, name))
    return out


def _vgg_imagenet(name):
    def get(include_top):
        from convlens.models import zoo
        return zoo.weights(name, include_top)
    return get


MODELS: dict[str, ModelSpec] = {
    "vgg16": ModelSpec("vgg16", _vgg(vgg.vgg16), Preprocess("caffe"), imagenet_class_names, (224, 224),
                       "VGG16 (Keras layer names; --weights imagenet or FILE)", imagenet=_vgg_imagenet("vgg16"),
                       fixed_size=True),
    "vgg19": ModelSpec("vgg19", _vgg(vgg.vgg19), Preprocess("caffe"), imagenet_class_names, (224, 224),
                       "VGG19 (Keras layer names; --weights imagenet or FILE)", imagenet=_vgg_imagenet("vgg19"),
                       fixed_size=True),
    "smallcnn": ModelSpec("smallcnn", lambda include_top=True, input_shape=None, pooling=None: smallnets.smallcnn(
                              **({} if input_shape is None else {"input_shape": input_shape})),
                          Preprocess("rescale"), _binary("cat", "dog"), (150, 150),
                          "Deep Learning with Python cats-vs-dogs convnet, 150x150, sigmoid output",
                          headless=False, fixed_size=True),
    "vgg_tiny": ModelSpec("vgg_tiny", _vgg(vgg.vgg_tiny), Preprocess("caffe"), None, (32, 32),
                          "VGG16's structure at 1/16 width, 32x32, 1000 outputs (for tests)", fixed_size=True),
    **_zoo_specs(),
}


@dataclasses.dataclass(frozen=True)
class LoadOptions(Config):
    """How MODEL is loaded (the command line's model options).

    Attributes:
      weights: imagenet (Keras's published weights, from its cache or downloaded) for a
        built-in, or a Keras weights file (.weights.h5, .h5, .keras).
      random_init: use random weights on purpose: a seed (built-in models only).
      top: with the classifier (include_top); --no-top for the headless network.
      input_size: input size HxW of a built-in (any size without the top).
      pooling: a headless built-in followed by global avg or max pooling (Keras's pooling).
      preprocess: override the model's preprocessing (files default to none).
      precision: full (float32 arithmetic at full precision on every backend) or fast
        (bfloat16 compute: faster on accelerators, maps change slightly).
    """

    name_or_path: str = option("", cli=False)
    weights: str | None = None
    random_init: int | None = option(None, min=0)
    top: bool = True
    input_size: str | None = None
    pooling: str | None = option(None, choices=("avg", "max", "none"))
    preprocess: str | None = option(None, choices=MODES)
    precision: str = option("full", choices=PRECISIONS)

    _owner = "model options"

    def input_shape(self) -> tuple[int, int, int] | None:
        """``--input-size HxW`` as ``(H, W, 3)``."""
        if not self.input_size:
            return None
        try:
            h, w = (int(v) for v in self.input_size.lower().split("x"))
        except ValueError:
            raise OptionError(f"--input-size {self.input_size!r} is not HxW (e.g. 224x224)") from None
        if not (8 <= h <= 8192 and 8 <= w <= 8192):
            raise OptionError(f"--input-size {self.input_size!r}: each side must be 8..8192 pixels")
        return (h, w, 3)

    def model_kwargs(self) -> dict:
        return {"name_or_path": self.name_or_path, "weights": self.weights, "random_init": self.random_init,
                "include_top": self.top, "input_shape": self.input_shape(), "preprocess": self.preprocess,
                "pooling": self.pooling, "precision": self.precision}


def build_model(name: str, *, include_top: bool = True, input_shape=None, pooling: str | None = None) -> Model:
    """A built-in `Model` (no params: see `load_model`)."""
    if name not in MODELS:
        raise ConvlensError(f"unknown model {name!r}; built-in models: {', '.join(MODELS)} "
                            "(`convlens models`), or give a path to a .keras / .h5 file")
    spec = MODELS[name]
    if not include_top and not spec.headless:
        raise ConvlensError(f"model {name!r} has no headless variant; drop --no-top")
    if pooling not in (None, "none") and include_top:
        raise OptionError("--pooling applies to a headless network: add --no-top")
    if input_shape is None and include_top and name == "vgg_tiny":
        input_shape = (*spec.default_size, 3)
    if include_top and spec.fixed_size and input_shape is not None and tuple(input_shape[:2]) != spec.default_size:
        raise OptionError(f"model {name!r} with its classifier takes {spec.default_size[0]}x{spec.default_size[1]} "
                          "images (its Flatten fixes the size); add --no-top for any size")
    graph = spec.build(include_top=include_top, input_shape=None if input_shape is None else tuple(input_shape),
                       pooling=None if pooling == "none" else pooling)
    names = spec.class_names() if (spec.class_names and include_top) else None
    return Model(graph, preprocess=spec.preprocess, class_names=names, default_size=spec.default_size)


def load_model(name_or_path: str, *, weights: str | None = None, random_init: int | None = None,
               include_top: bool = True, input_shape=None, preprocess: str | None = None,
               class_names=None, pooling: str | None = None, precision: str = "full",
               progress: bool = True) -> tuple[Model, Params]:
    """Resolves a MODEL argument to ``(model, params)``.

    Args:
      name_or_path: a built-in name (`MODELS`) or a ``.keras`` / full-model ``.h5`` path.
      weights: ``"imagenet"`` (Keras's published weights for a built-in, from Keras's
        cache or downloaded: `convlens.models.hub`) or a Keras weights file (any format).
      random_init: a seed, to explain random weights on purpose (built-ins only).
      include_top: built-ins only: with or without the classifier.
      input_shape: built-ins only: ``(H, W, 3)``.
      pooling: built-ins without their classifier: ``"avg"`` / ``"max"`` global pooling.
      preprocess: override the preprocessing mode (files default to ``none``).
      class_names: labels for a model read from a file.
      precision: ``"full"`` (float32 at full precision) or ``"fast"`` (bfloat16 compute).
      progress: show a download's progress bar.
    """
    if precision not in PRECISIONS:
        raise OptionError(f"precision {precision!r}: {' or '.join(PRECISIONS)}")
    model, params, source, sha = _load(name_or_path, weights=weights, random_init=random_init,
                                       include_top=include_top, input_shape=input_shape, preprocess=preprocess,
                                       class_names=class_names, pooling=pooling, progress=progress)
    # How to load it again (audits reopen the model of a store).
    args = {"name_or_path": str(name_or_path), "weights": None if weights is None else str(weights),
            "random_init": random_init, "include_top": include_top,
            "input_shape": None if input_shape is None else list(input_shape), "preprocess": preprocess,
            "pooling": pooling, "precision": precision}
    return model.replace(provenance=Provenance.of(source, sha, args), precision=precision), params


def _imagenet_file(spec: ModelSpec, include_top: bool, progress: bool) -> str:
    from convlens.models import hub
    w = spec.imagenet(include_top) if spec.imagenet else None
    if w is None:
        raise ConvlensError(f"model {spec.name!r} has no published ImageNet weights"
                            + ("" if include_top or spec.imagenet is None else " without its classifier")
                            + ": give a weights file with --weights FILE, or --random-init SEED")
    return str(hub.fetch(w["fname"], w["url"], w.get("hash"), progress=progress,
                         note=lambda m: __import__("sys").stderr.write(m + "\n")))


def _load(name_or_path, *, weights, random_init, include_top, input_shape, preprocess, class_names, pooling,
          progress):
    from convlens.models import keras_io

    if name_or_path in MODELS:
        model = build_model(name_or_path, include_top=include_top, input_shape=input_shape, pooling=pooling)
        if preprocess:
            model = model.replace(preprocess=Preprocess(preprocess))
        if weights is not None and random_init is not None:
            raise ConvlensError("give either --weights or --random-init, not both")
        if weights == "imagenet":
            weights = _imagenet_file(MODELS[name_or_path], include_top, progress)
        if weights is not None:
            return model, keras_io.load_weights(model, weights), str(weights), keras_io.sha256(weights)
        if random_init is not None:
            return model, model.init(random_init), f"random-init:{random_init}", None
        hint = "--weights imagenet (Keras's published weights), " if MODELS[name_or_path].imagenet else ""
        raise ConvlensError(
            f"model {name_or_path!r} needs weights: pass {hint}--weights FILE (a Keras .h5/.keras file), or "
            "--random-init SEED to use random weights on purpose")
    path = Path(name_or_path)
    if not path.exists():
        raise ConvlensError(f"{name_or_path!r} is neither a built-in model (see `convlens models`) nor an "
                            "existing file")
    if random_init is not None:
        raise ConvlensError("--random-init applies to built-in models; a model file brings its own weights")
    if weights == "imagenet":
        raise ConvlensError("--weights imagenet applies to built-in models; a model file brings its own weights")
    model, params = keras_io.load_model_file(
        path, preprocess=Preprocess(preprocess or "none"),
        class_names=class_names)
    source, sha = model.source, model.weights_sha256
    if weights is not None:
        params = keras_io.load_weights(model, weights)
        source, sha = str(weights), keras_io.sha256(weights)
    if model.class_names is None and (model.graph.by_name[model.graph.output].config.get("units") == 1000):
        model = model.replace(class_names=imagenet_class_names())
    return model, params, source, sha
