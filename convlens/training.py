"""Explanations during training: record how a model's explanations evolve, epoch by epoch.

`ExplainRecorder` runs chosen convlens methods on a fixed set of images for a params tree
and appends the results to a Zarr store along an ``epoch`` axis, with the epoch's logged
metrics. It is what `convlens.keras.ExplainCallback` uses after converting Keras's
weights, and it serves plain Flax / optax loops directly::

    rec = ExplainRecorder(model, images, ["gradcam"], "train.zarr", target="label", labels=y)
    for epoch in range(epochs):
        params = train_one_epoch(params)
        rec.record(epoch, params, {"loss": float(loss)})

Each method compiles once (params are arguments, never constants), so recording costs
the explanation itself after the first call.

Store (besides the schema of `convlens.engine.store`): ``epoch`` [E] i4 (epoch), ``ids``
[N], ``inputs`` [N, H, W, 3], ``labels`` [N], ``metrics/<name>`` [E] f8 (epoch), and per
method ``<method>/<output>`` [E, N, ...] with dims ``("epoch", "sample", ...)``; root
attribute ``training`` (methods, every, target).
"""

from __future__ import annotations

import time

import numpy as np

from convlens.engine import store
from convlens.engine import targets as tg
from convlens.errors import ConvlensError
from convlens.models.labels import class_probabilities


class ExplainRecorder:
    """Appends explanations of fixed images to a store, one slice per recorded epoch.

    Args:
      model: a convlens `Model` (its architecture; weights come with each `record`).
      images: pixels ``[N, H, W, 3]`` at the model's input size.
      methods: method names or ``{method: options}``.
      out: the store path (created; an existing one needs ``overwrite=True``).
      target: ``top1`` / ``topk:N`` / class indices, or ``label`` with ``labels``.
      labels: ``[N]`` true classes (stored; used by ``target="label"``).
      seed: PRNG seed for stochastic methods (the same noise every epoch).
    """

    def __init__(self, model, images, methods, out, *, target="top1", labels=None, ids=None, seed: int = 0,
                 overwrite: bool = False, command: str = "training", batch_size: int | None = None):
        from convlens.engine.executor import Explain
        from convlens.kernels.registry import resolve
        from convlens.pixels import check_images

        if not isinstance(methods, dict):
            methods = {m: {} for m in methods}
        self.model, self.out = model, str(out)
        self.x = check_images(model, images)
        n = len(self.x)
        self.labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32).reshape(-1)
        if len(self.labels) != n:
            raise ConvlensError(f"{len(self.labels)} labels for {n} images")
        self.targets = tg.parse(target, n, tg.n_classes(model), labelled=labels is not None)
        self.configs = {m: resolve(model, m, dict(o)) for m, o in methods.items()}
        self.comps = {m: Explain(model, m, cfg, self.targets.top_k) for m, cfg in self.configs.items()}
        self.inputs = {"images": self.x}
        t = self.targets.for_items(np.arange(n), self.labels)
        if t is not None:
            self.inputs["targets"] = t
        self.seed, self.batch = seed, min(batch_size or n, n)
        # The store stays locked while the recorder lives (released by `close`).
        self.writing = store.open_for_write(self.out, "overwrite" if overwrite else "new", command=command, attrs={
            **store.model_attrs(model), "command": command,
            "training": {"methods": list(methods), "target": str(target), "seed": seed},
            "methods": {m: store.method_entry(self.comps[m].spec, cfg, {}) for m, cfg in self.configs.items()}})
        self.root = self.writing.root
        store.write(self.root, "ids", np.asarray([str(i) for i in (ids if ids is not None else range(n))]))
        store.write(self.root, "inputs", np.clip(self.x, 0, 255).astype(np.uint8))
        store.write(self.root, "labels", self.labels)
        self.epochs: list[int] = []
        self.seconds: list[float] = []
        self.metric_names: list[str] = []

    def explain(self, params) -> dict[str, dict[str, np.ndarray]]:
        """Every method's outputs for ``params`` (host arrays)."""
        from convlens.engine.executor import Executor
        with Executor(params, batch=self.batch, key=self.seed) as ex:
            return ex.map(self.comps, self.inputs)

    def record(self, epoch: int, params, metrics: dict | None = None) -> float:
        """Explains the images with ``params`` and appends them as epoch ``epoch``;
        returns the seconds it took."""
        t0 = time.perf_counter()
        res = self.explain(params)
        first = not self.epochs
        for m, outs in res.items():
            if self.targets.mode == tg.POSITIVE:  # labels below the threshold this epoch: -1 / NaN
                probs = class_probabilities(np.asarray(outs["logits"]), self.model.output_activation)
                outs = tg.mask_positives({k: np.asarray(v) for k, v in outs.items()}, self.comps[m].spec.dims,
                                         probs, self.targets)
            for k, v in outs.items():
                v = np.asarray(v)[None]
                name = f"{m}/{k}"
                if first:
                    arr = store.create_array(self.root, name, (0, *v.shape[1:]), v.dtype,
                                             ("epoch", *self.comps[m].spec.dims[k]), chunk=1)
                else:
                    arr = store.writable(self.root, name)
                arr.append(v, axis=0)
        if first:
            store.create_array(self.root, "epoch", (0,), np.int32, chunk=1)
            methods = dict(self.root.attrs["methods"])
            for m in res:
                spec = self.comps[m].spec
                methods[m] = store.method_entry(spec, self.configs[m], {k: spec.dims[k] for k in res[m]})
            self.root.attrs["methods"] = methods
        store.writable(self.root, "epoch").append(np.asarray([epoch], np.int32))
        for name, value in (metrics or {}).items():
            key = f"metrics/{name}"
            if key not in self.root:
                store.create_array(self.root, key, (len(self.epochs),), np.float64, chunk=1)
                self.metric_names.append(name)
            arr = store.writable(self.root, key)
            arr.resize((len(self.epochs),))
            arr.append(np.asarray([_as_float(value)]))
        for name in self.metric_names:  # metrics not logged this epoch stay NaN
            if self.root[f"metrics/{name}"].shape[0] < len(self.epochs) + 1:
                store.writable(self.root, f"metrics/{name}").append(np.asarray([np.nan]))
        self.epochs.append(int(epoch))
        secs = time.perf_counter() - t0
        self.seconds.append(secs)
        self.root.attrs["training"] = {**self.root.attrs["training"], "epochs": self.epochs,
                                       "record_seconds": self.seconds}
        return secs

    def close(self):
        try:
            store.finish(self.out)
        finally:
            self.writing.close()


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")  # a logged value that is not a number (a string, a list)
