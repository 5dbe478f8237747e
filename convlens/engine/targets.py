"""Which classes to explain: one parser for every driver (API, runs, recorder, live).

A target spec is ``"top1"`` / ``"top5"`` / ``"topk:N"`` (the model's own top classes,
chosen inside the kernel), class indices (``281``, ``"281,285"``, a list: the same for
every item), an array ``[N]`` / ``[N, T]`` of per-item indices, ``"label"`` (each item's
ground-truth class), or ``"positive"`` / ``"positive:T"`` (every class the model gives a
probability above one half: a multi-label model's positive labels, at most ``T``, the most
probable first; the kernel explains the top ``T`` and the slots of classes below the
threshold are masked: target -1, maps NaN).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from convlens.errors import ConvlensError, OptionError

TOPK, FIXED, PER_ITEM, LABEL, POSITIVE = "topk", "fixed", "per_item", "label", "positive"
THRESHOLD = 0.5  # the probability above which a class is a positive


@dataclasses.dataclass(frozen=True, eq=False)
class Targets:
    """A parsed target spec.

    Attributes:
      mode: ``topk``, ``fixed`` (the same indices for every item), ``per_item`` or ``label``.
      k: for ``topk``, how many top classes.
      indices: ``[T]`` for ``fixed``, ``[N, T]`` for ``per_item``.
      spec: the spec as given (recorded in stores).
    """

    mode: str
    k: int | None = None
    indices: np.ndarray | None = None
    spec: str = ""

    @property
    def top_k(self) -> int | None:
        """The static top-k a kernel is compiled for, or ``None`` (targets are an input)."""
        return self.k if self.mode in (TOPK, POSITIVE) else None

    @property
    def width(self) -> int:
        """Targets per item ``T``."""
        if self.mode in (TOPK, POSITIVE):
            return self.k
        if self.mode == LABEL:
            return 1
        return self.indices.shape[-1]

    def for_items(self, items: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray | None:
        """``[n, T]`` int32 class indices of items ``items`` (``None`` for top-k: the kernel
        chooses). ``labels``: the items' labels (``label`` mode)."""
        n = len(items)
        if self.mode in (TOPK, POSITIVE):
            return None
        if self.mode == FIXED:
            return np.broadcast_to(self.indices, (n, len(self.indices))).astype(np.int32)
        if self.mode == PER_ITEM:
            return self.indices[np.asarray(items)].astype(np.int32)
        if labels is None:
            raise ConvlensError("target 'label' needs the items' labels")
        return np.asarray(labels, np.int32).reshape(n, 1)


def n_classes(model) -> int:
    """Number of classes a model scores (a single sigmoid or linear unit is a two-class
    problem: 2), or a one-line error for a model without a classifier (a headless feature
    extractor: nothing to explain a class of)."""
    shape = model.output_shapes()[model.graph.output]
    if len(shape) != 2:
        raise ConvlensError(
            f"model {model.name!r} has no classifier: its output is {list(shape[1:])} feature maps, not class "
            "scores, so there is no class to explain; load it with its top (drop --no-top), or look at its "
            "feature maps with `convlens activations` and its filters with `convlens atlas`")
    return 2 if model.binary else int(shape[-1])


def parse(target, n_items: int, n_classes: int, *, labelled: bool | None = None) -> Targets:
    """Parses a target spec (see the module docstring) for ``n_items`` items of a model
    with ``n_classes`` classes; ``labelled``: whether ``label`` is possible (``None``:
    unknown, checked per item)."""
    spec = target if isinstance(target, str) else ("array" if hasattr(target, "shape") else str(target))
    if isinstance(target, str):
        t = target.strip().lower()
        if t == "label":
            if labelled is False:
                raise OptionError("target 'label' needs labelled data (class folders, a labelled TFDS data set, "
                                    "labels in the .npz, or labels= in Python)")
            return Targets(LABEL, spec=target)
        m = re.fullmatch(r"positive(?::(\d+))?", t)
        if m:
            k = int(m.group(1) or n_classes)
            if not 1 <= k <= max(n_classes, 1):
                raise OptionError(f"target {target!r}: at most {n_classes} positives (the model has {n_classes} "
                                  "classes)")
            return Targets(POSITIVE, k=k, spec=target)
        m = re.fullmatch(r"top(?:k:|-)?(\d+)", t)
        if m:
            k = int(m.group(1))
            if not 1 <= k <= max(n_classes, 1):
                raise OptionError(f"target {target!r}: the model has {n_classes} classes")
            return Targets(TOPK, k=k, spec=target)
        if not t:
            raise OptionError("target '' is empty: give top1, top5, topk:N, class indices like 281,285, or label")
        try:
            target = [int(v) for v in t.split(",")]
        except ValueError:
            raise OptionError(f"target {target!r} is not top1/top5/topk:N, class indices like 281,285, "
                                "or label") from None
    arr = np.asarray(target)
    if arr.dtype.kind not in "iu":
        raise OptionError(f"targets must be integer class indices, got {arr.dtype}")
    per_item = hasattr(target, "shape") and arr.ndim >= 1 and len(arr) == n_items and arr.ndim <= 2
    if arr.ndim == 0:
        arr, mode = arr.reshape(1), FIXED
    elif arr.ndim == 1 and not per_item:
        mode = FIXED
    elif arr.ndim == 1:
        arr, mode = arr[:, None], PER_ITEM
    elif arr.ndim == 2 and arr.shape[0] == n_items:
        mode = PER_ITEM
    else:
        raise OptionError(f"targets of shape {arr.shape} do not fit {n_items} images: give [B] or [B, T]")
    if arr.size == 0:
        raise OptionError("no targets given")
    bad = arr[(arr < 0) | (arr >= n_classes)]
    if bad.size:
        raise OptionError(f"target class {int(bad.flat[0])} is out of range: the model has {n_classes} "
                            f"classes (0..{n_classes - 1})")
    return Targets(mode, indices=arr.astype(np.int32), spec=spec)


def mask_positives(outputs: dict, dims: dict, probs, targets: Targets) -> dict:
    """For ``positive`` targets: the explained slots whose class is not a positive (its
    probability at most `THRESHOLD`) masked, ``targets`` -1 and every float output along
    the ``target`` axis NaN. ``probs [n, K]``: the items' class probabilities."""
    if targets.mode != POSITIVE:
        return outputs
    t = np.asarray(outputs["targets"])
    keep = np.take_along_axis(np.asarray(probs), np.clip(t, 0, None), axis=1) > THRESHOLD  # [n, T]
    out = dict(outputs)
    for name, v in outputs.items():
        d = dims.get(name, ())
        if len(d) > 1 and d[1] == "target":
            v = np.array(v)
            fill = -1 if name == "targets" else (np.nan if v.dtype.kind == "f" else None)
            if fill is not None:
                v[~keep] = fill
            out[name] = v
    return out
