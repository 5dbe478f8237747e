"""XLA settings convlens applies before JAX starts its backend.

On XLA:CPU (jaxlib 0.10), the YNNPACK library fusions that are on by default
(``dot``, ``eltwise``, ``reduce``) make convnets several times slower than plain XLA:
VGG16's forward pass at batch 8 takes 2.6 s with them and 1.0 s without (ResNet50:
0.52 s vs 0.36 s; see ``benchmarks/forward_throughput.py``). YNNPACK's *individual*
dots, on the other hand, are what make backward passes through large Dense layers
fast: the input gradient of VGG16's fc1 (``g @ W.T``, W 25088x4096) takes 188 ms with
XLA's own dot and 25 ms with YNNPACK's. convlens therefore sets
``--xla_cpu_experimental_ynn_fusion_type=individual_dot`` unless the user set that
flag already or sets ``CONVLENS_XLA_DEFAULTS=0``. XLA reads ``XLA_FLAGS`` when the first backend is
created, so this only takes effect if convlens is imported before the first JAX
computation; `status()` says whether it did.
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
_applied: bool | None = None


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - private API: assume started if it moved
        import sys
        return "jax" in sys.modules


def apply_defaults() -> None:
    global _applied
    if os.environ.get("CONVLENS_XLA_DEFAULTS", "1") == "0":
        _applied = False
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags:
        _applied = False  # the user's own choice wins
        return
    import sys
    if "jax" in sys.modules and _backend_started():
        _applied = False
        return
    os.environ["XLA_FLAGS"] = (flags + " " + YNN_FLAG).strip()
    _applied = True


def status() -> str:
    """One line on the XLA flags convlens set (for benchmark and run metadata)."""
    if _applied:
        return f"convlens set {YNN_FLAG} (YNNPACK fusions off, YNNPACK dots on)"
    return "convlens left XLA_FLAGS as they were: " + (os.environ.get("XLA_FLAGS") or "(empty)")
