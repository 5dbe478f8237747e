"""Built-in models, and the one entry point that turns a user's MODEL argument
(a built-in name or a Keras file) into a `Model` and its params."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from convlens.config import Config, option
from convlens.errors import ConvlensError, OptionError
from convlens.models import smallnets, vgg
from convlens.models.labels import imagenet_class_names
from convlens.models.network import Graph, Model, Params, Provenance
from convlens.models.preprocess import MODES, Preprocess


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A built-in architecture.

    Attributes:
      name: the CLI name.
      build: ``build(include_top=..., input_shape=...) -> Graph``.
      preprocess: the preprocessing its weights expect.
      class_names: ``() -> labels`` for the full classifier, or ``None``.
      default_size: ``(H, W)`` the weights were trained at.
      description: one line for ``convlens models``.
      headless: whether ``include_top=False`` is meaningful.
    """

    name: str
    build: Callable[..., Graph]
    preprocess: Preprocess
    class_names: Callable[[], tuple[str, ...]] | None
    default_size: tuple[int, int]
    description: str
    headless: bool = True


def _binary(*names):
    return lambda: names


MODELS: dict[str, ModelSpec] = {
    "vgg16": ModelSpec("vgg16", vgg.vgg16, Preprocess("caffe"), imagenet_class_names, (224, 224),
                       "VGG16 (Keras layer names; ImageNet weights via --weights)"),
    "vgg19": ModelSpec("vgg19", vgg.vgg19, Preprocess("caffe"), imagenet_class_names, (224, 224),
                       "VGG19 (Keras layer names; ImageNet weights via --weights)"),
    "smallcnn": ModelSpec("smallcnn", lambda include_top=True, input_shape=None: smallnets.smallcnn(
                              **({} if input_shape is None else {"input_shape": input_shape})),
                          Preprocess("rescale"), _binary("cat", "dog"), (150, 150),
                          "Deep Learning with Python cats-vs-dogs convnet, 150x150, sigmoid output",
                          headless=False),
    "vgg_tiny": ModelSpec("vgg_tiny", vgg.vgg_tiny, Preprocess("caffe"), None, (32, 32),
                          "VGG16's structure at 1/16 width, 32x32, 1000 outputs (for tests)"),
}


@dataclasses.dataclass(frozen=True)
class LoadOptions(Config):
    """How MODEL is loaded (the command line's model options).

    Attributes:
      weights: Keras weights for a built-in model (.weights.h5, .h5, .keras).
      random_init: use random weights on purpose: a seed (built-in models only).
      top: with the classifier (include_top); --no-top for the headless network.
      input_size: input size HxW of a built-in (any size without the top).
      preprocess: override the model's preprocessing (files default to none).
    """

    name_or_path: str = option("", cli=False)
    weights: str | None = None
    random_init: int | None = option(None, min=0)
    top: bool = True
    input_size: str | None = None
    preprocess: str | None = option(None, choices=MODES)

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
                "include_top": self.top, "input_shape": self.input_shape(), "preprocess": self.preprocess}


def build_model(name: str, *, include_top: bool = True, input_shape=None) -> Model:
    """A built-in `Model` (no params: see `load_model`)."""
    if name not in MODELS:
        raise ConvlensError(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}, "
                            "or give a path to a .keras / .h5 file")
    spec = MODELS[name]
    if not include_top and not spec.headless:
        raise ConvlensError(f"model {name!r} has no headless variant; drop --no-top")
    kw = {"include_top": include_top}
    if name == "vgg_tiny" and include_top and input_shape is None:
        input_shape = (*spec.default_size, 3)
    if input_shape is not None:
        kw["input_shape"] = tuple(input_shape)
    graph = spec.build(**kw)
    names = spec.class_names() if (spec.class_names and include_top) else None
    return Model(graph, preprocess=spec.preprocess, class_names=names, default_size=spec.default_size)


def load_model(name_or_path: str, *, weights: str | None = None, random_init: int | None = None,
               include_top: bool = True, input_shape=None, preprocess: str | None = None,
               class_names=None) -> tuple[Model, Params]:
    """Resolves a MODEL argument to ``(model, params)``.

    Args:
      name_or_path: a built-in name (`MODELS`) or a ``.keras`` / full-model ``.h5`` path.
      weights: a Keras weights file (any format) for a built-in model.
      random_init: a seed, to explain random weights on purpose (built-ins only).
      include_top: built-ins only: with or without the classifier.
      input_shape: built-ins only: ``(H, W, 3)``.
      preprocess: override the preprocessing mode (files default to ``none``).
      class_names: labels for a model read from a file.
    """
    model, params, source, sha = _load(name_or_path, weights=weights, random_init=random_init,
                                       include_top=include_top, input_shape=input_shape, preprocess=preprocess,
                                       class_names=class_names)
    # How to load it again (audits reopen the model of a store).
    args = {"name_or_path": str(name_or_path), "weights": None if weights is None else str(weights),
            "random_init": random_init, "include_top": include_top,
            "input_shape": None if input_shape is None else list(input_shape), "preprocess": preprocess}
    return model.replace(provenance=Provenance.of(source, sha, args)), params


def _load(name_or_path, *, weights, random_init, include_top, input_shape, preprocess, class_names):
    from convlens.models import keras_io

    if name_or_path in MODELS:
        model = build_model(name_or_path, include_top=include_top, input_shape=input_shape)
        if preprocess:
            model = model.replace(preprocess=Preprocess(preprocess))
        if weights is not None and random_init is not None:
            raise ConvlensError("give either --weights or --random-init, not both")
        if weights is not None:
            return model, keras_io.load_weights(model, weights), str(weights), keras_io.sha256(weights)
        if random_init is not None:
            return model, model.init(random_init), f"random-init:{random_init}", None
        raise ConvlensError(
            f"model {name_or_path!r} needs weights: pass --weights FILE (a Keras .h5/.keras file), or "
            "--random-init SEED to use random weights on purpose")
    path = Path(name_or_path)
    if not path.exists():
        raise ConvlensError(f"{name_or_path!r} is neither a built-in model ({', '.join(MODELS)}) nor an "
                            "existing file")
    if random_init is not None:
        raise ConvlensError("--random-init applies to built-in models; a model file brings its own weights")
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


