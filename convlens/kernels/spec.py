"""What a method declares about itself: `MethodSpec` and its `Output` s.

A method module declares its specs in a module-level tuple ``SPECS`` and imports only
this module (never the registry), so any method module imports on its own in a fresh
interpreter and `convlens.kernels.registry` assembles `METHODS` from the declarations
without side effects.

A method is a pure function

    explain(model, params, images, targets, cfg, keys) -> dict[str, Array]

* ``images``: pixels ``[B, H, W, C]`` float32 in 0..255 (the kernel preprocesses,
  so gradients are per pixel);
* ``targets``: class indices ``[B, T]`` int32, or an ``int`` k meaning "the top k
  predicted classes", chosen from the kernel's own forward pass;
* ``cfg``: the method's frozen, hashable config dataclass (a `convlens.config.Config`);
* ``keys``: one PRNG key per image ``[B]`` (deterministic methods ignore them), so an
  image's result never depends on its batch-mates.

It returns its declared outputs plus ``targets`` ``[B, T]`` and ``logits`` ``[B, K]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from convlens.errors import ConvlensError

# Dimension names shared by outputs (xarray reads them from the store).
SAMPLE, TARGET = "sample", "target"
LAYER_MAP = (SAMPLE, TARGET, "layer_y", "layer_x")
INPUT_MAP = (SAMPLE, TARGET, "y", "x")
INPUT_ATTR = (SAMPLE, TARGET, "y", "x", "channel")

# Which layer a method's ``cfg.layer`` names.
LAYER_NONE = "none"  # the method takes no layer
LAYER_SPATIAL = "spatial"  # any layer with a spatial output; default `common.default_layer`
LAYER_FIXED = "fixed"  # one layer the method is defined at (CAM: the layer feeding the pooling)
LAYER_NEEDS = (LAYER_NONE, LAYER_SPATIAL, LAYER_FIXED)


@dataclasses.dataclass(frozen=True)
class Output:
    """A declared output: name, dimension names (``sample`` first) and meaning."""

    name: str
    dims: tuple[str, ...]
    doc: str


COMMON = (Output("targets", (SAMPLE, TARGET), "class index explained"),
          Output("logits", (SAMPLE, "class"), "the model's scores before softmax/sigmoid"))


@dataclasses.dataclass(frozen=True)
class SharedPass:
    """Work that methods of a family can share on a batch: ``run(model, params, images,
    targets, cfg) -> state`` (one forward and backward pass, say), then per method
    ``finish(model, images, cfg, state) -> outputs``. Methods declaring the same pass
    (by ``name``) with equal configs are computed from one ``run`` when asked together."""

    name: str
    run: Callable[..., dict[str, Any]]
    finish: Callable[..., dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Advice:
    """What to run instead when a method's maps come out empty or constant, and why (a
    phrase completing "<method> ..."). The audit says it; it names no method itself."""

    instead: tuple[str, ...]
    why: str


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method's declaration.

    Attributes:
      name: the method's name (CLI ``--method``).
      family: ``cam``, ``gradient``, ``perturbation`` ...
      config: its frozen config dataclass (defaults = the method's usual settings).
      explain: the kernel, see the module docstring.
      outputs: declared outputs besides ``targets`` and ``logits``.
      stochastic: whether the result depends on the PRNG key.
      doc: one line for ``--help``.
      layer: which layer ``cfg.layer`` names: ``none``, ``spatial`` (any spatial layer,
        `common.default_layer` by default) or ``fixed`` (the one ``fixed_layer`` gives).
      fixed_layer: ``model -> layer name`` for ``layer="fixed"`` (raises a one-line error
        when the model has no such layer).
      heatmap: the output that is the method's map at input resolution ``[B, T, H, W]``,
        drawn by the renderer and audited; ``None`` if it has none.
      check: ``(model, cfg) -> None``, raising a one-line error where the options cannot
        work for this model (an occlusion window larger than the input).
      pools_gradient: whether its map weighs channels by the gradient averaged over the
        layer's positions (Grad-CAM and kin): behind a head that keeps positions apart
        (Flatten) those averages cancel and the maps go empty, which audits flag.
      shared: a `SharedPass` whose ``finish`` gives exactly ``explain``'s outputs, so the
        executor can compute several such methods from one pass.
      when_empty: an `Advice` for maps that come out empty (audits say it).
    """

    name: str
    family: str
    config: type
    explain: Callable[..., dict[str, Any]]
    outputs: tuple[Output, ...]
    stochastic: bool
    doc: str
    layer: str = LAYER_NONE
    fixed_layer: Callable[[Any], str] | None = None
    heatmap: str | None = "heatmap"
    check: Callable[[Any, Any], None] | None = None
    pools_gradient: bool = False
    shared: SharedPass | None = None
    when_empty: Advice | None = None

    def __post_init__(self):
        if self.layer not in LAYER_NEEDS:
            raise ValueError(f"{self.name}: layer must be one of {LAYER_NEEDS}")
        if (self.layer == LAYER_FIXED) != (self.fixed_layer is not None):
            raise ValueError(f"{self.name}: a fixed layer needs fixed_layer, and only it")
        if self.heatmap is not None and self.heatmap not in {o.name for o in self.outputs}:
            raise ValueError(f"{self.name}: heatmap {self.heatmap!r} is not a declared output")

    @property
    def uses_layer(self) -> bool:
        return self.layer != LAYER_NONE

    @property
    def all_outputs(self) -> tuple[Output, ...]:
        return self.outputs + COMMON

    @property
    def dims(self) -> dict[str, tuple[str, ...]]:
        return {o.name: o.dims for o in self.all_outputs}

    def store_entry(self) -> dict:
        """What a store records about the method's outputs (the renderer reads it back
        without importing the registry)."""
        out = {"outputs": {o.name: list(o.dims) for o in self.all_outputs}, "heatmap": self.heatmap,
               "family": self.family, "pools_gradient": self.pools_gradient}
        if self.when_empty is not None:
            out["when_empty"] = {"instead": list(self.when_empty.instead), "why": self.when_empty.why}
        return out

    def resolve(self, model, options: dict | None = None):
        """The method's config from keyword options (command-line strings coerced, every
        value checked against its declaration), with ``layer`` checked and resolved to a
        real layer of ``model``."""
        from convlens.config import build
        cfg = options if isinstance(options, self.config) else build(self.config, dict(options or {}),
                                                                       owner=self.name)
        if self.check is not None:
            self.check(model, cfg)
        if not self.uses_layer:
            return cfg
        from convlens.kernels import common
        given = getattr(cfg, "layer", None)
        if self.layer == LAYER_FIXED:
            layer = self.fixed_layer(model)
            if given not in (None, layer):
                raise ConvlensError(f"{self.name} is defined at {layer!r}, not {given!r}: drop the layer option")
        else:
            layer = common.check_spatial_layer(model, given or common.default_layer(model), self.name)
        return dataclasses.replace(cfg, layer=layer)
