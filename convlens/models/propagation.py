"""Layer-wise relevance propagation as rules on the backward pass.

A rule replaces one layer's vector-Jacobian product: given the relevance ``R`` of the
layer's output (the cotangent arriving there), it returns the relevance of the layer's
inputs. The forward values are untouched, so a model runs with rules exactly as without,
and the relevance of any layer's output is the gradient with respect to a zero
perturbation added there (`Model.apply`'s ``perturb``), as for every gradient method.

Rules follow zennit's (``zennit.rules``, 0.5) definitions, term by term, so that a
composite here equals the same composite there on a twin network:

- ``epsilon`` (``z`` with epsilon 0): ``R_i = x_i * sum_j w_ij R_j / stab(z_j)``;
- ``zplus``: the positive contributions (``x+ w+`` and ``x- w-``, with the positive bias);
- ``alphabeta``: ``alpha`` times the positive, minus ``beta`` times the negative share;
- ``gamma``: positive weights raised by ``gamma`` (zennit's generalised form);
- ``flat`` and ``wsquare``: the input taken as ones and the weights as ones or squared;
- ``zbox``: the first layer of an input bounded to ``[low, high]`` per channel;
- ``norm``: the ``z`` rule of a layer without weights (sums and average pools);
- ``pass``: the relevance unchanged (activations and normalisations);
- ``gradient``: the layer's own gradient (max pooling routes relevance to the maximum,
  flattening and padding move it, concatenation splits it; all conserve it).

``stab(z) = z + stabilizer * sign(z)`` with ``sign(0) = 1``. A layer with a fused
activation (Keras's ``Conv2D(activation="relu")``) is a linear layer followed by ``pass``.

**Canonizing.** A BatchNormalization whose only input is a convolution or dense layer
with no activation (and which is that layer's only consumer) is folded into it, as
zennit's ``MergeBatchNorm`` canonizers do: the layer's kernel and bias take the
normalisation's scale and shift, and the normalisation becomes the identity. The
model's outputs agree with the unfolded model's to float32 rounding.

**Merges.** ``Add``, ``Subtract`` and ``Average`` take ``norm`` (each input's share of
the sum, zennit's rule for its ``Sum`` module); ``Concatenate`` and ``Maximum`` the
gradient; ``Multiply`` (a squeeze-excitation gate) gives all the relevance to the input
of the output's full shape, treating the broadcast gate as a fixed weight (the gate
receives none).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from convlens.errors import ConvlensError
from convlens.models.layers import _act as activation

Array = jax.Array

RULES = ("epsilon", "zplus", "alphabeta", "gamma", "flat", "wsquare", "zbox", "norm", "pass", "gradient")
# DeepLIFT's rescale rule (not an LRP rule: it needs the baseline's activations, see
# `deeplift_rules`).
RESCALE = "rescale"
# Rules that modify a layer's weights (they need a layer with a kernel).
WEIGHTED_RULES = ("epsilon", "zplus", "alphabeta", "gamma", "flat", "wsquare", "zbox")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One layer's relevance rule.

    Attributes:
      name: one of `RULES`.
      epsilon: the ``epsilon`` rule's epsilon (also its stabilizer).
      stabilizer: added to denominators by every other rule (with their sign).
      alpha, beta: the ``alphabeta`` rule's weights (``alpha - beta = 1``).
      gamma: the ``gamma`` rule's weight of the positive parameters.
      low, high: the ``zbox`` rule's bounds of the layer's input, per channel (floats
        or arrays ``[C]``: a rule map holding arrays is built inside the computation).
    """

    name: str
    epsilon: float = 1e-6
    stabilizer: float = 1e-6
    alpha: float = 2.0
    beta: float = 1.0
    gamma: float = 0.25
    low: Any = ()
    high: Any = ()
    bias: Any = None  # a folded normalisation's shift, for a layer without a bias of its own
    # The layer's inputs are >= 0 by construction (after a ReLU): the terms of negative
    # inputs are exactly zero and are not computed.
    nonneg: bool = False

    def __post_init__(self):
        if self.name not in RULES and self.name != RESCALE:
            raise ConvlensError(f"unknown relevance rule {self.name!r}: choose one of {', '.join(RULES)}")
        if self.name == "alphabeta" and (self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-9):
            raise ConvlensError(f"the alphabeta rule needs alpha, beta >= 0 and alpha - beta = 1 "
                                f"(got alpha={self.alpha}, beta={self.beta})")


# A rule map: ``((layer name, Rule), ...)``, hashable so compiled functions can key on it.
# The rule ``identity`` is not a rule but a canonized normalisation: forward and backward
# the identity (its scale lives in the layer before).
IDENTITY = "identity"


def stabilize(z: Array, eps: float) -> Array:
    return z + eps * ((z == 0).astype(z.dtype) + jnp.sign(z))


def _pos(a):
    return jnp.maximum(a, 0)


def _neg(a):
    return jnp.minimum(a, 0)


def _params(v: Mapping[str, Array], fn, zero_bias: bool = False) -> dict[str, Array]:
    """``fn`` applied to every variable of a layer; with ``zero_bias`` the bias is zero
    (zennit's ``zero_params=['bias']``)."""
    return {k: (jnp.zeros_like(a) if zero_bias and k == "bias" else fn(a)) for k, a in v.items()}


def _basic(lin, v, xs, g, terms, mapper, reducer, z=None, nonneg=False):
    """zennit's ``BasicHook``: for each term ``(input modifier, parameter modifier)``
    the modified layer's output ``z_k`` and its pullback; ``mapper(g, [z_k])`` gives each
    term's cotangent and ``reducer(inputs, gradients)`` the input relevance. Per input of
    ``xs``. ``z``: the layer's own output, reused for the unmodified term; ``nonneg``: the
    inputs are >= 0, so terms of their negative part (zero input, zero bias) are zero."""
    ins, outs, pulls = [], [], []
    for in_mod, vk in terms:
        if nonneg and in_mod is _neg:
            ins.append(None)
            outs.append(None)
            pulls.append(None)
            continue
        xk = [in_mod(x) for x in xs]
        zk, pull = jax.vjp(lambda *a, vk=vk: lin(vk, list(a)), *xk)
        ins.append(xk)
        # The unmodified term is the forward pass's output (its recomputation is then dead).
        outs.append(z if (z is not None and in_mod is _ident and vk is v) else zk)
        pulls.append(pull)
    shape = next(o for o in outs if o is not None)
    outs = [jnp.zeros_like(shape) if o is None else o for o in outs]
    cots = mapper(g, outs)
    grads = [None if pull is None else pull(c) for pull, c in zip(pulls, cots)]
    zero = [jnp.zeros_like(x) for x in xs]
    return [reducer([zero[n] if i is None else i[n] for i in ins], [zero[n] if gr is None else gr[n] for gr in grads])
            for n in range(len(xs))]


def _ident(a):
    return a


def _ones_like(x):
    return jnp.ones_like(x)


def backward(rule: Rule, lin, v, xs, g, z=None):
    """Relevance of ``xs`` (a list of the layer's inputs) from the relevance ``g`` of the
    output ``z = lin(v, xs)`` of a linear layer, by ``rule``."""
    s = rule.stabilizer
    ident = _ident
    # Every rule's terms see the forward output and the inputs' sign.
    basic = functools.partial(_basic, z=z, nonneg=rule.nonneg)
    if rule.name in ("epsilon", "norm"):
        eps = rule.epsilon if rule.name == "epsilon" else s
        return basic(lin, v, xs, g, [(ident, v)], lambda g, z: [g / stabilize(z[0], eps)],
                      lambda i, gr: i[0] * gr[0])
    if rule.name == "zplus":
        terms = [(_pos, _params(v, _pos)), (_neg, _params(v, _neg, zero_bias=True))]
        return basic(lin, v, xs, g, terms, lambda g, z: [g / stabilize(z[0] + z[1], s)] * 2,
                      lambda i, gr: i[0] * gr[0] + i[1] * gr[1])
    if rule.name == "alphabeta":
        a, b = rule.alpha, rule.beta
        terms = [(_pos, _params(v, _pos)), (_neg, _params(v, _neg, zero_bias=True)),
                 (_pos, _params(v, _neg)), (_neg, _params(v, _pos, zero_bias=True))]
        return basic(lin, v, xs, g, terms,
                      lambda g, z: [g / stabilize(z[0] + z[1], s)] * 2 + [g / stabilize(z[2] + z[3], s)] * 2,
                      lambda i, gr: a * (i[0] * gr[0] + i[1] * gr[1]) - b * (i[2] * gr[2] + i[3] * gr[3]))
    if rule.name == "gamma":
        gm = rule.gamma
        up = lambda p: p + gm * _pos(p)
        down = lambda p: p + gm * _neg(p)
        terms = [(_pos, _params(v, up)), (_neg, _params(v, down, zero_bias=True)),
                 (_pos, _params(v, down)), (_neg, _params(v, up, zero_bias=True)), (ident, v)]

        def mapper(g, z):
            p = (z[4] > 0).astype(g.dtype) * g / stabilize(z[0] + z[1], s)
            n = (z[4] < 0).astype(g.dtype) * g / stabilize(z[2] + z[3], s)
            return [p, p, n, n, jnp.zeros_like(g)]
        return basic(lin, v, xs, g, terms, mapper, lambda i, gr: sum(i[k] * gr[k] for k in range(4)))
    if rule.name in ("flat", "wsquare"):
        mod = _ones_like if rule.name == "flat" else jnp.square
        terms = [(_ones_like, _params(v, mod, zero_bias=rule.name == "flat"))]
        return basic(lin, v, xs, g, terms, lambda g, z: [g / stabilize(z[0], s)], lambda i, gr: gr[0])
    if rule.name == "zbox":
        lo, hi = jnp.asarray(rule.low, jnp.float32), jnp.asarray(rule.high, jnp.float32)
        terms = [(ident, v), (lambda x: jnp.broadcast_to(lo, x.shape).astype(x.dtype), _params(v, _pos)),
                 (lambda x: jnp.broadcast_to(hi, x.shape).astype(x.dtype), _params(v, _neg))]
        return basic(lin, v, xs, g, terms, lambda g, z: [g / stabilize(z[0] - z[1] - z[2], s)] * 3,
                      lambda i, gr: i[0] * gr[0] - i[1] * gr[1] - i[2] * gr[2])
    raise ConvlensError(f"rule {rule.name!r} is not a rule of a linear layer")


def apply_with_rule(rule: Rule | str, node, v, xs, logits: bool, relu):
    """``node``'s output on ``xs`` (its forward values as without rules), backpropagating
    relevance by ``rule`` (see the module docstring)."""
    lt = node.layer_type
    if rule == IDENTITY:
        return xs[0]
    cfg = node.config
    if getattr(rule, "bias", None) is not None:  # a normalisation folded into a layer without bias
        v, cfg = dict(v, bias=rule.bias), dict(cfg, use_bias=True)
    if rule.name == RESCALE:
        return _deeplift_apply(node, cfg, v, xs, logits, relu, rule.epsilon)
    if rule.name == "gradient":
        return lt.apply(cfg, v, xs, logits=logits, relu=relu)
    if rule.name == "pass":
        # Activations and normalisations: forward as they are, relevance through as it is.
        return _passed(lambda xs: lt.apply(cfg, v, xs, logits=logits, relu=relu), xs)
    if node.cls == "Multiply":
        full = [i for i, x in enumerate(xs) if x.shape == jnp.broadcast_shapes(*(x.shape for x in xs))][:1]
        return _gated(lambda xs: lt.apply(cfg, v, xs), xs, full[0] if full else 0)
    key = lt.activation_key
    act_name = cfg.get(key) if key else None
    if act_name and act_name != "linear":
        # A fused activation: the linear layer with the rule, then `pass` through the activation.
        lin_cfg = dict(cfg, **{key: "linear"})
        z = _ruled(rule, lambda v, xs: lt.apply(lin_cfg, v, xs), v, xs)
        return _passed(lambda zs: _activation(cfg, zs[0], logits, relu), [z])
    return _ruled(rule, lambda v, xs: lt.apply(cfg, v, xs, logits=logits), v, xs)


def _activation(cfg, z, logits, relu):
    return activation(cfg, z, logits, relu)


def _ruled(rule, lin, v, xs):
    @jax.custom_vjp
    def f(v, xs):
        return lin(v, xs)

    def fwd(v, xs):
        z = lin(v, xs)
        return z, (v, xs, z)

    def bwd(res, g):
        v, xs, z = res
        return jax.tree.map(jnp.zeros_like, v), backward(rule, lin, v, xs, g, z)
    f.defvjp(fwd, bwd)
    return f(v, list(xs))


def _passed(fn, xs):
    @jax.custom_vjp
    def f(xs):
        return fn(xs)

    def fwd(xs):
        return fn(xs), None

    def bwd(_, g):
        return ([g],)  # one input: activations and normalisations
    f.defvjp(fwd, bwd)
    return f(list(xs))


def _gated(fn, xs, full: int):
    @jax.custom_vjp
    def f(xs):
        return fn(xs)

    def fwd(xs):
        return fn(xs), xs

    def bwd(xs, g):
        return ([g if i == full else jnp.zeros_like(x) for i, x in enumerate(xs)],)
    f.defvjp(fwd, bwd)
    return f(list(xs))


# ---------------------------------------------------------------- composites

# zennit's composites by name: the rule of convolutions, of dense layers, and of the first
# convolution / dense layer (None: no special first layer). zennit's EpsilonGammaBox
# treats only a convolution as the first layer; the Flat composites any linear layer.
COMPOSITES = {
    "epsilon_plus": ("zplus", "epsilon", None),
    "epsilon_plus_flat": ("zplus", "epsilon", "flat"),
    "epsilon_alpha2_beta1": ("alphabeta", "epsilon", None),
    "epsilon_alpha2_beta1_flat": ("alphabeta", "epsilon", "flat"),
    "epsilon_gamma_box": ("gamma", "epsilon", "zbox"),
}
# Rules of the layers without weights, by class (zennit's layer_map_base); activations,
# normalisations and rescalings not folded take `pass`, every other layer its gradient.
_BY_CLASS = {"AveragePooling2D": "norm", "GlobalAveragePooling2D": "norm", "Add": "norm", "Subtract": "norm",
             "Average": "norm", "Multiply": "norm", "CustomScaleLayer": "norm"}
_PASS_KINDS = ("activation", "norm", "scale")


_NONNEG_ACTIVATIONS = ("relu", "relu6", "sigmoid", "softmax", "hard_sigmoid", "softplus", "exponential")
_NONNEG_KEEPING = ("pool", "global_pool", "flatten", "reshape", "pad", "crop", "identity", "container")


def nonnegative(graph) -> set[str]:
    """The layers whose outputs are >= 0 whatever the input: those ending in a ReLU (or
    another activation with no negative values), and pooling, reshaping, padding and
    merging (but subtracting) of such outputs."""
    out: set[str] = set()
    for n in graph.nodes:
        key = n.layer_type.activation_key
        act = n.config.get(key) if key else None
        if act in _NONNEG_ACTIVATIONS or (n.cls == "ReLU" and not n.config.get("negative_slope")
                                          and n.config.get("threshold", 0.0) >= 0) or n.inputs and all(i in out for i in n.inputs) and (
                n.kind in _NONNEG_KEEPING or n.cls in ("Add", "Concatenate", "Maximum", "Minimum", "Average",
                                                        "Multiply")):
            out.add(n.name)
    return out


def foldable(graph) -> dict[str, str]:
    """``{batchnorm layer: the convolution or dense layer it folds into}``: each
    BatchNormalization whose one input is such a layer without activation, consumed by
    the normalisation alone."""
    consumers: dict[str, list[str]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n.name)
    out = {}
    for n in graph.nodes:
        if n.cls != "BatchNormalization" or len(n.inputs) != 1:
            continue
        prev = graph.by_name[n.inputs[0]]
        if prev.kind in ("conv", "dense") and prev.config.get("activation", "linear") == "linear" \
                and consumers.get(prev.name) == [n.name] and prev.name != graph.output:
            out[n.name] = prev.name
    return out


def fold_batchnorm(graph, params, folds: Mapping[str, str]):
    """``(params, biases)``: ``params`` with each folded normalisation's scale and shift
    moved into its layer's kernel and bias; ``biases`` ``{layer: [C]}`` the shifts of
    layers without a bias of their own (their rule carries it: `Rule.bias`)."""
    params, biases = dict(params), {}
    for bn, prev in folds.items():
        cfg, b, p = graph.by_name[bn].config, params.get(bn, {}), dict(params[prev])
        inv = jax.lax.rsqrt(b["moving_variance"] + cfg["epsilon"])
        if cfg["scale"]:
            inv = inv * b["gamma"]
        shift = -b["moving_mean"] * inv + (b["beta"] if cfg["center"] else 0.0)
        node = graph.by_name[prev]
        kname = "depthwise_kernel" if node.cls == "DepthwiseConv2D" else \
            "pointwise_kernel" if node.cls == "SeparableConv2D" else "kernel"
        k = p[kname]
        if node.cls == "DepthwiseConv2D":  # [kh, kw, C, m]: output channel c*m + j
            p[kname] = k * inv.reshape(k.shape[2], k.shape[3])
        else:
            p[kname] = k * inv
        if "bias" in p:
            p["bias"] = p["bias"] * inv + shift
        else:
            biases[prev] = shift
        params[prev] = p
    return params, biases


def rule_map(model, composite: str, *, epsilon: float = 1e-6, stabilizer: float = 1e-6, gamma: float = 0.25,
             overrides: Mapping[str, str] | None = None, canonize: bool = True,
             input_bounds: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
    """The rule of every layer of ``model`` under ``composite`` (a name in `COMPOSITES`),
    as ``((layer, Rule or IDENTITY), ...)``, and the normalisations folded
    (``{batchnorm: layer}``, empty without ``canonize``). ``overrides`` maps a layer name
    or a Keras class to a rule name; ``input_bounds`` are ``zbox``'s ``(low, high)``."""
    if composite not in COMPOSITES:
        raise ConvlensError(f"unknown LRP composite {composite!r}: choose one of {', '.join(COMPOSITES)}")
    graph = model.graph
    conv_rule, dense_rule, first_rule = COMPOSITES[composite]
    folds = foldable(graph) if canonize else {}
    overrides = dict(overrides or {})
    names = {n.name for n in graph.nodes} | {n.cls for n in graph.nodes}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConvlensError(f"LRP rules name {', '.join(map(repr, unknown))}, not a layer or layer class of "
                            f"{model.name}: give layer names (e.g. {graph.nodes[1].name}) or classes (e.g. Dense)")
    first = next((n.name for n in graph.nodes
                  if n.kind == "conv" or (n.kind == "dense" and composite != "epsilon_gamma_box")), None)
    low, high = input_bounds if input_bounds is not None else ((), ())

    positive = nonnegative(graph)

    def make(name, node):
        kw = dict(name=name, epsilon=epsilon, stabilizer=stabilizer, gamma=gamma,
                  nonneg=all(i in positive for i in node.inputs))
        if name == "alphabeta":
            kw.update(alpha=2.0, beta=1.0)
        if name == "zbox":
            if input_bounds is None:
                raise ConvlensError("the zbox rule needs the input's value range (input_bounds)")
            kw.update(low=low, high=high)
        return Rule(**kw)
    out = []
    for n in graph.nodes:
        if n.cls == "InputLayer":
            continue
        if n.name in folds:
            out.append((n.name, IDENTITY))
            continue
        name = overrides.get(n.name) or overrides.get(n.cls)
        if name is None:
            if n.name == first and first_rule:
                name = first_rule
            elif n.kind == "conv":
                name = conv_rule
            elif n.kind == "dense":
                name = dense_rule
            elif n.cls in _BY_CLASS:
                name = _BY_CLASS[n.cls]
            elif n.kind in _PASS_KINDS:
                name = "pass"
            else:
                continue  # the gradient
        if name in WEIGHTED_RULES and n.kind not in ("conv", "dense"):
            raise ConvlensError(f"the {name} rule needs a layer with weights; {n.name} is a {n.cls}")
        out.append((n.name, make(name, n)))
    return tuple(out), folds


# ---------------------------------------------------------------- DeepLIFT

def deeplift_rules(model, eps: float = 1e-10):
    """DeepLIFT's rescale rule (Shrikumar et al. 2017) on every nonlinearity of ``model``
    as Captum's ``DeepLift`` applies it: elementwise activations (an activation layer's,
    or a convolution's or dense layer's fused one; a final softmax or sigmoid is left
    out where scores are explained before it) and max pooling. Every other layer is
    linear and keeps its gradient. The model runs on ``[inputs; baselines]`` (twice the
    batch), the baselines' half supplying the reference activations;
    ``((layer, Rule("rescale")), ...)``."""
    out = []
    for n in model.graph.nodes:
        act = n.config.get(n.layer_type.activation_key) if n.layer_type.activation_key else None
        elementwise = n.kind == "activation" and n.cls != "Softmax"
        if n.cls == "MaxPooling2D" or elementwise or (act and act != "linear"):
            out.append((n.name, Rule(RESCALE, epsilon=eps)))
    return tuple(out)


def _halves(a):
    b = a.shape[0] // 2
    return a[:b], a[b:]


def _twice(a):
    return jnp.concatenate([a, a])


def _rescaled(f, z, eps):
    """``f(z)`` elementwise, on ``z = [inputs; baselines]``; backward, the multiplier
    ``(f(x) - f(x0)) / (x - x0)`` for both halves (the gradient where ``|x - x0| < eps``)."""
    @jax.custom_vjp
    def r(z):
        return f(z)

    def fwd(z):
        return f(z), z

    def bwd(z, g):
        y, pull = jax.vjp(f, z)
        grad = pull(g)[0]
        (zx, z0), (yx, y0) = _halves(z), _halves(y)
        dx, dy = _twice(zx - z0), _twice(yx - y0)
        small = jnp.abs(dx) < eps
        return (jnp.where(small, grad, g * dy / jnp.where(small, 1.0, dx)),)
    r.defvjp(fwd, bwd)
    return r(z)


def _maxpool_rescaled(pool, x, eps):
    """Captum's DeepLIFT rule of max pooling on ``x = [inputs; baselines]``: the output
    differences routed back through each half's own maxima, summed, divided by the
    input differences (the gradient where ``|x - x0| < eps``)."""
    @jax.custom_vjp
    def r(x):
        return pool(x)

    def fwd(x):
        return pool(x), x

    def bwd(x, g):
        y, pull = jax.vjp(pool, x)
        yx, y0 = _halves(y)
        top = jnp.maximum(yx, y0)
        routed = pull(g * jnp.concatenate([top - y0, yx - top]))[0]
        s = _twice(sum(_halves(routed)))
        dx = _twice(x[: x.shape[0] // 2] - x[x.shape[0] // 2:])
        small = jnp.abs(dx) < eps
        return (jnp.where(small, pull(g)[0], s / jnp.where(small, 1.0, dx)),)
    r.defvjp(fwd, bwd)
    return r(x)


def _deeplift_apply(node, cfg, v, xs, logits, relu, eps):
    lt = node.layer_type
    if node.cls == "MaxPooling2D":
        return _maxpool_rescaled(lambda x: lt.apply(cfg, v, [x]), xs[0], eps)
    if node.kind == "activation":
        return _rescaled(lambda x: lt.apply(cfg, v, [x], logits=logits, relu=relu), xs[0], eps)
    key = lt.activation_key
    z = lt.apply(dict(cfg, **{key: "linear"}), v, xs)
    return _rescaled(lambda z: activation(cfg, z, logits, relu), z, eps)
