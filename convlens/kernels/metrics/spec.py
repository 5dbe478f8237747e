"""What a quality metric declares about itself: `MetricSpec`.

A family module (``faithful``, ``robust``, ``localise``, ``complexity``, ``randomise``,
``axioms``) declares its metrics in a module-level tuple ``METRICS`` and imports only this
module and ``base`` (never the registry), as the method modules do; the registry
(`convlens.kernels.metrics.registry`) assembles them without side effects.

A metric is one pure function and one declaration::

    def sparseness(a, *, abs=True, normalise=True): ...          # -> {"score": [B], ...}

    @dataclasses.dataclass(frozen=True)
    class SparsenessConfig(Config):
        abs: bool = True
        normalise: bool = True

    METRICS = (MetricSpec("sparseness", "complexity", HIGHER, ("a",), SparsenessConfig, sparseness),)

* ``needs``: the function's positional arguments, in order, from the vocabulary `NEEDS`
  (the batch's images ``x``, maps ``a``, targets ``y``, the model's ``score`` ...); the
  engine and the public API build exactly those, nothing else.
* ``config``: a frozen `convlens.config.Config` whose fields are the function's keyword
  options, each with its declared bounds (``steps=-3`` is a one-line error naming the
  metric); with ``score`` among the needs it has a ``softmax`` field too (probabilities,
  or logits when false), which picks the scorer and is not passed on.
* ``fixed``: keyword arguments bound for this metric (``road_morf`` is ``road`` with
  ``order="morf"``).
* The function takes ``keys [B]`` (one PRNG key per item) if it draws anything: an item's
  draws come from its own key, so its score never depends on its batch-mates. Its other
  keyword parameters (``noises``, ``subsets``, ``fills``, ``y_off``) replace the draws for
  parity with another implementation (`MetricSpec.replay`).

It returns ``score [B]`` (one number per item, NaN where undefined) and possibly
``curve [B, S]`` and other per-item arrays.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

HIGHER, LOWER = "higher", "lower"
FAMILIES = ("faithfulness", "robustness", "localisation", "complexity", "randomisation", "axiomatic")

# What a metric may take, by name: the engine and the public API build each from the
# model, the method, the batch and the config.
NEEDS: dict[str, str] = {
    "score": "the model's scores of images: images [N, H, W, C] -> [N, K] (probabilities, or logits with "
             "softmax=false)",
    "x": "the images [B, H, W, C] (pixels, before the model's preprocessing)",
    "a": "the maps [B, H, W]",
    "y": "the targets the maps explain [B]",
    "masks": "object masks [B, H, W] (bool)",
    "segments": "superpixels [B, H, W] (ints 0..n_segments-1)",
    "n_segments": "a bound on the superpixel count (static)",
    "predicted": "the model's predicted class [B]",
    "num_classes": "the number of classes (static)",
    "explain": "the method re-run: (images, targets) -> maps",
    "explain_with": "the method re-run with other weights: (params, images, targets) -> maps",
    "explain_shifted": "the method on the model whose input is shifted and compensated: (shift, images, targets) "
                       "-> maps",
    "params": "the model's weights",
    "fresh": "a random initialisation of the same weights (seed 1234)",
    "layers": "the layers with weights, output first",
}
# What the user has to provide for a need (the rest is computed): model and params,
# object masks, or a method to re-run.
REQUIRES = {"score": "model", "predicted": "model", "masks": "masks", "explain": "method",
            "explain_with": "method", "explain_shifted": "method", "params": "model", "fresh": "model",
            "layers": "model", "num_classes": "model"}
STATIC = ("n_segments", "num_classes")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """A metric's declaration (see the module docstring).

    Attributes:
      name: its name (``--quality`` and `convlens.evaluate`).
      family: one of `FAMILIES`.
      direction: ``higher`` or ``lower``: which way ``score`` is better.
      needs: the function's positional arguments, from `NEEDS`.
      config: its frozen config dataclass (the function's keyword options).
      fn: the pure function.
      fixed: keyword arguments bound for this metric.
      per_item: False where an item's score depends on the other items (sufficiency:
        the set is the reference); such a metric runs once over all rated items.
      doc: a title (default: the function's docstring's, up to its first colon).
      departure: where it departs from Quantus 0.6 (which follows the paper, and why), or "".
    """

    name: str
    family: str
    direction: str
    needs: tuple[str, ...]
    config: type
    fn: Callable[..., dict[str, Any]]
    fixed: dict = dataclasses.field(default_factory=dict)
    per_item: bool = True
    doc: str = ""
    departure: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} is not one of {FAMILIES}")
        if self.direction not in (HIGHER, LOWER):
            raise ValueError(f"{self.name}: direction must be {HIGHER!r} or {LOWER!r}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{self.name}: needs {sorted(unknown)} are not in the vocabulary {sorted(NEEDS)}")
        params = inspect.signature(self.fn).parameters
        keyword = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        positional = [n for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if len(positional) != len(self.needs):
            raise ValueError(f"{self.name}: {self.fn.__name__} takes {positional}, the declaration needs "
                             f"{list(self.needs)}")
        fields = set(self.option_names) | set(self.fixed)
        if not fields <= keyword:
            raise ValueError(f"{self.name}: options {sorted(fields - keyword)} are not keyword parameters of "
                             f"{self.fn.__name__}")
        if "score" in self.needs and "softmax" not in {f.name for f in dataclasses.fields(self.config)}:
            raise ValueError(f"{self.name}: a metric that scores images declares softmax in its config")
        if not self.doc:  # the docstring's title: "Pixel flipping (Bach et al. 2015)"
            text = " ".join((self.fn.__doc__ or "").split())
            head = text.split(": ")[0] if ": " in text[:160] else text.split(". ")[0]
            object.__setattr__(self, "doc", head.strip().rstrip("."))

    @property
    def option_names(self) -> tuple[str, ...]:
        """The config's fields passed to the function (all but ``softmax``)."""
        return tuple(f.name for f in dataclasses.fields(self.config) if f.name != "softmax")

    @property
    def stochastic(self) -> bool:
        """Whether the function draws (takes per-item ``keys``)."""
        return "keys" in inspect.signature(self.fn).parameters

    @property
    def replay(self) -> tuple[str, ...]:
        """Keyword arrays that replace the function's draws (parity with another
        implementation): its keyword parameters that are neither options nor keys."""
        params = inspect.signature(self.fn).parameters
        return tuple(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                     and n not in self.option_names and n not in self.fixed and n not in ("keys",))

    @property
    def higher_is_better(self) -> bool:
        return self.direction == HIGHER

    @property
    def requires(self) -> tuple[str, ...]:
        """What a caller must provide besides maps (``model``, ``masks``, ``method``)."""
        return tuple(dict.fromkeys(REQUIRES[n] for n in self.needs if n in REQUIRES))

    def resolve(self, options: dict | None = None):
        """The metric's config from keyword options (command-line strings coerced, every
        value checked against its declaration)."""
        from convlens.config import build
        if isinstance(options, self.config):
            return options
        return build(self.config, dict(options or {}), owner=self.name)

    def run(self, inputs: dict[str, Any], cfg, keys=None, replay: dict | None = None) -> dict[str, Any]:
        """The metric on one batch: ``inputs`` holds (at least) its needs, with ``probs``
        and ``logits`` for ``score``; ``keys [B]`` per item."""
        args = []
        for n in self.needs:
            if n == "score":
                args.append(inputs["probs"] if cfg.softmax else inputs["logits"])
            else:
                args.append(inputs[n])
        kw = {name: getattr(cfg, name) for name in self.option_names}
        kw.update(self.fixed)
        if self.stochastic:
            kw["keys"] = keys
        kw.update(replay or {})
        return self.fn(*args, **kw)
