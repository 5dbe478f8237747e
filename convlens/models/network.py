"""A convnet as a graph of Keras layers, run by one Flax module.

Every model in convlens, built-in or imported, is a `Graph`: Keras layers
(`Node`) named as in Keras, in topological order. `Network` (Flax linen) runs a
graph; `Model` wraps it with the model's preprocessing and label names and is
what the rest of convlens uses.

Three things any explanation needs fall out of running a graph with a *feed*
(values given for some nodes) and a list of *outputs*:

* named activations without hooks: ask for them as outputs;
* gradients at a layer: add a zero ``perturb`` array to that layer's output and
  differentiate with respect to it (works on any graph, residual ones included);
* a split at a layer: ``features`` = outputs up to it, ``head`` = the rest fed
  from it (only where every path to the output passes through the layer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convlens.errors import ConvlensError
from convlens.models.layers import LAYER_TYPES, RELU_RULES, SQUASHING, init_var, init_var_np
from convlens.models.propagation import apply_with_rule

Array = jax.Array
Params = dict[str, dict[str, Array]]
PRECISIONS = ("full", "fast")


@dataclasses.dataclass(frozen=True)
class Node:
    """One Keras layer call.

    Attributes:
      name: the Keras layer name (unique in the graph).
      cls: the Keras class name (``"Conv2D"``).
      cfg: the parsed options, as sorted ``(key, value)`` pairs so nodes hash.
      inputs: names of the nodes feeding this one, in call order.
      scope: names of the nested Keras models enclosing the layer, outermost first.
      keras_name: the name inside its own (nested) Keras model, when ``name`` had to
        be prefixed to stay unique.
    """

    name: str
    cls: str
    cfg: tuple[tuple[str, Any], ...]
    inputs: tuple[str, ...]
    scope: tuple[str, ...] = ()
    keras_name: str = ""

    @property
    def kname(self) -> str:
        return self.keras_name or self.name

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        return dict(self.cfg)

    @property
    def layer_type(self):
        return LAYER_TYPES[self.cls]

    @property
    def kind(self) -> str:
        """What the layer computes (`convlens.models.layers.KINDS`): ``conv``, ``pool`` ..."""
        return LAYER_TYPES[self.cls].kind


@dataclasses.dataclass(frozen=True)
class Graph:
    """A single-input, single-output graph of Keras layers in topological order."""

    name: str
    nodes: tuple[Node, ...]
    input: str
    output: str

    def __hash__(self) -> int:
        # Graphs key compile caches: hash the (immutable) nodes once.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.name, self.nodes, self.input, self.output))
            self.__dict__["_hash"] = h
        return h

    @functools.cached_property
    def by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    @functools.cached_property
    def order(self) -> dict[str, int]:
        return {n.name: i for i, n in enumerate(self.nodes)}

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """Shape of one input image, ``(H, W, C)``; ``None`` where any size is accepted."""
        return self.by_name[self.input].config["shape"]

    def node(self, name: str) -> Node:
        try:
            return self.by_name[name]
        except KeyError:
            raise ConvlensError(
                f"model {self.name!r} has no layer {name!r}; its layers are: "
                + ", ".join(n.name for n in self.nodes)) from None

    @functools.lru_cache(maxsize=256)
    def plan(self, outputs: tuple[str, ...], fed: frozenset[str]) -> tuple[Node, ...]:
        """The nodes to compute, in order, to get ``outputs`` from the ``fed`` nodes."""
        need: set[str] = set()
        stack = [self.node(o).name for o in outputs]
        while stack:
            name = stack.pop()
            if name in need or name in fed:
                continue
            need.add(name)
            node = self.by_name[name]
            if name == self.input:
                raise ConvlensError(
                    f"cannot compute {', '.join(outputs)} of model {self.name!r} from layer(s) "
                    f"{', '.join(sorted(fed))} alone: other paths from the input bypass them "
                    "(skip connections); run the whole model and use perturb instead")
            stack.extend(node.inputs)
        return tuple(n for n in self.nodes if n.name in need)


def _init_layer(node: Node, shapes: Sequence[tuple[int, ...]]):
    specs = node.layer_type.variables(node.config, shapes)

    def init(key):
        keys = jax.random.split(key, max(len(specs), 1))
        return {v.name: init_var(v, k) for v, k in zip(specs, keys)}
    return specs, init


class Network(nn.Module):
    """Runs a `Graph`. Variables live in the ``params`` collection as
    ``params[layer_name][keras_variable_name]`` (moving statistics included), so a
    params tree reads like the Keras model's ``layer.weights``."""

    graph: Graph

    @nn.compact
    def __call__(self, feed: Mapping[str, Array], outputs: tuple[str, ...],
                 perturb: Mapping[str, Array] | None = None, logits: bool = False,
                 relu_rule: str = "standard", rules: tuple = ()) -> dict[str, Array]:
        values: dict[str, Array] = dict(feed)
        relu = RELU_RULES[relu_rule]
        perturb = perturb or {}
        rules = dict(rules)
        for node in self.graph.plan(tuple(outputs), frozenset(feed)):
            xs = [values[i] for i in node.inputs]
            if node.cls == "InputLayer":
                continue
            specs, init = _init_layer(node, [x.shape for x in xs])
            v = self.param(node.name, init) if specs else {}
            last = logits and node.name == self.graph.output
            if node.name in rules:  # relevance propagation (convlens.models.propagation)
                y = apply_with_rule(rules[node.name], node, v, xs, last, relu)
            else:
                y = node.layer_type.apply(node.config, v, xs, logits=last, relu=relu)
            if node.name in perturb:
                y = y + perturb[node.name]
            values[node.name] = y
        return {o: values[o] for o in outputs}


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from, and how to load it again.

    Attributes:
      source: the weights or model file, ``random-init:SEED``, or ``None`` (built in Python).
      weights_sha256: the file's sha256, where there is a file.
      load_args: `convlens.load_model` keywords that load the model again, as sorted
        ``(key, value)`` pairs (values JSON-like), or ``None``.
    """

    source: str | None = None
    weights_sha256: str | None = None
    load_args: tuple[tuple[str, Any], ...] | None = None

    @classmethod
    def of(cls, source=None, weights_sha256=None, load_args: Mapping | None = None) -> Provenance:
        args = None if load_args is None else tuple(sorted((k, _freeze(v)) for k, v in load_args.items()))
        return cls(source, weights_sha256, args)

    def load_kwargs(self) -> dict | None:
        """``load_args`` as a dict of plain values (lists for tuples), or ``None``."""
        if self.load_args is None:
            return None
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.load_args}


def _freeze(v):
    return tuple(_freeze(a) for a in v) if isinstance(v, (list, tuple)) else v


class Model:
    """A convnet ready for explanation: graph, preprocessing, labels and provenance.

    Immutable: equal models are interchangeable and key compiled kernels; change one with
    `replace` (``model.replace(preprocess=Preprocess("tf"))``), which returns a new model.

    Args:
      graph: the layers.
      preprocess: how uint8 RGB pixels become the graph's input (see `preprocess`).
      class_names: label of each output unit, or ``None``.
      default_size: ``(H, W)`` used where the graph accepts any size.
      provenance: where the weights came from (`Provenance`).
    """

    __slots__ = ("graph", "name", "preprocess_spec", "class_names", "default_size", "input_size", "channels",
                 "provenance", "precision", "__dict__")

    def __init__(self, graph: Graph, *, preprocess=None, class_names: Sequence[str] | None = None,
                 default_size: tuple[int, int] = (224, 224), provenance: Provenance | None = None,
                 precision: str = "full"):
        from convlens.models.preprocess import Preprocess
        put = object.__setattr__
        put(self, "graph", graph)
        put(self, "name", graph.name)
        put(self, "preprocess_spec", preprocess if preprocess is not None else Preprocess("none"))
        put(self, "class_names", None if class_names is None else tuple(str(c) for c in class_names))
        put(self, "default_size", tuple(default_size))
        h, w, c = graph.input_shape
        put(self, "input_size", (h or default_size[0], w or default_size[1]))
        put(self, "channels", c)
        put(self, "provenance", provenance or Provenance())
        if precision not in PRECISIONS:
            raise ConvlensError(f"precision {precision!r}: {' or '.join(PRECISIONS)}")
        put(self, "precision", precision)

    def __setattr__(self, name, value):
        raise AttributeError(f"Model is immutable: use model.replace({name}=...) for a changed copy")

    def __delattr__(self, name):
        raise AttributeError("Model is immutable")

    def replace(self, **changes) -> Model:
        """A copy with some of ``graph``, ``preprocess``, ``class_names``, ``default_size`` or
        ``provenance`` changed (the keywords of the constructor)."""
        kw = {"graph": self.graph, "preprocess": self.preprocess_spec, "class_names": self.class_names,
              "default_size": self.default_size, "provenance": self.provenance, "precision": self.precision}
        unknown = set(changes) - set(kw)
        if unknown:
            raise TypeError(f"Model.replace got unknown fields: {', '.join(sorted(unknown))}")
        kw.update(changes)
        graph = kw.pop("graph")
        return Model(graph, **kw)

    def _key(self):
        return (self.graph, self.preprocess_spec, self.class_names, self.default_size, self.provenance,
                self.precision)

    def __eq__(self, other):
        return isinstance(other, Model) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    @property
    def computation(self) -> tuple:
        """What a compiled kernel depends on (graph, preprocessing, input size): the part
        of the model that keys compile caches. Labels and provenance do not."""
        return (self.graph, self.preprocess_spec, self.input_size, self.channels, self.precision)

    @property
    def source(self) -> str | None:
        return self.provenance.source

    @property
    def weights_sha256(self) -> str | None:
        return self.provenance.weights_sha256

    @property
    def load_args(self) -> dict | None:
        return self.provenance.load_kwargs()

    @functools.cached_property
    def module(self) -> Network:
        return Network(self.graph)

    # ---------------------------------------------------------------- structure

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Every layer but the input, in topological order."""
        return tuple(n.name for n in self.graph.nodes if n.name != self.graph.input)

    @property
    def conv_layer_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.graph.nodes if n.kind == "conv")

    @property
    def output_activation(self) -> str | None:
        """``"softmax"``/``"sigmoid"`` when the model squashes its scores at the end."""
        act = self.graph.by_name[self.graph.output].config.get("activation")
        return act if act in SQUASHING else None

    @functools.cached_property
    def binary(self) -> bool:
        """Whether the model ends in a single unit (sigmoid or linear): a two-class
        classifier, whose class scores are ``[-z, z]`` (see `apply`)."""
        shape = self.output_shapes()[self.graph.output]
        return len(shape) == 2 and shape[-1] == 1 and self.output_activation in (None, "sigmoid")

    @functools.cached_property
    def multilabel(self) -> bool:
        """Whether the model ends in several independent sigmoid units (a tagging model)."""
        shape = self.output_shapes()[self.graph.output]
        return len(shape) == 2 and shape[-1] > 1 and self.output_activation == "sigmoid"

    def class_scores(self, z: Array) -> Array:
        """The output's scores before the squashing ``z [..., K]`` as class scores: the same,
        or for a single unit the two-class view ``[-z, z]`` (class 1's log-odds is z, class
        0's is -z, and sigmoid of each is that class's probability)."""
        return jnp.concatenate([-z, z], axis=-1) if self.binary else z

    def dummy_input(self, batch: int = 1, size: tuple[int, int] | None = None) -> jax.ShapeDtypeStruct:
        h, w = size or self.input_size
        return jax.ShapeDtypeStruct((batch, h, w, self.channels), jnp.float32)

    @functools.cached_property
    def param_shapes(self) -> Params:
        """Shapes of every variable, without computing any (``jax.eval_shape``)."""
        x = self.dummy_input()
        out = jax.eval_shape(
            lambda k: self.module.init(k, {self.graph.input: jnp.zeros(x.shape, x.dtype)}, (self.graph.output,)),
            jax.ShapeDtypeStruct((2,), jnp.uint32))
        return dict(out.get("params", {}))

    def variable_specs(self) -> dict[str, list]:
        """Per layer, its `Var` list in Keras order (names, shapes, trainability)."""
        shapes = self.output_shapes()
        specs = {}
        for node in self.graph.nodes:
            if node.cls == "InputLayer":
                continue
            ins = [shapes[i] for i in node.inputs]
            v = node.layer_type.variables(node.config, ins)
            if v:
                specs[node.name] = v
        return specs

    def output_shapes(self, batch: int = 1, size: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
        """Output shape of every layer for a batch of ``batch`` images, input included.

        At a ``size`` the model's Dense layers cannot take, only the layers that can be
        computed at that size are listed (the convolutional part)."""
        cache = self.__dict__.setdefault("_shape_cache", {})  # a cache, not state: shapes follow the graph
        if (batch, size) in cache:
            return cache[(batch, size)]
        x = self.dummy_input(batch, size)
        shapes: dict[str, tuple[int, ...]] = {}

        def run(names):
            return jax.eval_shape(lambda p, x: self.module.apply({"params": p}, {self.graph.input: x}, names),
                                  self.param_shapes, x)
        try:
            out = run(tuple(n.name for n in self.graph.nodes))
            shapes = {k: tuple(v.shape) for k, v in out.items()}
        except Exception:  # noqa: BLE001 - a size the head cannot take: keep what computes
            if size is None:
                raise
            for node in self.graph.nodes:
                try:
                    shapes[node.name] = tuple(run((node.name,))[node.name].shape)
                except Exception:  # noqa: BLE001
                    continue
        cache[(batch, size)] = shapes
        return shapes

    # ---------------------------------------------------------------- computing

    def init(self, seed: int) -> Params:
        """Random variables (Keras's default initialisers) from an integer seed.

        Drawn on the host with numpy: compiling a threefry draw per variable costs
        XLA:CPU seconds even for a tiny model."""
        import numpy as np
        rng = np.random.default_rng(seed)
        out: Params = {}
        for layer, specs in self.variable_specs().items():
            out[layer] = {v.name: jnp.asarray(init_var_np(v, rng)) for v in specs}
        return out

    def _run(self, params, feed, outputs, perturb=None, logits=False, relu_rule="standard", rules=()):
        """The network on ``feed`` at the model's precision: float32 at full precision
        (``highest``: no TF32 or bfloat16 passes on accelerators), or (``fast``) params
        and inputs in bfloat16 with float32 results."""
        if self.precision == "fast":
            params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
            feed = {k: v.astype(jnp.bfloat16) for k, v in feed.items()}
            if perturb:
                perturb = {k: v.astype(jnp.bfloat16) for k, v in perturb.items()}
            out = self.module.apply({"params": params}, feed, outputs, perturb, logits, relu_rule, rules)
            return {k: v.astype(jnp.float32) for k, v in out.items()}
        with jax.default_matmul_precision("highest"):
            return self.module.apply({"params": params}, feed, outputs, perturb, logits, relu_rule, rules)

    def preprocess(self, images: Array) -> Array:
        """Pixels ``[B, H, W, C]`` in 0..255 (uint8 or float) to the model's input space."""
        return self.preprocess_spec(images)

    def apply(self, params: Params, x: Array, *, layers: Sequence[str] | str = (),
              perturb: Mapping[str, Array] | None = None, logits: bool = False,
              relu_rule: str = "standard", rules: tuple = ()) -> tuple[Array, dict[str, Array]]:
        """Runs the model on preprocessed input.

        Args:
          params: variables, ``params[layer][variable]``.
          x: preprocessed images ``[B, H, W, C]`` float32.
          layers: layer names whose outputs to return, or ``"all"`` / ``"conv"``.
          perturb: arrays added to the named layers' outputs (zeros to take gradients there).
          logits: return class scores before a final softmax/sigmoid (for a single
            sigmoid or linear unit, the two-class view ``[-z, z]``: `class_scores`).
          relu_rule: how ReLUs backpropagate: ``standard``, ``guided`` or ``deconvnet``
            (forward values are the same for all three).
          rules: relevance rules per layer, ``((layer, Rule), ...)``
            (`convlens.models.propagation.rule_map`): the backward pass propagates
            relevance instead of gradients (forward values unchanged).

        Returns:
          ``(outputs [B, K], {layer: activation})``.
        """
        layers = self.resolve_layers(layers)
        want = tuple(dict.fromkeys((self.graph.output, *layers)))
        out = self._run(params, {self.graph.input: x}, want, perturb, logits, relu_rule, rules)
        y = out[self.graph.output]
        if logits:
            y = self.class_scores(y)
        if logits and self.graph.output in layers:
            # The captured output layer keeps its Keras meaning (post-activation).
            out[self.graph.output] = self._run(params, {self.graph.input: x}, (self.graph.output,),
                                               rules=rules)[self.graph.output]
        return y, {name: out[name] for name in layers}

    def features(self, params: Params, x: Array, layer: str) -> Array:
        """Output of ``layer`` for preprocessed input ``x`` ``[B, H, W, C]``."""
        return self._run(params, {self.graph.input: x}, (self.graph.node(layer).name,))[layer]

    def intermediates(self, params: Params, x: Array, layers) -> dict[str, Array]:
        """Outputs of ``layers`` only (nothing past them is computed), ``{layer: [B, ...]}``;
        any input size a model without Dense layers on the way accepts."""
        names = tuple(self.graph.node(n).name for n in layers)
        return self._run(params, {self.graph.input: x}, names)

    def head(self, params: Params, a: Array, layer: str, *, logits: bool = False) -> Array:
        """The rest of the model fed from ``layer``'s output ``a``; raises where skip
        connections bypass the layer."""
        y = self._run(params, {self.graph.node(layer).name: a}, (self.graph.output,), None, logits)[self.graph.output]
        return self.class_scores(y) if logits else y

    def resolve_layers(self, layers: Sequence[str] | str) -> tuple[str, ...]:
        if isinstance(layers, str):
            if layers == "all":
                return self.layer_names
            if layers == "conv":
                return self.conv_layer_names
            layers = [s for s in layers.split(",") if s]
        return tuple(self.graph.node(name).name for name in layers)

    def flops(self, batch: int = 1, size: tuple[int, int] | None = None, upto: str | None = None) -> int:
        """FLOPs of a forward pass (2 x the multiply-adds of convolutions and dense layers)
        for ``batch`` images at ``size``, up to and including layer ``upto``."""
        shapes = self.output_shapes(batch, size)
        total = 0
        for node in self.graph.nodes:
            f = node.layer_type.flops
            if f is not None and node.name in shapes:
                total += f(node.config, [shapes[i] for i in node.inputs], shapes[node.name])
            if node.name == upto:
                break
        return total

    def activation_bytes(self, batch: int = 1, size: tuple[int, int] | None = None) -> int:
        """Bytes of every layer's float32 output for ``batch`` images: what a backward pass
        keeps, and an upper bound for a forward pass."""
        return 4 * sum(math.prod(s) for s in self.output_shapes(batch, size).values())

    def count_params(self) -> tuple[int, int]:
        """``(trainable, non_trainable)`` variable counts, as Keras reports them."""
        t = nt = 0
        for specs in self.variable_specs().values():
            for v in specs:
                n = math.prod(v.shape)
                if v.trainable:
                    t += n
                else:
                    nt += n
        return t, nt

    def __repr__(self) -> str:
        return f"Model({self.name!r}, layers={len(self.graph.nodes)}, input={self.graph.input_shape})"
