"""A PyTorch twin of any convlens model, with identical weights.

`Twin(model, params)` runs a convlens `Graph` node by node with PyTorch operations (NCHW,
channels_last memory), so reference libraries that take a ``torch.nn.Module`` (Captum,
Quantus, zennit) and speed comparisons run on exactly the network convlens runs: same
layers, same weights, Keras's semantics (TF's asymmetric SAME padding, NHWC flattening).
Test and benchmark code only; convlens never imports PyTorch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _same_pads(size, k, s, d=1):
    """TF/Keras SAME padding along one axis: (before, after), the extra pixel after."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_same(x, k, s, d=(1, 1), value=0.0):
    (ph0, ph1), (pw0, pw1) = _same_pads(x.shape[2], k[0], s[0], d[0]), _same_pads(x.shape[3], k[1], s[1], d[1])
    if ph0 or ph1 or pw0 or pw1:
        x = F.pad(x, (pw0, pw1, ph0, ph1), value=value)
    return x


ACT = {
    "linear": lambda x: x, "relu": F.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "swish": F.silu, "silu": F.silu, "elu": F.elu, "selu": F.selu, "softplus": F.softplus,
    "softsign": F.softsign, "gelu": lambda x: F.gelu(x, approximate="none"),
    "hard_sigmoid": lambda x: F.relu6(x + 3.0) / 6.0, "hard_silu": lambda x: x * F.relu6(x + 3.0) / 6.0,
    "hard_swish": lambda x: x * F.relu6(x + 3.0) / 6.0, "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "exponential": torch.exp, "mish": lambda x: x * torch.tanh(F.softplus(x)),
    "softmax": lambda x: torch.softmax(x, dim=1), "log_softmax": lambda x: torch.log_softmax(x, dim=1),
}
SQUASH = ("softmax", "sigmoid", "log_softmax")


def _axis(ndim, axis):
    """A Keras (NHWC) axis as a torch (NCHW) dim for 4-D tensors."""
    if ndim != 4:
        return axis
    a = axis % 4
    return {0: 0, 1: 2, 2: 3, 3: 1}[a]


class Twin(torch.nn.Module):
    """``model`` with ``params`` as a torch module: ``forward(x)`` takes preprocessed
    input NCHW and returns the model's output (``logits=True``: before a final softmax /
    sigmoid); ``capture`` names layers whose outputs `outputs` keeps (NCHW)."""

    def __init__(self, model, params, logits: bool = False, capture=()):
        super().__init__()
        self.graph, self.logits, self.capture = model.graph, logits, tuple(capture)
        self.p = torch.nn.ParameterDict()
        for layer, vs in params.items():
            for k, v in vs.items():
                self.p[f"{layer}::{k}".replace(".", "_")] = torch.nn.Parameter(torch.from_numpy(np.array(v)),
                                                                              requires_grad=False)
        self.outputs: dict[str, torch.Tensor] = {}

    def w(self, layer, name):
        return self.p[f"{layer}::{name}".replace(".", "_")]

    def forward(self, x):
        g = self.graph
        vals = {g.input: x}
        self.outputs = {}
        for node in g.nodes:
            if node.cls == "InputLayer":
                continue
            xs = [vals[i] for i in node.inputs]
            last = self.logits and node.name == g.output
            vals[node.name] = self._node(node, xs, last)
            if node.name in self.capture:
                self.outputs[node.name] = vals[node.name]
        return vals[g.output]

    def _act(self, name, x, last):
        return x if (last and name in SQUASH) else ACT[name](x)

    def _node(self, node, xs, last):  # noqa: C901 - one branch per Keras layer class
        c, n = node.config, node.name
        x = xs[0]
        cls = node.cls
        if cls == "Conv2D":
            k = self.w(n, "kernel").permute(3, 2, 0, 1)
            if c["padding"] == "SAME":
                x = _pad_same(x, c["kernel_size"], c["strides"], c["dilation"])
            y = F.conv2d(x, k, self.w(n, "bias") if c["use_bias"] else None, c["strides"], 0, c["dilation"],
                         c["groups"])
            return self._act(c["activation"], y, last)
        if cls in ("DepthwiseConv2D", "SeparableConv2D"):
            dk = self.w(n, "kernel" if cls == "DepthwiseConv2D" else "depthwise_kernel")
            kh, kw, cin, m = dk.shape
            if c["padding"] == "SAME":
                x = _pad_same(x, c["kernel_size"], c["strides"], c["dilation"])
            y = F.conv2d(x, dk.permute(2, 3, 0, 1).reshape(cin * m, 1, kh, kw), None, c["strides"], 0,
                         c["dilation"], cin)
            if cls == "SeparableConv2D":
                y = F.conv2d(y, self.w(n, "pointwise_kernel").permute(3, 2, 0, 1))
            if c["use_bias"]:
                y = y + self.w(n, "bias").view(1, -1, 1, 1)
            return self._act(c["activation"], y, last)
        if cls == "Dense":
            if x.ndim == 4:
                y = torch.einsum("bchw,cd->bdhw", x, self.w(n, "kernel"))
                y = y + self.w(n, "bias").view(1, -1, 1, 1) if c["use_bias"] else y
            else:
                y = x @ self.w(n, "kernel") + (self.w(n, "bias") if c["use_bias"] else 0)
            return self._act(c["activation"], y, last)
        if cls == "BatchNormalization":
            inv = torch.rsqrt(self.w(n, "moving_variance") + c["epsilon"])
            if c["scale"]:
                inv = inv * self.w(n, "gamma")
            y = (x - self.w(n, "moving_mean").view(1, -1, 1, 1)) * inv.view(1, -1, 1, 1) if x.ndim == 4 else \
                (x - self.w(n, "moving_mean")) * inv
            if c["center"]:
                y = y + (self.w(n, "beta").view(1, -1, 1, 1) if x.ndim == 4 else self.w(n, "beta"))
            return y
        if cls == "LayerNormalization":
            t = x.permute(0, 2, 3, 1) if x.ndim == 4 else x
            mean = t.mean(-1, keepdim=True)
            inv = torch.rsqrt(t.var(-1, keepdim=True, unbiased=False) + c["epsilon"])
            if c["scale"]:
                inv = inv * self.w(n, "gamma")
            res = -mean * inv + (self.w(n, "beta") if c["center"] else 0)
            t = t * inv + res
            return t.permute(0, 3, 1, 2) if x.ndim == 4 else t
        if cls in ("Activation", "Softmax"):
            if cls == "Softmax":
                return x if last else torch.softmax(x, dim=_axis(x.ndim, c["axis"][0]))
            return self._act(c["activation"], x, last)
        if cls == "ReLU":
            t, slope, mx = c["threshold"], c["negative_slope"], c["max_value"]
            y = torch.where(x >= t, x, slope * (x - t)) if (t or slope) else F.relu(x)
            return torch.clamp(y, max=mx) if mx is not None else y
        if cls == "LeakyReLU":
            return F.leaky_relu(x, c["negative_slope"])
        if cls in ("MaxPooling2D", "AveragePooling2D"):
            k, s = c["pool_size"], c["strides"]
            if cls == "MaxPooling2D":
                if c["padding"] == "SAME":
                    x = _pad_same(x, k, s, value=-math.inf)
                return F.max_pool2d(x, k, s)
            if c["padding"] == "SAME":
                ones = torch.ones_like(x[:, :1])
                total = F.avg_pool2d(_pad_same(x, k, s), k, s) * (k[0] * k[1])
                count = F.avg_pool2d(_pad_same(ones, k, s), k, s) * (k[0] * k[1])
                return total / count
            return F.avg_pool2d(x, k, s)
        if cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            y = x.mean((2, 3), keepdim=True) if cls == "GlobalAveragePooling2D" else x.amax((2, 3), keepdim=True)
            return y if c["keepdims"] else y.flatten(1)
        if cls == "Flatten":
            return x.permute(0, 2, 3, 1).flatten(1) if x.ndim == 4 else x.flatten(1)
        if cls == "Reshape":
            shape = c["target_shape"]
            t = x.permute(0, 2, 3, 1) if x.ndim == 4 else x
            t = t.reshape(t.shape[0], *shape)
            return t.permute(0, 3, 1, 2) if t.ndim == 4 else t
        if cls in ("Add", "Multiply", "Maximum", "Minimum", "Average", "Subtract"):
            if cls == "Subtract":
                return xs[0] - xs[1]
            out = xs[0]
            for o in xs[1:]:
                out = {"Add": torch.add, "Multiply": torch.mul, "Maximum": torch.maximum, "Minimum": torch.minimum,
                       "Average": torch.add}[cls](out, o)
            return out / len(xs) if cls == "Average" else out
        if cls == "Concatenate":
            return torch.cat(xs, dim=_axis(xs[0].ndim, c["axis"]))
        if cls == "ZeroPadding2D":
            (t, b), (l, r) = c["padding"]
            return F.pad(x, (l, r, t, b))
        if cls == "Cropping2D":
            (t, b), (l, r) = c["cropping"]
            return x[:, :, t:x.shape[2] - b, l:x.shape[3] - r]
        if cls == "Rescaling":
            scale = torch.as_tensor(c["scale"], dtype=x.dtype)
            offset = torch.as_tensor(c["offset"], dtype=x.dtype)
            if scale.ndim:
                scale = scale.view(1, -1, 1, 1)
            if offset.ndim:
                offset = offset.view(1, -1, 1, 1)
            return x * scale + offset
        if cls == "Normalization":
            mean = torch.as_tensor(c["mean"] if c["mean"] is not None else self.w(n, "mean"), dtype=x.dtype)
            var = torch.as_tensor(c["variance"] if c["variance"] is not None else self.w(n, "variance"),
                                  dtype=x.dtype)
            std = torch.clamp(torch.sqrt(var), min=1e-7).view(1, -1, 1, 1)
            mean = mean.view(1, -1, 1, 1)
            return x * std + mean if c["invert"] else (x - mean) / std
        if cls == "LayerScale":
            return x * self.w(n, "gamma").view(1, -1, 1, 1)
        if cls == "CustomScaleLayer":
            return xs[0] + xs[1] * c["scale"]
        if cls.startswith("op."):
            it = iter(xs)
            args = [next(it) if a[0] == "t" else torch.as_tensor(a[1], dtype=x.dtype) for a in c["template"]]
            fn = {"Add": torch.add, "Subtract": torch.sub, "Multiply": torch.mul, "Divide": torch.div,
                  "TrueDivide": torch.div, "Maximum": torch.maximum, "Minimum": torch.minimum,
                  "Power": torch.pow}[cls[3:]]
            return fn(*args)
        if node.kind in ("identity", "container"):
            return x
        raise NotImplementedError(f"the torch twin has no {cls} ({n})")


def twin(model, params, logits: bool = False, capture=()) -> Twin:
    """A `Twin` in eval mode with channels_last memory."""
    return Twin(model, params, logits, capture).eval().to(memory_format=torch.channels_last)


def nchw(x: np.ndarray):
    """NHWC numpy -> NCHW torch (channels_last memory)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2))).contiguous(
        memory_format=torch.channels_last)
