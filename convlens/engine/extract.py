"""What a model holds, without explaining anything: the activations of a few images at
chosen layers (``convlens activations``) and the conv kernels as images (``convlens
weights``), each optionally into a store of the schema's ``activations`` / ``weights``
layout."""

from __future__ import annotations

import numpy as np

from convlens.engine import store
from convlens.engine.executor import Batch, Executor, Fn


def activations(model, params, images: np.ndarray, layers, ids, out=None, *, mode: str = "new",
                resize: str = "squash", command: str = "activations") -> dict[str, np.ndarray]:
    """The outputs of ``layers`` for ``images [N, H, W, C]`` (one forward pass, through the
    executor): ``{layer: [N, ...]}``; with ``out``, written into a store."""
    from convlens.kernels.activations import activations as acts_of
    names = tuple(layers)
    comp = Fn(lambda p, i, k: acts_of(model, p, i["images"], names), ("activations", model.computation, names),
              ("images",), "activations")
    x = np.asarray(images, np.float32)
    with Executor(params, batch=len(x), tune=False) as ex:
        acts = ex.run({"a": comp}, Batch({"images": x}, np.arange(len(x))))["a"]
    if out is not None:
        with store.open_for_write(out, mode, command=command,
                                  attrs={**store.model_attrs(model), "command": command, "resize": resize}) as w:
            store.write(w.root, "ids", np.asarray(ids))
            store.write(w.root, "inputs", np.clip(x, 0, 255).astype(np.uint8))
            for name in names:
                store.write(w.root, f"activations/{name}", np.asarray(acts[name]))
            store.finish(out)
    return acts


def weights(model, params, layers, out=None, *, mode: str = "new", command: str = "weights") -> dict[str, dict]:
    """The kernels of conv ``layers`` and their images (normalised per layer, through the
    executor): ``{layer: {"kernel": [kh, kw, c_in, c_out], "filters": ...}}``; with
    ``out``, written into a store."""
    from convlens.kernels.activations import filter_images
    with Executor(params, batch=1, tune=False) as ex:
        res = {n: ex.call(Fn(lambda p, i, k, n=n: filter_images(model, p, n), ("filters", model.computation, n), (),
                             "filters", whole=True)) for n in layers}
    if out is not None:
        with store.open_for_write(out, mode, command=command,
                                  attrs={**store.model_attrs(model), "command": command}) as w:
            for n, r in res.items():
                store.write(w.root, f"weights/{n}/kernel", np.asarray(r["kernel"]))
                f = np.asarray(r["filters"])
                rgb = f.shape[-1] == 3 and f.ndim == 4 and r["kernel"].shape[2] == 3
                store.write(w.root, f"weights/{n}/filters", f,
                            ("filter", "kh", "kw", "rgb") if rgb else ("filter", "c_in", "kh", "kw"))
            store.finish(out)
    return res


def describe(result: dict) -> str:
    """One line per layer of `activations` (shape, mean, max, share of zeros) or `weights`
    (kernel and filter-image shapes, the kernel's range)."""
    lines = []
    for name, a in result.items():
        if isinstance(a, dict):
            k = a["kernel"]
            lines.append(f"{name:28s} kernel {list(k.shape)}  filters {list(a['filters'].shape)}  "
                         f"range [{k.min():.4g}, {k.max():.4g}]")
        else:
            lines.append(f"{name:28s} {str(list(a.shape[1:])):22s} mean {a.mean():10.4g}  max {a.max():10.4g}  "
                         f"zero {100 * (a == 0).mean():5.1f}%")
    return "\n".join(lines)
