"""Shared by the benchmark scripts: one set of random weights every framework loads,
and the PyTorch twin of a convlens model built from those weights."""

from __future__ import annotations

import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def weights_file(model_name: str) -> Path:
    """One set of random weights (convlens's init, seed 0) that every framework loads,
    so all of them compute the same numbers."""
    path = HERE / "results" / f".{model_name}_weights.npz"
    if not path.exists():
        from convlens.models.registry import load_model
        _, params = load_model(model_name, random_init=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        import numpy as np
        np.savez(path, **{f"{k}/{v}": np.asarray(a) for k, vs in params.items() for v, a in vs.items()})
    return path


def load_arrays(model_name):
    import numpy as np
    flat = np.load(weights_file(model_name))
    out: dict[str, dict] = {}
    for key in flat.files:
        layer, var = key.split("/")
        out.setdefault(layer, {})[var] = flat[key]
    return out


def torch_model(model_name: str, weights: dict, inplace: bool = True, squash: bool = True):
    """The PyTorch equivalent of a convlens built-in (VGG16 or the small convnet), eval mode,
    with ``weights`` (convlens layout) copied in; ``squash=False`` ends at the logits."""
    import torch
    from torch import nn
    layers, c = [], 3
    if model_name == "vgg16":
        for n, w in zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512)):
            for _ in range(n):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace)]
                c = w
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Flatten(), nn.Linear(25088, 4096), nn.ReLU(inplace), nn.Linear(4096, 4096),
                   nn.ReLU(inplace), nn.Linear(4096, 1000)] + ([nn.Softmax(-1)] if squash else [])
    else:
        for w in (32, 64, 128, 128):
            layers += [nn.Conv2d(c, w, 3), nn.ReLU(inplace), nn.MaxPool2d(2)]
            c = w
        layers += [nn.Flatten(), nn.Dropout(0.5), nn.Linear(6272, 512), nn.ReLU(inplace),
                   nn.Linear(512, 1)] + ([nn.Sigmoid()] if squash else [])
    net = nn.Sequential(*layers).eval()
    from convlens.models.registry import build_model
    names = [n for n in build_model(model_name).layer_names if n in weights]
    mods = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    last_conv = None
    with torch.no_grad():
        for name, mod in zip(names, mods):
            w = torch.from_numpy(weights[name]["kernel"])
            if isinstance(mod, nn.Conv2d):
                mod.weight.copy_(w.permute(3, 2, 0, 1))
                last_conv = mod
            else:
                if last_conv is not None:
                    # Keras flattens (H, W, C); torch flattens (C, H, W): reorder fc1's rows.
                    c = last_conv.out_channels
                    w = w.reshape(w.shape[0] // c, c, -1).permute(1, 0, 2).reshape(w.shape[0], -1)
                    last_conv = None
                mod.weight.copy_(w.T)
            mod.bias.copy_(torch.from_numpy(weights[name]["bias"]))
    return net


def best_time(fn, reps: int) -> float:
    """Best of ``reps`` calls after one warm-up (compilation) call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine() -> dict:
    """Where a benchmark ran: figures differ between the machines of one kind (AVX-512 or not)."""
    import os
    import platform
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
        simd = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    except (OSError, StopIteration):
        simd = ""
    return {"cpu": cpu, "simd": simd, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def explain_fn(model, method: str, opts: dict | None = None, top_k: int = 1):
    """The compiled kernel convlens runs for ``method`` (the executor's: XLA options chosen
    per computation), as ``fn(params, images [B, H, W, C], targets=None, keys=None) -> outputs``
    (``targets`` unused: the top ``top_k`` classes are explained)."""
    from convlens.api import resolve
    from convlens.engine.executor import Explain, function
    f = function(Explain(model, method, resolve(model, method, opts or {}), top_k))

    def fn(params, x, targets=None, keys=None):
        return f(params, {"images": x}, keys_for(x.shape[0]) if keys is None else keys)
    return fn


def forward_fn(model):
    """The executor's compiled forward pass, ``fn(params, images) -> logits``."""
    import numpy as np

    from convlens.engine.executor import Forward, function, item_keys
    f = function(Forward(model))
    return lambda params, x: f(params, {"images": x}, item_keys(0, np.arange(x.shape[0])))["logits"]


def keys_for(n: int):
    import numpy as np

    from convlens.engine.executor import item_keys
    return item_keys(0, np.arange(n))
