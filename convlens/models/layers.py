"""Keras layer semantics in jnp: one entry per supported Keras class.

Each entry knows three things about a Keras layer class:

* ``parse``: turn the layer's Keras config into the few options convlens needs,
  refusing options it cannot honour (``channels_first``, unknown activations)
  with an `UnsupportedLayerError` that names the layer;
* ``variables``: the layer's variables in Keras's own order (``layer.weights``),
  with Keras's variable names, given the input shapes;
* ``apply``: the layer's inference-time computation on NHWC float32 arrays.

Keeping the order and names identical to Keras is what lets every weight file
format be loaded by position or by name without per-format tables.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convlens.errors import InvalidLayerError, UnsupportedLayerError

Array = jax.Array


# --------------------------------------------------------------------------
# Activations (Keras 3 definitions)

def _hard_sigmoid(x):
    return jax.nn.relu6(x + 3.0) / 6.0


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "sigmoid": jax.nn.sigmoid,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "log_softmax": lambda x: jax.nn.log_softmax(x, axis=-1),
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "softplus": jax.nn.softplus,
    "softsign": jax.nn.soft_sign,
    "hard_sigmoid": _hard_sigmoid,
    "hard_silu": lambda x: x * _hard_sigmoid(x),
    "hard_swish": lambda x: x * _hard_sigmoid(x),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2),
    "exponential": jnp.exp,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}

@jax.custom_vjp
def guided_relu(x):
    """ReLU whose gradient also drops negative incoming gradients (Springenberg et al. 2015)."""
    return jax.nn.relu(x)


def _guided_fwd(x):
    return jax.nn.relu(x), x


def _guided_bwd(x, g):
    return (jnp.where(x > 0, jax.nn.relu(g), 0.0),)


guided_relu.defvjp(_guided_fwd, _guided_bwd)


@jax.custom_vjp
def deconv_relu(x):
    """ReLU whose gradient is ReLU of the incoming gradient, ignoring the input (Zeiler & Fergus 2014)."""
    return jax.nn.relu(x)


deconv_relu.defvjp(lambda x: (jax.nn.relu(x), None), lambda _, g: (jax.nn.relu(g),))

# How ReLUs backpropagate: the model is the same, only the gradient rule changes.
RELU_RULES: dict[str, Callable[[Array], Array]] = {
    "standard": jax.nn.relu, "guided": guided_relu, "deconvnet": deconv_relu}

# Activations after which the layer's input is the "logit" an explanation wants.
SQUASHING = ("softmax", "sigmoid", "log_softmax")


def parse_activation(value: Any, layer: str) -> str:
    """Keras serialises built-in activations as a name, or (rarely) a dict."""
    if value is None:
        return "linear"
    if isinstance(value, dict):
        if value.get("registered_name") not in (None, "function") or (
            value.get("module") not in (None, "keras.activations", "builtins")):
            raise UnsupportedLayerError(
                f"layer {layer!r} uses a custom activation {value!r}; convlens never runs "
                f"code from a file. Supported activations: {', '.join(sorted(ACTIVATIONS))}")
        value = value.get("config", value.get("class_name"))
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise UnsupportedLayerError(
            f"layer {layer!r} uses activation {value!r}, which convlens does not support; "
            f"supported: {', '.join(sorted(ACTIVATIONS))}")
    return value


# --------------------------------------------------------------------------
# Variables

@dataclasses.dataclass(frozen=True)
class Var:
    """One Keras variable of a layer: name, shape, initialiser, trainability."""

    name: str
    shape: tuple[int, ...]
    init: str  # "glorot", "zeros", "ones" or "constant:VALUE"
    trainable: bool = True


def init_var(var: Var, key: Array) -> Array:
    if var.init.startswith("constant:"):
        return jnp.full(var.shape, float(var.init.split(":", 1)[1]), jnp.float32)
    if var.init == "zeros":
        return jnp.zeros(var.shape, jnp.float32)
    if var.init == "ones":
        return jnp.ones(var.shape, jnp.float32)
    # Keras's default kernel initialiser; the receptive field counts towards fan-in/out.
    return jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1)(key, var.shape, jnp.float32)


def init_var_np(var: Var, rng) -> np.ndarray:
    """`init_var` on the host: Keras's glorot-uniform (receptive field counted) or constants."""
    if var.init.startswith("constant:"):
        return np.full(var.shape, float(var.init.split(":", 1)[1]), np.float32)
    if var.init == "zeros":
        return np.zeros(var.shape, np.float32)
    if var.init == "ones":
        return np.ones(var.shape, np.float32)
    receptive = math.prod(var.shape[:-2]) if len(var.shape) > 2 else 1
    fan_in, fan_out = var.shape[-2] * receptive, var.shape[-1] * receptive
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, var.shape).astype(np.float32)


# --------------------------------------------------------------------------
# Helpers

# Largest size, stride, unit count or padding a layer config may declare: anything larger
# is a damaged or hostile file, not a convnet (a 100,000-pixel padding once crashed XLA).
MAX_DIM = 1 << 16


def _int(v, layer, what, minimum: int = 1, maximum: int = MAX_DIM) -> int:
    """A whole number from a config, in ``[minimum, maximum]``, or an error naming the layer."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise InvalidLayerError(f"layer {layer!r}: {what} {v!r} is not a whole number; the model file is "
                                "damaged or was not written by Keras")
    v = int(v)
    if not minimum <= v <= maximum:
        raise InvalidLayerError(f"layer {layer!r}: {what} {v} is out of range ({minimum}..{maximum}); the model "
                                "file is damaged or was not written by Keras")
    return v


def _pair(v, layer, what, minimum: int = 1) -> tuple[int, int]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = (v, v)
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise InvalidLayerError(f"layer {layer!r}: {what} {v!r} is not a pair of whole numbers")
    return (_int(v[0], layer, what, minimum), _int(v[1], layer, what, minimum))


def _channels_last(cfg, layer, cls):
    fmt = cfg.get("data_format") or "channels_last"
    if fmt != "channels_last":
        raise UnsupportedLayerError(
            f"layer {layer!r} ({cls}) uses data_format={fmt!r}; convlens supports channels_last "
            "(NHWC) models only: rebuild the model with channels_last")


def _padding(cfg, layer, cls):
    p = str(cfg.get("padding", "valid")).lower()
    if p not in ("same", "valid"):
        raise UnsupportedLayerError(f"layer {layer!r} ({cls}) uses padding={p!r}; supported: same, valid")
    return p.upper()


# How convolutions are computed. ``native``: XLA's convolution throughout. ``shifted``:
# grouped convolutions (depthwise ones included) as one strided slice of the padded input
# per kernel tap, multiplied and summed (an einsum over a group's channels when groups have
# several). ``im2col``: as ``shifted``, and the gradient of a convolution with at most
# `IM2COL_MAX_CHANNELS` input channels (a network's first) taken through its im2col form,
# the taps' slices concatenated and one matmul; its forward pass stays XLA's, which was
# faster on every first-layer shape measured. The numbers agree to float32 rounding; the
# speed does not: XLA:CPU lowers a grouped convolution to a loop that MobileNetV2's forward
# pass spends most of its time in (benchmarks/layers.py). The executor measures the
# lowerings per program (`lowering`), remembers the choice and lets ``CONVLENS_LOWERING``
# override it; elsewhere `DEFAULT_LOWERING`.
LOWERINGS = ("shifted", "im2col", "native")
IM2COL_MAX_CHANNELS = 4
DEFAULT_LOWERING = "shifted"
_LOWERING = contextvars.ContextVar("convlens_lowering", default=None)


def current_lowering() -> str:
    """The lowering of grouped convolutions traced now: the `lowering` context's, else
    ``CONVLENS_LOWERING`` (when not ``auto``), else `DEFAULT_LOWERING`."""
    name = _LOWERING.get()
    if name is None:
        env = os.environ.get("CONVLENS_LOWERING", "auto").strip().lower() or "auto"
        name = DEFAULT_LOWERING if env == "auto" else env
    if name not in LOWERINGS:
        raise InvalidLayerError(f"CONVLENS_LOWERING={name!r}: choose auto or {', '.join(LOWERINGS)}")
    return name


@contextlib.contextmanager
def lowering(name: str):
    """Traces grouped convolutions with lowering ``name`` (one of `LOWERINGS`) inside the
    block. A trace-time choice: a function jitted outside keeps the lowering it was traced
    with, so use it around the trace (the executor jits one function per lowering)."""
    if name not in LOWERINGS:
        raise InvalidLayerError(f"lowering {name!r}: choose one of {', '.join(LOWERINGS)}")
    token = _LOWERING.set(name)
    try:
        yield
    finally:
        _LOWERING.reset(token)


def _conv(x, k, strides, padding, dilation, groups=1):
    low = current_lowering()
    if groups > 1 and low != "native":
        return grouped_conv_shifted(x, k, strides, padding, dilation, groups)
    if groups == 1 and low == "im2col" and x.shape[-1] <= IM2COL_MAX_CHANNELS:
        pads = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        return conv_im2col_grad(x, k, tuple(strides), pads, tuple(dilation))
    return _native_conv(x, k, strides, padding, dilation, groups)


def _native_conv(x, k, strides, padding, dilation, groups=1):
    return lax.conv_general_dilated(
        x, k, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        )


def _taps(x, kh, kw, strides, padding, dilation):
    """The padded ``x [B, H, W, C]``'s strided slice per kernel tap, row-major:
    ``kh * kw`` arrays ``[B, OH, OW, C]``."""
    b, h, w, c = x.shape
    (sh, sw), (dh, dw) = strides, dilation
    pads = lax.padtype_to_pads((h, w), ((kh - 1) * dh + 1, (kw - 1) * dw + 1), (sh, sw), padding) \
        if isinstance(padding, str) else tuple(padding)
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    hp, wp = x.shape[1:3]
    oh, ow = (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1
    return [lax.slice(x, (0, i * dh, j * dw, 0), (b, i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c),
                      (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def conv_im2col(x, k, strides, padding, dilation):
    """A convolution ``x [B, H, W, Cin]`` by ``k [kh, kw, Cin, Cout]`` as im2col: the
    taps' slices concatenated to ``[B, OH, OW, kh * kw * Cin]`` and one matmul, accumulated
    in float32. Returns ``[B, OH, OW, Cout]``."""
    kh, kw, cin, cout = k.shape
    cols = jnp.concatenate(_taps(x, kh, kw, strides, padding, dilation), axis=-1)
    acc_t = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.einsum("bhwk,ko->bhwo", cols, k.reshape(kh * kw * cin, cout), preferred_element_type=acc_t)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_im2col_grad(x, k, strides, padding, dilation):
    """XLA's convolution forward, `conv_im2col`'s gradient backward (with respect to both
    ``x`` and ``k``): for few input channels XLA:CPU's input gradient, a transposed
    convolution with ``Cin`` outputs, ran up to 1.4x slower than a matmul and the slices'
    scatter (benchmarks/layers.py)."""
    return _native_conv(x, k, strides, padding, dilation)


def _im2col_fwd(x, k, strides, padding, dilation):
    return _native_conv(x, k, strides, padding, dilation), (x, k)


def _im2col_bwd(strides, padding, dilation, res, g):
    x, k = res
    return jax.vjp(lambda x, k: conv_im2col(x, k, strides, padding, dilation), x, k)[1](g)


conv_im2col_grad.defvjp(_im2col_fwd, _im2col_bwd)


def grouped_conv_shifted(x, k, strides, padding, dilation, groups):
    """A grouped convolution ``x [B, H, W, Cin]``, ``k [kh, kw, Cin / groups, Cout]`` (the
    layout `lax.conv_general_dilated` takes with ``feature_group_count=groups``) as one
    strided slice of the padded input per tap: ``sum_ij slice(x, i, j) * k[i, j]``
    (depthwise), or an einsum over each group's channels per tap. ``padding``: "SAME",
    "VALID" or explicit ``((lo, hi), (lo, hi))``. Returns ``[B, OH, OW, Cout]``."""
    kh, kw, cg, cout = k.shape
    m = cout // groups  # output channels per group
    # Accumulate in float32 whatever the input's type (bfloat16 under --precision fast), as
    # the native convolution does, and return the input's type.
    acc_t = jnp.promote_types(x.dtype, jnp.float32)
    if cg == 1:  # depthwise: output channel c*m + j reads input channel c
        if m > 1:
            x = jnp.repeat(x, m, axis=-1)
        k = k.reshape(kh * kw, cout)
    else:
        k = k.reshape(kh * kw, cg, groups, m)
    acc = None
    for t, patch in enumerate(_taps(x, kh, kw, tuple(strides), padding, tuple(dilation))):
        b, oh, ow, _ = patch.shape
        if cg == 1:
            term = patch.astype(acc_t) * k[t].astype(acc_t)
        else:
            term = jnp.einsum("bhwgc,cgm->bhwgm", patch.reshape(b, oh, ow, groups, cg), k[t],
                              preferred_element_type=acc_t).reshape(b, oh, ow, cout)
        acc = term if acc is None else acc + term
    return acc.astype(x.dtype)


def depthwise_conv(x, k, strides=(1, 1), padding="SAME", dilation=(1, 1)):
    """Depthwise convolution of ``x [B, H, W, C]`` with ``k [kh, kw, C, m]`` (Keras's
    DepthwiseConv2D layout) in the current `lowering`: ``[B, OH, OW, C * m]``."""
    kh, kw, cin, m = k.shape
    return _conv(x, k.reshape(kh, kw, 1, cin * m), strides, padding, dilation, cin)


def _axis_list(axis, layer, cls) -> tuple[int, ...]:
    if isinstance(axis, int):
        return (axis,)
    if axis is None:
        return ()
    return tuple(int(a) for a in axis)


# What kind of computation a layer class is, for code that must reason about a graph
# (default layers, CAM's structure, incremental occlusion, FLOP counts) without naming
# Keras classes: conv, dense, pool (windowed), global_pool, flatten, reshape, norm,
# activation, merge, pad, crop, scale, identity (only acts while training), container
# (a nested model's output), input.
KINDS = ("input", "conv", "dense", "pool", "global_pool", "flatten", "reshape", "norm", "activation", "merge",
         "pad", "crop", "scale", "identity", "container")
# Kinds that act on every position independently with the same spatial map out as in.
POINTWISE_KINDS = ("norm", "activation", "scale", "identity", "container")


@dataclasses.dataclass(frozen=True)
class LayerType:
    """How convlens computes one Keras layer class.

    Attributes:
      parse, variables, apply: see the module docstring.
      kind: one of `KINDS`.
      n_inputs: inputs the layer takes (``None``: any number >= 1).
      activation_key: the config key holding a fused activation.
      window: ``cfg -> (kernel (kh, kw), strides, padding, dilation)`` for windowed layers.
      flops: ``(cfg, in_shapes, out_shape) -> multiply-adds x 2`` of one call (per batch).
      border: how a windowed layer treats its SAME padding: ``zeros`` (convolutions),
        ``-inf`` (max pooling) or ``count`` (average pooling divides by the real pixels).
    """

    parse: Callable[[dict, str], dict]
    variables: Callable[[dict, Sequence[tuple]], list[Var]]
    apply: Callable[..., Array]
    n_inputs: int | None = 1  # None: any number >= 1
    activation_key: str | None = None  # cfg key holding a fused activation
    kind: str = "activation"
    window: Callable[[dict], tuple] | None = None
    flops: Callable[[dict, Sequence[tuple], tuple], int] | None = None
    border: str = "zeros"

    @property
    def pointwise(self) -> bool:
        return self.kind in POINTWISE_KINDS


def _no_vars(cfg, shapes):
    return []


def _act(cfg, x, logits, relu=jax.nn.relu):
    """The layer's activation; ``relu`` stands in for ReLU (guided backprop swaps it)."""
    name = cfg["activation"]
    if logits and name in SQUASHING:
        return x
    if name == "relu":
        return relu(x)
    if name == "relu6":
        return jnp.minimum(relu(x), 6.0)
    return ACTIVATIONS[name](x)


# --------------------------------------------------------------------------
# Layer types

def _parse_conv(cfg, name):
    _channels_last(cfg, name, "Conv2D")
    return dict(filters=_int(cfg.get("filters"), name, "filters"), kernel_size=_pair(cfg["kernel_size"], name, "kernel_size"),
                strides=_pair(cfg.get("strides", 1), name, "strides"), padding=_padding(cfg, name, "Conv2D"),
                dilation=_pair(cfg.get("dilation_rate", 1), name, "dilation_rate"),
                groups=_int(cfg.get("groups", 1) or 1, name, "groups"), use_bias=bool(cfg.get("use_bias", True)),
                activation=parse_activation(cfg.get("activation"), name))


def _vars_conv(cfg, shapes):
    cin = shapes[0][-1]
    if cin % cfg["groups"]:
        raise UnsupportedLayerError(f"Conv2D with groups={cfg['groups']} needs input channels ({cin}) divisible by groups")
    v = [Var("kernel", (*cfg["kernel_size"], cin // cfg["groups"], cfg["filters"]), "glorot")]
    if cfg["use_bias"]:
        v.append(Var("bias", (cfg["filters"],), "zeros"))
    return v


def _apply_conv(cfg, v, xs, logits=False, relu=jax.nn.relu):
    y = _conv(xs[0], v["kernel"], cfg["strides"], cfg["padding"], cfg["dilation"], cfg["groups"])
    if cfg["use_bias"]:
        y = y + v["bias"]
    return _act(cfg, y, logits, relu)


def _parse_depthwise(cfg, name):
    _channels_last(cfg, name, "DepthwiseConv2D")
    return dict(kernel_size=_pair(cfg["kernel_size"], name, "kernel_size"),
                strides=_pair(cfg.get("strides", 1), name, "strides"),
                padding=_padding(cfg, name, "DepthwiseConv2D"),
                dilation=_pair(cfg.get("dilation_rate", 1), name, "dilation_rate"),
                depth_multiplier=_int(cfg.get("depth_multiplier", 1), name, "depth_multiplier"), use_bias=bool(cfg.get("use_bias", True)),
                activation=parse_activation(cfg.get("activation"), name))


def _vars_depthwise(cfg, shapes):
    cin = shapes[0][-1]
    v = [Var("kernel", (*cfg["kernel_size"], cin, cfg["depth_multiplier"]), "glorot")]
    if cfg["use_bias"]:
        v.append(Var("bias", (cin * cfg["depth_multiplier"],), "zeros"))
    return v


def _depthwise(x, k, cfg):
    return depthwise_conv(x, k, cfg["strides"], cfg["padding"], cfg["dilation"])


def _apply_depthwise(cfg, v, xs, logits=False, relu=jax.nn.relu):
    y = _depthwise(xs[0], v["kernel"], cfg)
    if cfg["use_bias"]:
        y = y + v["bias"]
    return _act(cfg, y, logits, relu)


def _parse_separable(cfg, name):
    out = _parse_depthwise(cfg, name)
    out["filters"] = _int(cfg.get("filters"), name, "filters")
    return out


def _vars_separable(cfg, shapes):
    cin = shapes[0][-1]
    m = cfg["depth_multiplier"]
    v = [Var("depthwise_kernel", (*cfg["kernel_size"], cin, m), "glorot"),
         Var("pointwise_kernel", (1, 1, cin * m, cfg["filters"]), "glorot")]
    if cfg["use_bias"]:
        v.append(Var("bias", (cfg["filters"],), "zeros"))
    return v


def _apply_separable(cfg, v, xs, logits=False, relu=jax.nn.relu):
    y = _depthwise(xs[0], v["depthwise_kernel"], cfg)
    y = _conv(y, v["pointwise_kernel"], (1, 1), "VALID", (1, 1))
    if cfg["use_bias"]:
        y = y + v["bias"]
    return _act(cfg, y, logits, relu)


def _parse_dense(cfg, name):
    return dict(units=_int(cfg.get("units"), name, "units", maximum=1 << 20), use_bias=bool(cfg.get("use_bias", True)),
                activation=parse_activation(cfg.get("activation"), name))


def _vars_dense(cfg, shapes):
    v = [Var("kernel", (shapes[0][-1], cfg["units"]), "glorot")]
    if cfg["use_bias"]:
        v.append(Var("bias", (cfg["units"],), "zeros"))
    return v


def _apply_dense(cfg, v, xs, logits=False, relu=jax.nn.relu):
    y = jnp.matmul(xs[0], v["kernel"])
    if cfg["use_bias"]:
        y = y + v["bias"]
    return _act(cfg, y, logits, relu)


def _parse_pool(cls):
    def parse(cfg, name):
        _channels_last(cfg, name, cls)
        size = _pair(cfg.get("pool_size", 2), name, "pool_size")
        strides = cfg.get("strides")
        return dict(pool_size=size, strides=size if strides is None else _pair(strides, name, "strides"),
                    padding=_padding(cfg, name, cls))
    return parse


def _window(cfg):
    return (1, *cfg["pool_size"], 1), (1, *cfg["strides"], 1)


def _pool_views(x, pool_size, strides, padding):
    """The window's strided views of ``x [B, H, W, C]``, stacked: ``[kh * kw, B, Ho, Wo, C]``."""
    (kh, kw), (sh, sw) = pool_size, strides
    pads = lax.padtype_to_pads(x.shape[1:3], (kh, kw), (sh, sw), padding)
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return jnp.stack([x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
                      for i in range(kh) for j in range(kw)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, pool_size, strides, padding):
    """Max pooling of ``x [B, H, W, C]``: ``lax.reduce_window`` forward, and a one-hot
    select over the window's strided views backward.

    XLA's own gradient (select-and-scatter) is ~7x slower on XLA:CPU (VGG16's first pool:
    460 ms vs 65 ms for a batch of 8) and dominates backward passes through pooled
    convnets; the views are not used forward because stacking them defeats XLA's
    fusions (the small convnet ran 3.7x slower with XLA's default flags). The gradient
    goes to the first maximum of a window, as TF's and XLA's do, so pooled gradients
    match Keras even where values tie."""
    (kh, kw), (sh, sw) = pool_size, strides
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, kh, kw, 1), (1, sh, sw, 1), padding)


def _max_pool_fwd(x, pool_size, strides, padding):
    return max_pool(x, pool_size, strides, padding), x


def _max_pool_bwd(pool_size, strides, padding, x, g):
    views, pull = jax.vjp(lambda v: _pool_views(v, pool_size, strides, padding), x)
    hot = jax.nn.one_hot(jnp.argmax(views, axis=0), views.shape[0], axis=0, dtype=g.dtype)
    return pull(hot * g[None])


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _apply_maxpool(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return max_pool(xs[0], tuple(cfg["pool_size"]), tuple(cfg["strides"]), cfg["padding"])


def _apply_avgpool(cfg, v, xs, logits=False, relu=jax.nn.relu):
    win, st = _window(cfg)
    x = xs[0]
    total = lax.reduce_window(x, 0.0, lax.add, win, st, cfg["padding"])
    if cfg["padding"] == "VALID":
        return total / math.prod(cfg["pool_size"])
    # Keras (like TF) divides by the number of real pixels under the window at the borders.
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, win, st, cfg["padding"])
    return total / count


def _parse_global_pool(cls):
    def parse(cfg, name):
        _channels_last(cfg, name, cls)
        return dict(keepdims=bool(cfg.get("keepdims", False)))
    return parse


def _apply_gap(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return jnp.mean(xs[0], axis=(1, 2), keepdims=cfg["keepdims"])


def _apply_gmp(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return jnp.max(xs[0], axis=(1, 2), keepdims=cfg["keepdims"])


def _channel_axis_only(cfg, name, cls):
    if _axis_list(cfg.get("axis", -1), name, cls) not in ((-1,), (3,)):
        raise UnsupportedLayerError(
            f"layer {name!r} ({cls}) normalises axis {cfg.get('axis')!r}; "
            "convlens supports the channel axis (-1) of NHWC tensors only")


def _parse_batchnorm(cfg, name):
    _channel_axis_only(cfg, name, "BatchNormalization")
    if cfg.get("renorm"):
        raise UnsupportedLayerError(f"layer {name!r} (BatchNormalization) uses renorm, which convlens does not support")
    return dict(epsilon=float(cfg.get("epsilon", 1e-3)), center=bool(cfg.get("center", True)),
                scale=bool(cfg.get("scale", True)))


def _vars_affine(cfg, shapes):
    """A normalisation's optional per-channel scale and offset."""
    c = (shapes[0][-1],)
    return ([Var("gamma", c, "ones")] if cfg["scale"] else []) + ([Var("beta", c, "zeros")] if cfg["center"] else [])


def _vars_batchnorm(cfg, shapes):
    c = (shapes[0][-1],)
    return _vars_affine(cfg, shapes) + [Var("moving_mean", c, "zeros", False), Var("moving_variance", c, "ones", False)]


def _apply_batchnorm(cfg, v, xs, logits=False, relu=jax.nn.relu):
    # Keras's own arithmetic (its JAX backend's batch_normalization: x * inv + res, not
    # (x - mean) * inv + beta): the rounding then matches Keras's through deep networks.
    inv = lax.rsqrt(v["moving_variance"] + cfg["epsilon"])
    if cfg["scale"]:
        inv = inv * v["gamma"]
    res = -v["moving_mean"] * inv
    if cfg["center"]:
        res = res + v["beta"]
    return xs[0] * inv + res


def _parse_activation_layer(cfg, name):
    return dict(activation=parse_activation(cfg.get("activation"), name))


def _apply_activation_layer(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return _act(cfg, xs[0], logits, relu)


def _parse_relu(cfg, name):
    mv = cfg.get("max_value")
    return dict(max_value=None if mv is None else float(mv),
                negative_slope=float(cfg.get("negative_slope", 0.0) or 0.0),
                threshold=float(cfg.get("threshold", 0.0) or 0.0))


def _apply_relu(cfg, v, xs, logits=False, relu=jax.nn.relu):
    x = xs[0]
    t = cfg["threshold"]
    y = jnp.where(x >= t, x, cfg["negative_slope"] * (x - t)) if (t or cfg["negative_slope"]) else relu(x)
    if cfg["max_value"] is not None:
        y = jnp.minimum(y, cfg["max_value"])
    return y


def _parse_leaky(cfg, name):
    slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
    return dict(negative_slope=float(slope))


def _apply_leaky(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return jax.nn.leaky_relu(xs[0], cfg["negative_slope"])


def _parse_softmax(cfg, name):
    axes = _axis_list(cfg.get("axis", -1), name, "Softmax")
    return dict(axis=axes, activation="softmax")


def _apply_softmax(cfg, v, xs, logits=False, relu=jax.nn.relu):
    if logits:
        return xs[0]
    return jax.nn.softmax(xs[0], axis=cfg["axis"])


def _parse_nothing(cfg, name):
    return {}


def _identity(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return xs[0]


def _parse_zeropad(cfg, name):
    _channels_last(cfg, name, "ZeroPadding2D")
    p = cfg.get("padding", 1)
    if isinstance(p, int) and not isinstance(p, bool):
        p = ((p, p), (p, p))
    elif isinstance(p, (list, tuple)) and all(isinstance(a, int) and not isinstance(a, bool) for a in p):
        p = ((p[0], p[0]), (p[1], p[1])) if len(p) == 2 else p
    if not isinstance(p, (list, tuple)) or len(p) != 2:
        raise InvalidLayerError(f"layer {name!r}: padding {p!r} is not n, (h, w) or ((top, bottom), (left, right))")
    return dict(padding=tuple(_pair(a, name, "padding", minimum=0) for a in p))


def _apply_zeropad(cfg, v, xs, logits=False, relu=jax.nn.relu):
    (t, b), (l, r) = cfg["padding"]
    return jnp.pad(xs[0], ((0, 0), (t, b), (l, r), (0, 0)))


def _parse_crop(cfg, name):
    _channels_last(cfg, name, "Cropping2D")
    return {"cropping": _parse_zeropad({"padding": cfg.get("cropping", 0)}, name)["padding"]}


def _apply_crop(cfg, v, xs, logits=False, relu=jax.nn.relu):
    (t, b), (l, r) = cfg["cropping"]
    x = xs[0]
    return x[:, t:x.shape[1] - b, l:x.shape[2] - r, :]


def _parse_rescaling(cfg, name):
    def f(a):
        return tuple(float(b) for b in a) if isinstance(a, (list, tuple)) else float(a)
    return dict(scale=f(cfg.get("scale", 1.0)), offset=f(cfg.get("offset", 0.0)))


def _apply_rescaling(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return xs[0] * jnp.asarray(cfg["scale"], jnp.float32) + jnp.asarray(cfg["offset"], jnp.float32)


def _parse_normalization(cfg, name):
    axes = _axis_list(cfg.get("axis", -1), name, "Normalization")
    if axes not in ((-1,), (3,)):
        raise UnsupportedLayerError(
            f"layer {name!r} (Normalization) normalises axis {cfg.get('axis')!r}; convlens supports the channel axis only")
    mean, var = cfg.get("mean"), cfg.get("variance")

    def f(a):
        return None if a is None else tuple(float(b) for b in (a if isinstance(a, (list, tuple)) else [a]))
    return dict(mean=f(mean), variance=f(var), invert=bool(cfg.get("invert", False)))


def _vars_normalization(cfg, shapes):
    if cfg["mean"] is not None:
        return []  # statistics live in the config, not in variables
    c = (shapes[0][-1],)
    return [Var("mean", c, "zeros", False), Var("variance", c, "ones", False), Var("count", (), "zeros", False)]


def _apply_normalization(cfg, v, xs, logits=False, relu=jax.nn.relu):
    if cfg["mean"] is not None:
        mean, var = jnp.asarray(cfg["mean"]), jnp.asarray(cfg["variance"])
    else:
        mean, var = v["mean"], v["variance"]
    # Same floor as Keras: a zero-variance channel is divided by epsilon, not zero.
    std = jnp.maximum(jnp.sqrt(var), 1e-7)
    if cfg["invert"]:
        return xs[0] * std + mean
    return (xs[0] - mean) / std


def _parse_layernorm(cfg, name):
    _channel_axis_only(cfg, name, "LayerNormalization")
    if cfg.get("rms_scaling"):
        raise UnsupportedLayerError(f"layer {name!r} (LayerNormalization) uses rms_scaling, which convlens does "
                                    "not support")
    eps = float(cfg.get("epsilon", 1e-3))
    if not math.isfinite(eps) or eps < 0:
        raise InvalidLayerError(f"layer {name!r}: epsilon {eps} must be a finite number >= 0")
    return dict(epsilon=eps, center=bool(cfg.get("center", True)), scale=bool(cfg.get("scale", True)))


def _apply_layernorm(cfg, v, xs, logits=False, relu=jax.nn.relu):
    # Keras's own arithmetic (keras.ops.layer_normalization), so the numbers match it.
    x = xs[0]
    mean = jnp.mean(x, axis=-1, keepdims=True)
    inv = lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + cfg["epsilon"])
    if cfg["scale"]:
        inv = inv * v["gamma"]
    res = -mean * inv
    if cfg["center"]:
        res = res + v["beta"]
    return x * inv + res


# Layer classes Keras itself defines inside keras.applications (recognised by their module,
# never run from the file: their arithmetic is written here).

def _parse_layer_scale(cfg, name):
    init = float(cfg.get("init_values", 1e-6))
    return dict(init_values=init, projection_dim=_int(cfg.get("projection_dim"), name, "projection_dim",
                                                      maximum=1 << 20))


def _vars_layer_scale(cfg, shapes):
    return [Var("gamma", (cfg["projection_dim"],), f"constant:{cfg['init_values']!r}")]


def _apply_layer_scale(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return xs[0] * v["gamma"]


def _parse_custom_scale(cfg, name):
    scale = cfg.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidLayerError(f"layer {name!r} (CustomScaleLayer): scale {scale!r} is not a number")
    return dict(scale=float(scale))


def _apply_custom_scale(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return xs[0] + xs[1] * cfg["scale"]


# Keras 3 records arithmetic on symbolic tensors (``x + 3.0`` in MobileNetV3's hard
# sigmoid) as operation nodes of ``keras.src.ops.numpy``; their constant arguments are in
# the config. ``template`` lists each argument: ("t",) for the next input tensor, ("c", v)
# for a constant.
OPS: dict[str, Callable] = {"Add": jnp.add, "Subtract": jnp.subtract, "Multiply": jnp.multiply,
                            "Divide": jnp.divide, "TrueDivide": jnp.true_divide, "Maximum": jnp.maximum,
                            "Minimum": jnp.minimum, "Power": jnp.power}
OP_PREFIX = "op."


def _apply_op(fn):
    def apply(cfg, v, xs, logits=False, relu=jax.nn.relu):
        it = iter(xs)
        args = [next(it) if a[0] == "t" else jnp.asarray(a[1], jnp.float32) for a in cfg["template"]]
        return fn(*args)
    return apply


def _parse_reshape(cfg, name):
    shape = cfg.get("target_shape")
    if not isinstance(shape, (list, tuple)) or not shape:
        raise InvalidLayerError(f"layer {name!r}: target_shape {shape!r} is not a list of sizes")
    dims = tuple(_int(a, name, "target_shape", minimum=-1, maximum=1 << 24) for a in shape)
    if 0 in dims or dims.count(-1) > 1:
        raise InvalidLayerError(f"layer {name!r}: target_shape {list(dims)} has a zero or more than one -1")
    return dict(target_shape=dims)


def _apply_reshape(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return xs[0].reshape(xs[0].shape[0], *cfg["target_shape"])


def _apply_flatten(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return xs[0].reshape(xs[0].shape[0], -1)


def _merge(fn):
    def apply(cfg, v, xs, logits=False, relu=jax.nn.relu):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return apply


def _apply_average(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return _merge(jnp.add)(cfg, v, xs) / len(xs)


def _apply_subtract(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return xs[0] - xs[1]


def _parse_concat(cfg, name):
    return dict(axis=_int(cfg.get("axis", -1), name, "axis", minimum=-4, maximum=3))


def _apply_concat(cfg, v, xs, logits=False, relu=jax.nn.relu):
    return jnp.concatenate(xs, axis=cfg["axis"])


def _parse_input(cfg, name):
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    if shape is None and cfg.get("input_shape") is not None:
        shape = [None, *cfg["input_shape"]]
    if shape is not None and (not isinstance(shape, (list, tuple)) or not shape):
        raise InvalidLayerError(f"input layer {name!r}: shape {shape!r} is not a list of sizes")
    return dict(shape=None if shape is None else tuple(None if s is None else _int(s, name, "input size")
                                                      for s in shape[1:]))


def _conv_window(cfg):
    return tuple(cfg["kernel_size"]), tuple(cfg["strides"]), cfg["padding"], tuple(cfg["dilation"])


def _pool_window(cfg):
    return tuple(cfg["pool_size"]), tuple(cfg["strides"]), cfg["padding"], (1, 1)


def _flops_conv(cfg, ins, out):
    kh, kw = cfg["kernel_size"]
    return 2 * math.prod(out[:3]) * kh * kw * ins[0][-1] * out[-1] // cfg["groups"]


def _flops_depthwise(cfg, ins, out):
    kh, kw = cfg["kernel_size"]
    return 2 * math.prod(out[:3]) * kh * kw * out[-1]


def _flops_separable(cfg, ins, out):
    kh, kw = cfg["kernel_size"]
    mid = ins[0][-1] * cfg["depth_multiplier"]
    return 2 * math.prod(out[:3]) * (kh * kw * mid + mid * out[-1])


def _flops_dense(cfg, ins, out):
    return 2 * math.prod(ins[0][:-1]) * ins[0][-1] * out[-1]


def _type(parse, variables, apply, kind, **kw):
    return LayerType(parse, variables, apply, kind=kind, **kw)


_IDENTITY = dict(parse=_parse_nothing, variables=_no_vars, apply=_identity, kind="identity")

LAYER_TYPES: dict[str, LayerType] = {
    "InputLayer": _type(_parse_input, _no_vars, _identity, "input", n_inputs=0),
    "Conv2D": _type(_parse_conv, _vars_conv, _apply_conv, "conv", activation_key="activation", window=_conv_window,
                    flops=_flops_conv),
    "DepthwiseConv2D": _type(_parse_depthwise, _vars_depthwise, _apply_depthwise, "conv", activation_key="activation",
                             window=_conv_window, flops=_flops_depthwise),
    "SeparableConv2D": _type(_parse_separable, _vars_separable, _apply_separable, "conv", activation_key="activation",
                             window=_conv_window, flops=_flops_separable),
    "Dense": _type(_parse_dense, _vars_dense, _apply_dense, "dense", activation_key="activation", flops=_flops_dense),
    "MaxPooling2D": _type(_parse_pool("MaxPooling2D"), _no_vars, _apply_maxpool, "pool", window=_pool_window,
                          border="-inf"),
    "AveragePooling2D": _type(_parse_pool("AveragePooling2D"), _no_vars, _apply_avgpool, "pool", window=_pool_window,
                              border="count"),
    "GlobalAveragePooling2D": _type(_parse_global_pool("GlobalAveragePooling2D"), _no_vars, _apply_gap,
                                    "global_pool"),
    "GlobalMaxPooling2D": _type(_parse_global_pool("GlobalMaxPooling2D"), _no_vars, _apply_gmp, "global_pool"),
    "Flatten": _type(lambda c, n: (_channels_last(c, n, "Flatten"), {})[1], _no_vars, _apply_flatten, "flatten"),
    "Reshape": _type(_parse_reshape, _no_vars, _apply_reshape, "reshape"),
    "BatchNormalization": _type(_parse_batchnorm, _vars_batchnorm, _apply_batchnorm, "norm"),
    "Activation": _type(_parse_activation_layer, _no_vars, _apply_activation_layer, "activation",
                        activation_key="activation"),
    "ReLU": _type(_parse_relu, _no_vars, _apply_relu, "activation"),
    "LeakyReLU": _type(_parse_leaky, _no_vars, _apply_leaky, "activation"),
    "Softmax": _type(_parse_softmax, _no_vars, _apply_softmax, "activation", activation_key="activation"),
    "Add": _type(_parse_nothing, _no_vars, _merge(jnp.add), "merge", n_inputs=None),
    "Subtract": _type(_parse_nothing, _no_vars, _apply_subtract, "merge", n_inputs=2),
    "Multiply": _type(_parse_nothing, _no_vars, _merge(jnp.multiply), "merge", n_inputs=None),
    "Average": _type(_parse_nothing, _no_vars, _apply_average, "merge", n_inputs=None),
    "Maximum": _type(_parse_nothing, _no_vars, _merge(jnp.maximum), "merge", n_inputs=None),
    "Minimum": _type(_parse_nothing, _no_vars, _merge(jnp.minimum), "merge", n_inputs=None),
    "Concatenate": _type(_parse_concat, _no_vars, _apply_concat, "merge", n_inputs=None),
    "ZeroPadding2D": _type(_parse_zeropad, _no_vars, _apply_zeropad, "pad"),
    "Cropping2D": _type(_parse_crop, _no_vars, _apply_crop, "crop"),
    "Rescaling": _type(_parse_rescaling, _no_vars, _apply_rescaling, "scale"),
    "Normalization": _type(_parse_normalization, _vars_normalization, _apply_normalization, "norm"),
    # Layers that only act while training are the identity at inference.
    "Dropout": LayerType(**_IDENTITY),
    "SpatialDropout2D": LayerType(**_IDENTITY),
    "GaussianNoise": LayerType(**_IDENTITY),
    "GaussianDropout": LayerType(**_IDENTITY),
    "AlphaDropout": LayerType(**_IDENTITY),
    "ActivityRegularization": LayerType(**_IDENTITY),
    "LayerNormalization": _type(_parse_layernorm, _vars_affine, _apply_layernorm, "norm"),
    "LayerScale": _type(_parse_layer_scale, _vars_layer_scale, _apply_layer_scale, "scale"),
    "CustomScaleLayer": _type(_parse_custom_scale, _no_vars, _apply_custom_scale, "merge", n_inputs=2),
    "StochasticDepth": LayerType(**_IDENTITY),
    **{OP_PREFIX + name: _type(_parse_nothing, _no_vars, _apply_op(fn), "merge", n_inputs=None)
       for name, fn in OPS.items()},
    # A nested model appears as an identity node on its own output (see keras_graph).
    "Sequential": _type(_parse_nothing, _no_vars, _identity, "container"),
    "Functional": _type(_parse_nothing, _no_vars, _identity, "container"),
}
assert all(t.kind in KINDS for t in LAYER_TYPES.values())

# Layer classes defined inside keras.applications, accepted only from their own module.
KERAS_APP_LAYERS = {"LayerScale": "keras.src.applications.convnext",
                    "StochasticDepth": "keras.src.applications.convnext",
                    "CustomScaleLayer": "keras.src.applications.inception_resnet_v2"}
KERAS_APP_OPTIONS = {"LayerScale": {"init_values", "projection_dim"}, "StochasticDepth": {"drop_path_rate"},
                     "CustomScaleLayer": {"scale"}}

# Classes Keras refuses to deserialise safely and convlens refuses outright.
CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda")
