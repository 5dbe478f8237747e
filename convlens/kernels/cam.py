"""Class activation maps: Grad-CAM and its family, CAM, guided Grad-CAM.

Every gradient CAM is the same skeleton — activations ``A`` and gradients ``G`` of the
target's logit at a spatial layer, then ``ReLU(sum_c W * A)`` — and the members differ
only in the weights ``W = weights_fn(A, G)`` (per channel ``[B, 1, 1, c]`` or per
location ``[B, h, w, c]``):

* Grad-CAM (Selvaraju et al. 2017): spatial mean of ``G``;
* Grad-CAM++ (Chattopadhay et al. 2018): ``sum_ij alpha_ij ReLU(G_ij)``, alpha from
  second and third powers of ``G``;
* HiRes-CAM (Draelos & Carin 2020): ``G`` itself, element-wise;
* Layer-CAM (Jiang et al. 2021): ``ReLU(G)``, element-wise;
* XGrad-CAM (Fu et al. 2020): ``sum_ij G A / sum_ij A``.

CAM (Zhou et al. 2016) takes the weights from the final Dense layer of a
GlobalAveragePooling + Dense model instead, with no gradients, and is returned signed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from convlens.config import Config
from convlens.errors import ConvlensError
from convlens.kernels import common
from convlens.kernels.spec import (INPUT_ATTR, INPUT_MAP, Advice, LAYER_FIXED, LAYER_MAP, LAYER_SPATIAL, MethodSpec, Output,
                                   SharedPass)
from convlens.models.network import Model

EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class CamConfig(Config):
    """Options of the CAM family.

    Attributes:
      layer: the spatial layer to explain; ``None`` picks `common.default_layer`.
    """

    layer: str | None = None


def _gradcam_w(a, g):
    return jnp.mean(g, axis=(-3, -2), keepdims=True)


def _gradcampp_w(a, g):
    g2 = g * g
    denom = 2.0 * g2 + jnp.sum(a, axis=(-3, -2), keepdims=True) * g2 * g
    alpha = jnp.where(g != 0, g2 / (denom + EPS), 0.0)
    return jnp.sum(alpha * jax.nn.relu(g), axis=(-3, -2), keepdims=True)


def _hirescam_w(a, g):
    return g


def _layercam_w(a, g):
    return jax.nn.relu(g)


def _xgradcam_w(a, g):
    return jnp.sum(g * a, axis=(-3, -2), keepdims=True) / (jnp.sum(a, axis=(-3, -2), keepdims=True) + EPS)


def cam_from_weights(acts, weights):
    """``ReLU(sum_c W * A)``: ``acts [B, 1, h, w, c]`` (broadcast over targets), ``weights
    [B, T, 1|h, 1|w, c]`` -> ``[B, T, h, w]``."""
    return jax.nn.relu(jnp.sum(weights * acts, axis=-1))


def resolve_layer(model: Model, cfg, method: str) -> str:
    """``cfg.layer``, or the default spatial layer, checked."""
    layer = cfg.layer or common.default_layer(model)
    return common.check_spatial_layer(model, layer, method)


def _layer_pass(model: Model, params, images, targets, cfg: CamConfig):
    """What every gradient CAM needs: one forward pass and the targets' gradients at the
    layer (``acts [B, h, w, c]``, ``grads [B, T, h, w, c]``)."""
    layer = resolve_layer(model, cfg, "a gradient CAM")
    logits, t, acts, grads = common.layer_gradients(model, params, images, layer, targets)
    return {"logits": logits, "targets": t, "acts": acts, "grads": grads}


def _finisher(weights_fn):
    def finish(model: Model, images, cfg: CamConfig, state):
        a = state["acts"][:, None]
        cam = cam_from_weights(a, weights_fn(a, state["grads"]))
        return {"cam": cam, "heatmap": common.upsample(cam, images.shape[1:3]), "targets": state["targets"],
                "logits": state["logits"]}
    return finish


def gradient_cam(weights_fn, method):
    """A gradient CAM kernel from its ``weights_fn(acts [B, 1, h, w, c], grads [B, T, h, w, c])
    -> [B, T, 1|h, 1|w, c]`` (the only thing a member of the family supplies)."""
    finish = _finisher(weights_fn)

    def explain(model: Model, params, images, targets, cfg: CamConfig, keys=None):
        """``images [B, H, W, C]`` -> ``cam [B, T, h, w]`` and ``heatmap [B, T, H, W]``."""
        resolve_layer(model, cfg, method)
        return finish(model, images, cfg, _layer_pass(model, params, images, targets, cfg))
    return explain


def cam_structure(model: Model) -> tuple[str, str]:
    """``(feature_layer, dense_layer)`` of a model ending in GlobalAveragePooling2D + Dense
    (Dropout/Flatten/linear layers in between allowed), or a clear error."""
    g = model.graph
    node = g.by_name[g.output]
    if node.kind == "activation" and node.config.get("activation") != "linear":
        node = g.by_name[node.inputs[0]]
    if node.kind != "dense":
        raise ConvlensError(
            f"CAM needs a model ending in GlobalAveragePooling2D + Dense (like ResNet50 or MobileNetV2); "
            f"{model.name!r} ends in {node.cls} {node.name!r}: use gradcam instead")
    dense = node
    node = g.by_name[node.inputs[0]]
    while node.kind in ("identity", "flatten"):  # inference-time identities (a flattened GAP output too)
        node = g.by_name[node.inputs[0]]
    if node.cls != "GlobalAveragePooling2D":
        raise ConvlensError(
            f"CAM needs GlobalAveragePooling2D right before the final Dense layer {dense.name!r}; "
            f"{model.name!r} has {node.cls} {node.name!r} there (e.g. VGG's Flatten + fully connected "
            "layers): use gradcam instead")
    return node.inputs[0], dense.name


def cam(model: Model, params, images, targets, cfg: CamConfig, keys=None):
    """Zhou et al.'s CAM: ``sum_c W[c, k] A_c`` at the layer feeding the global pooling,
    ``cam [B, T, h, w]`` (signed) and ``heatmap [B, T, H, W]``."""
    layer, dense = cam_structure(model)
    if cfg.layer not in (None, layer):
        raise ConvlensError(f"CAM is defined at the layer feeding the global pooling ({layer!r}), "
                            f"not {cfg.layer!r}: drop --layer")
    x = model.preprocess(images)
    logits, acts = model.apply(params, x, layers=[layer], logits=True)
    t = common.select_targets(logits, targets)
    w = params[dense]["kernel"]  # [c, K]
    if model.binary:
        w = jnp.concatenate([-w, w], axis=1)  # class 0 scores -z, class 1 scores z
    wt = jnp.moveaxis(w[:, t], 0, -1)  # [B, T, c]
    m = jnp.einsum("bhwc,btc->bthw", acts[layer], wt)
    return {"cam": m, "heatmap": common.upsample(m, images.shape[1:3]), "targets": t, "logits": logits}


def guided_gradcam(model: Model, params, images, targets, cfg: CamConfig, keys=None):
    """Guided backprop times the Grad-CAM heatmap (Selvaraju et al. 2017):
    ``attribution [B, T, H, W, C]``, ``heatmap [B, T, H, W]`` (max |.| over channels)."""
    from convlens.kernels.gradients import guided_input_gradients
    out = gradient_cam(_gradcam_w, "guided_gradcam")(model, params, images, targets, cfg)
    guided = guided_input_gradients(model, params, images, out["targets"])
    attr = guided * out["heatmap"][..., None]
    return {"attribution": attr, "heatmap": jnp.max(jnp.abs(attr), axis=-1), "cam": out["cam"],
            "targets": out["targets"], "logits": out["logits"]}


CAM_OUTPUTS = (Output("cam", LAYER_MAP, "map at the explained layer's resolution"),
               Output("heatmap", INPUT_MAP, "the map resized (bilinear) to the input"))


# What to run when a CAM's maps come out empty: position-averaged gradients cancel (behind a
# Flatten head above all), where element-wise weights do not; a CAM keeps only evidence for
# the class (ReLU), where a signed method shows the rest.
AVERAGED = Advice(("hirescam", "layercam"), "weighs channels by gradients averaged over positions, which can "
                  "cancel; HiRes-CAM (exact on Flatten heads) and Layer-CAM weigh each position by its own gradient")
RELU = Advice(("gradient_x_input", "occlusion"), "keeps only evidence for the class (ReLU), and there is none at "
              "its layer: try a layer nearer the input (--layer), or a signed method")


def cam_spec(name: str, weights_fn, doc: str, pools_gradient: bool = False) -> MethodSpec:
    """The declaration of a gradient CAM variant: one ``weights_fn`` and a line of doc;
    ``pools_gradient``: its channel weights average the gradient over positions."""
    return MethodSpec(name, "cam", CamConfig, gradient_cam(weights_fn, name), CAM_OUTPUTS, False, doc,
                      layer=LAYER_SPATIAL, pools_gradient=pools_gradient,
                      shared=SharedPass("layer_gradients", _layer_pass, _finisher(weights_fn)),
                      when_empty=AVERAGED if pools_gradient else RELU)


SPECS = (
    cam_spec("gradcam", _gradcam_w, "Grad-CAM: channel weights = mean gradient", pools_gradient=True),
    cam_spec("gradcampp", _gradcampp_w, "Grad-CAM++: higher-order gradient weights", pools_gradient=True),
    cam_spec("hirescam", _hirescam_w, "HiRes-CAM: gradient x activation, element-wise"),
    cam_spec("layercam", _layercam_w, "Layer-CAM: ReLU(gradient) x activation, element-wise"),
    cam_spec("xgradcam", _xgradcam_w, "XGrad-CAM: activation-normalised gradient weights", pools_gradient=True),
    MethodSpec("cam", "cam", CamConfig, cam, CAM_OUTPUTS, False,
               "CAM: final Dense weights over GlobalAveragePooling features (signed, no gradients)",
               layer=LAYER_FIXED, fixed_layer=lambda model: cam_structure(model)[0], when_empty=RELU),
    MethodSpec("guided_gradcam", "cam", CamConfig, guided_gradcam,
               (Output("attribution", INPUT_ATTR, "guided backprop x Grad-CAM heatmap"),
                Output("heatmap", INPUT_MAP, "max |attribution| over channels"),
                Output("cam", LAYER_MAP, "the Grad-CAM map")), False,
               "Guided Grad-CAM: guided backprop x Grad-CAM", layer=LAYER_SPATIAL, pools_gradient=True,
               when_empty=AVERAGED),
)
