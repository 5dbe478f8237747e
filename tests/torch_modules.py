"""A PyTorch twin built from ``torch.nn`` modules, one per Keras layer (and one per fused
activation), for reference libraries that attach to module types: zennit's LRP rules
find ``Conv2d``, ``Linear``, ``ReLU``, ``AdaptiveAvgPool2d``, its own ``Sum`` and
``BatchNorm2d``. `tests/torch_twin.py` runs the same graphs with functional operations.

Covers the layers of VGG16, ResNet50 and the test networks: Conv2D, Dense,
MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, Flatten, BatchNormalization,
ReLU / Activation("relu"), Add, ZeroPadding2D and Dropout. Test code only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.torch_twin import _same_pads


class _NHWCFlatten(nn.Module):
    def forward(self, x):  # Keras flattens NHWC
        return x.permute(0, 2, 3, 1).flatten(1) if x.ndim == 4 else x.flatten(1)


class _Pad(nn.Module):
    """Zero padding (TF's SAME padding is asymmetric), a module without a rule."""

    def __init__(self, pads, value=0.0):
        super().__init__()
        self.pads, self.value = pads, value

    def forward(self, x):
        return nn.functional.pad(x, self.pads, value=self.value)


class _Same(nn.Module):
    """SAME padding computed from the input size (as Keras does) before ``inner``."""

    def __init__(self, k, s, d, value=0.0):
        super().__init__()
        self.k, self.s, self.d, self.value = k, s, d, value

    def forward(self, x):
        (t, b), (lft, r) = (_same_pads(x.shape[2], self.k[0], self.s[0], self.d[0]),
                            _same_pads(x.shape[3], self.k[1], self.s[1], self.d[1]))
        return nn.functional.pad(x, (lft, r, t, b), value=self.value) if t or b or lft or r else x


class _Stack(nn.Module):
    def forward(self, *xs):
        return torch.stack(xs, dim=-1)


class ModuleTwin(nn.Module):
    """``model`` with ``params`` as modules; ``forward(x)`` takes preprocessed NCHW input
    and returns the logits (a final softmax left out). ``bn_pairs`` lists
    ``([linear module], batchnorm module)`` names for zennit's ``NamedMergeBatchNorm``."""

    def __init__(self, model, params):
        super().__init__()
        from zennit.layer import Sum
        self.graph = model.graph
        self.mods = nn.ModuleDict()
        self.steps: dict[str, list[str]] = {}
        p = {k: {n: torch.from_numpy(np.array(a)) for n, a in v.items()} for k, v in params.items()}
        for node in self.graph.nodes:
            c, name, seq = node.config, node.name, []

            def add(key, mod):
                self.mods[key] = mod
                seq.append(key)
            if node.cls == "Conv2D":
                k, s, d = c["kernel_size"], c["strides"], c["dilation"]
                # SAME padding at stride 1 and an odd kernel is symmetric: the convolution's own
                # (as a PyTorch model has it, so rules that replace the input, flat and z-box,
                # see zeros there); otherwise TF's asymmetric padding as a module before it.
                inner = c["padding"] == "SAME" and tuple(s) == (1, 1) and all(kk % 2 for kk in k)
                if c["padding"] == "SAME" and not inner:
                    add(f"{name}__pad", _Same(k, s, d))
                pad = tuple((kk - 1) * dd // 2 for kk, dd in zip(k, d)) if inner else 0
                w = p[name]["kernel"]
                conv = nn.Conv2d(w.shape[2] * c["groups"], w.shape[3], tuple(k), tuple(s), pad, tuple(d),
                                 c["groups"], c["use_bias"])
                conv.weight.data = w.permute(3, 2, 0, 1).contiguous()
                if c["use_bias"]:
                    conv.bias.data = p[name]["bias"].clone()
                add(name, conv)
            elif node.cls == "Dense":
                w = p[name]["kernel"]
                lin = nn.Linear(w.shape[0], w.shape[1], c["use_bias"])
                lin.weight.data = w.T.contiguous()
                if c["use_bias"]:
                    lin.bias.data = p[name]["bias"].clone()
                add(name, lin)
            elif node.cls in ("MaxPooling2D", "AveragePooling2D"):
                k, s = c["pool_size"], c["strides"]
                if c["padding"] == "SAME":
                    if node.cls == "AveragePooling2D":
                        raise NotImplementedError("SAME average pooling")
                    add(f"{name}__pad", _Same(k, s, (1, 1), value=-float("inf")))
                add(name, (nn.MaxPool2d if node.cls == "MaxPooling2D" else nn.AvgPool2d)(tuple(k), tuple(s)))
            elif node.cls == "GlobalAveragePooling2D":
                add(name, nn.AdaptiveAvgPool2d(1))
                add(f"{name}__flat", nn.Flatten())
            elif node.cls == "Flatten":
                add(name, _NHWCFlatten())
            elif node.cls == "BatchNormalization":
                b = p[name]
                ch = b["moving_mean"].shape[0]
                bn = nn.BatchNorm2d(ch, eps=c["epsilon"]).eval()
                bn.running_mean.data, bn.running_var.data = b["moving_mean"].clone(), b["moving_variance"].clone()
                bn.weight.data = b["gamma"].clone() if c["scale"] else torch.ones(ch)
                bn.bias.data = b["beta"].clone() if c["center"] else torch.zeros(ch)
                add(name, bn)
            elif node.cls == "Add":
                add(f"{name}__stack", _Stack())
                add(name, Sum())
            elif node.cls == "ZeroPadding2D":
                (t, b), (lft, r) = c["padding"]
                add(name, _Pad((lft, r, t, b)))
            elif node.cls in ("Dropout", "InputLayer"):
                pass
            elif node.cls not in ("ReLU", "Activation"):
                raise NotImplementedError(node.cls)
            act = c.get("activation")
            if node.cls == "ReLU" or act == "relu":
                add(f"{name}__relu" if node.cls != "ReLU" else name, nn.ReLU())
            elif act not in (None, "linear", "softmax"):
                raise NotImplementedError(f"{name}: activation {act}")
            self.steps[name] = seq

    def forward(self, x):
        vals = {self.graph.input: x}
        for node in self.graph.nodes:
            if node.cls == "InputLayer":
                continue
            xs = [vals[i] for i in node.inputs]
            seq = self.steps[node.name]
            if not seq:
                vals[node.name] = xs[0]
                continue
            y = self.mods[seq[0]](*xs)
            for key in seq[1:]:
                y = self.mods[key](y)
            vals[node.name] = y
        return vals[self.graph.output]

    def canonizer(self, folds):
        """zennit's ``NamedMergeBatchNorm`` for convlens's folds ``{bn: layer}``, made
        exact: zennit 0.5.1 sets a merged normalisation's statistics to the identity but
        keeps its ``eps``, so its canonized model divides each such output by
        ``sqrt(1 + eps)`` (5e-4 with Keras's 1e-3); here ``eps`` is zeroed too, while
        merged."""
        from zennit.canonizers import NamedMergeBatchNorm

        class Exact(NamedMergeBatchNorm):
            def register(self, linears, batch_norm):
                self.eps = batch_norm.eps
                super().register(linears, batch_norm)
                batch_norm.eps = 0.0

            def remove(self):
                super().remove()
                self.batch_norm.eps = self.eps

            def copy(self):
                return Exact(self.name_map)
        return Exact([([f"mods.{layer}"], f"mods.{bn}") for bn, layer in folds.items()])
