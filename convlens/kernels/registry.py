"""Every explanation method, registered once.

A method is a pure function

    explain(model, params, images, targets, cfg, keys) -> dict[str, Array]

* ``images``: pixels ``[B, H, W, C]`` float32 in 0..255 (the kernel preprocesses,
  so gradients are per pixel);
* ``targets``: class indices ``[B, T]`` int32, or an ``int`` k meaning "the top k
  predicted classes", chosen from the kernel's own forward pass;
* ``cfg``: the method's frozen, hashable config dataclass;
* ``keys``: one PRNG key per image ``[B]`` (deterministic methods ignore them), so an
  image's result never depends on its batch-mates.

It returns its declared outputs (plus ``targets`` ``[B, T]`` and ``logits``
``[B, K]``). The CLI's choices, the store's arrays and the conformance tests are all
generated from `METHODS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Output:
    """A declared output: name, dimension names (``sample`` first) and meaning."""

    name: str
    dims: tuple[str, ...]
    doc: str


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
      name: the method's name (CLI ``--method``).
      family: ``cam``, ``gradient`` ...
      config: its frozen config dataclass (defaults = the method's usual settings).
      explain: the kernel, see the module docstring.
      outputs: declared outputs besides ``targets`` and ``logits``.
      uses_layer: whether ``cfg.layer`` names a spatial layer.
      stochastic: whether the result depends on the PRNG key.
      doc: one line for ``--help``.
    """

    name: str
    family: str
    config: type
    explain: Callable[..., dict[str, Any]]
    outputs: tuple[Output, ...]
    uses_layer: bool
    stochastic: bool
    doc: str


METHODS: dict[str, MethodSpec] = {}

# Dimension names shared by outputs (xarray reads them from the store).
SAMPLE, TARGET = "sample", "target"
LAYER_MAP = (SAMPLE, TARGET, "layer_y", "layer_x")
INPUT_MAP = (SAMPLE, TARGET, "y", "x")
INPUT_ATTR = (SAMPLE, TARGET, "y", "x", "channel")
COMMON = (Output("targets", (SAMPLE, TARGET), "class index explained"),
          Output("logits", (SAMPLE, "class"), "the model's scores before softmax/sigmoid"))


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


def all_outputs(spec: MethodSpec) -> tuple[Output, ...]:
    return spec.outputs + COMMON


def _load_all() -> None:
    # Importing the method files registers them (one registry line each, at their end).
    from convlens.kernels import cam, cam_gradfree, gradients, occlusion, sampling  # noqa: F401


_load_all()
