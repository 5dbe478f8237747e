"""Incremental inference for occlusion (Nakandala, Kumar & Papakonstantinou, SIGMOD 2019).

An occluding patch changes only a bounded region of each layer's output: its projective
field, which each convolution widens by ``k - 1`` and each pooling narrows by its stride.
For every patch position we therefore keep, per layer, only that region's values and
where it sits; every other value is read from the unoccluded activations, computed once
per image. A layer's new region is computed by running the layer itself (padding VALID)
on the window of its input the region needs, assembled from the unoccluded input and the
previous region. Once a region covers most of its map, the occluded map is assembled in
full and the rest of the network runs as usual (``Model.head``).

All geometry is static: the patch grid is known when tracing, so every region's size is
fixed (the largest over positions) and its offsets are numpy constants; a region near a
border is shifted inward so it stays inside the map (a superset of the changed values,
hence still exact). ``tau < 1`` caps regions at ``tau`` of each map's side instead,
dropping the outer part of the projective field (approximate, Krypton's thresholding).

Supported: sequential chains (each layer fed by the previous one) of windowed layers
(convolutions with dilation 1, max and average pooling, the latter with VALID padding),
zero padding and pointwise layers (the layer types' ``window``, ``border`` and
``pointwise`` traits); anything else (Flatten, Dense, global pooling ...) is where the
full computation takes over. Other graphs raise a clear error.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convlens.errors import ConvlensError
from convlens.models.network import Model

SWITCH_FRACTION = 0.5  # compute in full once a region covers this much of its map


@dataclasses.dataclass(frozen=True)
class Stage:
    """One layer run incrementally.

    Attributes:
      name, cls: the layer.
      kind: ``window``, ``pointwise`` or ``pad``.
      region: ``(rh, rw)`` size of the updated region of the layer's output.
      offsets: ``[P, 2]`` where that region starts, per patch position.
      canvas, margin_lo, window: input canvas size, its margin before the window, and the
        input window the region needs (``window`` kind).
      canvas_starts, rel: ``[P, 2]`` canvas start in the padded input, and where the
        previous region sits in the canvas.
      pads: ``((top, bottom), (left, right))`` padding of the input (incl. margins).
      fill: value of the padding (0, or -inf before max pooling).
    """

    name: str
    cls: str
    kind: str
    region: tuple[int, int]
    offsets: np.ndarray
    canvas: tuple[int, int] = (0, 0)
    margin_lo: tuple[int, int] = (0, 0)
    window: tuple[int, int] = (0, 0)
    canvas_starts: np.ndarray | None = None
    rel: np.ndarray | None = None
    pads: tuple = ((0, 0), (0, 0))
    fill: float = 0.0


def chain(model: Model, prefix: bool = False) -> list:
    """The model's layers as a sequential chain, or a clear error. ``prefix``: instead of
    an error, the longest sequential run of layers from the input after which the rest
    of the network reads nothing but the run's last layer (ResNet50: its stem, up to
    ``pool1_pool``), so the rest can be run from that layer (`Model.head`)."""
    nodes = model.graph.nodes
    for k, (prev, node) in enumerate(zip(nodes, nodes[1:])):
        if node.inputs != (prev.name,):
            if prefix:
                return _cut(nodes, k)
            raise ConvlensError(
                f"incremental occlusion needs a sequential chain of layers (VGG, the small convnet); in "
                f"{model.name!r}, layer {node.name!r} ({node.cls}) takes {', '.join(node.inputs) or 'no input'} "
                f"instead of {prev.name!r}: run occlusion without incremental")
    return list(nodes[1:])


def _cut(nodes, end: int) -> list:
    """``nodes[1 : k + 1]`` for the largest ``k <= end`` such that no node after ``k``
    reads a node before it."""
    pos = {n.name: i for i, n in enumerate(nodes)}
    last_read = [0] * len(nodes)
    for i, n in enumerate(nodes):
        for name in n.inputs:
            last_read[pos[name]] = max(last_read[pos[name]], i)
    best, reach = 0, 0
    for k in range(1, end + 1):
        reach = max(reach, last_read[k - 1])  # the latest reader of any node before k
        if reach <= k:
            best = k
    return list(nodes[1:best + 1])


def _window_params(node, in_hw):
    lt = node.layer_type
    if lt.window is None:
        return None
    k, s, padding, dilation = lt.window(node.config)
    if tuple(dilation) != (1, 1):
        return None
    if lt.border == "count" and padding == "SAME":
        return None  # its border divisor counts real pixels only: not a plain window op
    pads = lax.padtype_to_pads(in_hw, k, s, padding)
    return tuple(k), tuple(s), tuple(tuple(p) for p in pads)


def _affected(a, r_in, k, s, lo, d_out):
    """Output index range [o_lo, o_hi] touched by input rows [a, a + r_in)."""
    o_lo = np.maximum(-(-(a + lo - k + 1) // s), 0)
    o_hi = np.minimum((a + r_in - 1 + lo) // s, d_out - 1)
    return o_lo, o_hi


def plan(model: Model, size: tuple[int, int], window: tuple[int, int], starts_y, starts_x, tau: float = 1.0,
         prefix: bool = False):
    """The stages run incrementally for patches at ``starts`` (every (y, x) pair, row-major),
    and the layer after which the full computation takes over (``prefix``: see `chain`).

    Returns:
      ``(stages, input_region, input_offsets)``.
    """
    shapes = model.output_shapes(1, size)
    h, w = size
    r0 = (min(window[0], h), min(window[1], w))
    oy = np.clip(np.repeat(starts_y, len(starts_x)), 0, h - r0[0])
    ox = np.clip(np.tile(starts_x, len(starts_y)), 0, w - r0[1])
    off = np.stack([oy, ox], 1)
    region = r0
    stages = []
    prev_hw = (h, w)
    for node in chain(model, prefix):
        out_shape = shapes[node.name]
        if len(out_shape) != 4:
            break
        d_out = out_shape[1:3]
        if node.layer_type.pointwise:
            stages.append(Stage(node.name, node.cls, "pointwise", region, off))
            continue
        if node.kind == "pad":
            (t, _), (left, _) = node.config["padding"]
            stages.append(Stage(node.name, node.cls, "pad", region, off + np.array([t, left])))
            off = stages[-1].offsets
            prev_hw = d_out
            continue
        wp = _window_params(node, prev_hw)
        if wp is None:
            break
        k, s, pads = wp
        new_region, new_off, canvas, m_lo, win, cstart, rel, full_pads = [], [], [], [], [], [], [], []
        for ax in range(2):
            lo = pads[ax][0]
            o_lo, o_hi = _affected(off[:, ax], region[ax], k[ax], s[ax], lo, d_out[ax])
            r = int((o_hi - o_lo + 1).max())
            if tau < 1.0:
                cap = max(1, math.ceil(tau * d_out[ax]))
                if r > cap:  # keep the centre of the projective field
                    centre = (o_lo + o_hi) // 2
                    o_lo = centre - cap // 2
                    r = cap
            r = min(r, d_out[ax])
            start = np.clip(o_lo, 0, d_out[ax] - r)
            wlen = (r - 1) * s[ax] + k[ax]
            rel_raw = off[:, ax] + lo - start * s[ax]  # previous region in window coordinates
            mlo = int(max(0, -rel_raw.min()))
            mhi = int(max(0, (rel_raw + region[ax]).max() - wlen))
            new_region.append(r)
            new_off.append(start)
            canvas.append(mlo + wlen + mhi)
            m_lo.append(mlo)
            win.append(wlen)
            cstart.append(start * s[ax])
            rel.append(rel_raw + mlo)
            full_pads.append((lo + mlo, pads[ax][1] + mhi))
        if new_region[0] * new_region[1] >= SWITCH_FRACTION * d_out[0] * d_out[1] and tau >= 1.0:
            break
        if tau < 1.0 and new_region[0] >= d_out[0] and new_region[1] >= d_out[1]:
            break
        off = np.stack(new_off, 1)
        region = tuple(new_region)
        stages.append(Stage(node.name, node.cls, "window", region, off, tuple(canvas), tuple(m_lo), tuple(win),
                            np.stack(cstart, 1), np.stack(rel, 1), tuple(full_pads),
                            -np.inf if node.layer_type.border == "-inf" else 0.0))
        prev_hw = d_out
    return stages, r0, np.stack([oy, ox], 1)


def _valid_apply(model: Model, params, name: str, x):
    """The layer on a window that already holds its padding."""
    node = model.graph.node(name)
    cfg = dict(node.config)
    cfg["padding"] = "VALID"
    v = params.get(name, {})
    return node.layer_type.apply(cfg, v, [x], logits=False)


def _pointwise_apply(model: Model, params, name: str, x):
    node = model.graph.node(name)
    return node.layer_type.apply(node.config, params.get(name, {}), [x], logits=False)


def incremental_logits(model: Model, params, images, base, cfg, rows: np.ndarray, cols: np.ndarray, idx):
    """Logits of occluded images at grid positions ``idx [B, Q]`` (row-major indices,
    per image) -> ``[B, Q, K]``, computed incrementally; equal to the brute-force logits
    when ``tau = 1``."""
    b, h, w, _ = images.shape
    stages, r0, off0 = plan(model, (h, w), cfg.window, rows.argmax(1), cols.argmax(1), cfg.tau)
    x = model.preprocess(images)
    xb = model.preprocess(base)
    names = [s.name for s in stages]
    _, acts = model.apply(params, x, layers=names)
    # Region masks of the input: which pixels of the region each window occludes.
    ry = np.stack([rows[i, o:o + r0[0]] for i, o in zip(np.repeat(np.arange(len(rows)), len(cols)), off0[:, 0])])
    rx = np.stack([cols[j, o:o + r0[1]] for j, o in zip(np.tile(np.arange(len(cols)), len(rows)), off0[:, 1])])
    rmask = ry[:, :, None] & rx[:, None, :]  # [P, r0y, r0x]
    padded = {}
    prev = x
    for st in stages:
        if st.kind == "window":
            padded[st.name] = jnp.pad(prev, ((0, 0), *st.pads, (0, 0)), constant_values=st.fill)
        prev = acts[st.name]
    last = stages[-1].name if stages else None

    def crop(a, starts, size):
        """``a [B, H, W, C]``, ``starts [B, per, 2]`` -> ``[B * per, *size, C]`` (image-major)."""
        out = jax.vmap(lambda img, st_b: jax.vmap(
            lambda st: lax.dynamic_slice(img, (st[0], st[1], 0), (*size, img.shape[-1])))(st_b))(a, starts)
        return out.reshape(-1, *out.shape[2:])

    def paste(canvas, values, at):
        """``values [N, ...]`` into ``canvas [N, ...]`` at ``at [N, 2]``."""
        return jax.vmap(lambda c, v, q: lax.dynamic_update_slice(c, v, (q[0], q[1], 0)))(canvas, values, at)

    from convlens.kernels import common
    # Per position, memory goes to the full part of the network and the regions.
    region_bytes = max([4 * 2 * math.prod(st.canvas or st.region) * acts[st.name].shape[-1] for st in stages] + [1])
    per = common.copies_per_step(cfg.chunk, cfg.memory_mb, b, idx.shape[1], max(region_bytes, common.image_bytes(
        model, (h, w), frozenset([model.graph.input, *names[:-1]]))))
    consts = {"off0": jnp.asarray(off0), "rmask": jnp.asarray(rmask)}
    for st in stages:
        consts[st.name + "/off"] = jnp.asarray(st.offsets)
        if st.kind == "window":
            consts[st.name + "/cstart"] = jnp.asarray(st.canvas_starts)
            consts[st.name + "/rel"] = jnp.asarray(st.rel)

    def flat(a):
        return a.reshape(-1, *a.shape[2:])

    def step(p):  # p [B, per]
        o = consts["off0"][p]
        m = flat(consts["rmask"][p])[..., None]  # [B * per, r0y, r0x, 1]
        region = jnp.where(m, crop(xb, o, r0), crop(x, o, r0))  # the occluded input region
        for st in stages:
            if st.kind == "pointwise":
                region = _pointwise_apply(model, params, st.name, region)
            elif st.kind == "window":
                canv = crop(padded[st.name], consts[st.name + "/cstart"][p], st.canvas)
                canv = paste(canv, region, flat(consts[st.name + "/rel"][p]))
                win = canv[:, st.margin_lo[0]:st.margin_lo[0] + st.window[0],
                           st.margin_lo[1]:st.margin_lo[1] + st.window[1]]
                region = _valid_apply(model, params, st.name, win)
        # Assemble the occluded map where the incremental part ends; the rest runs in full.
        per_ = p.shape[1]
        if last is None:
            full = paste(jnp.repeat(x, per_, axis=0), region, flat(o))
            return model.apply(params, full, logits=True)[0].reshape(b, per_, -1)
        full = paste(jnp.repeat(acts[last], per_, axis=0), region, flat(consts[last + "/off"][p]))
        return model.head(params, full, last, logits=True).reshape(b, per_, -1)

    return common.map_steps(step, idx, per)


def patch_grid(h: int, w: int, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``p x p`` patch grid the curve metrics remove (Quantus's placement: the image
    padded by ``(pad // 2, pad - pad // 2)`` to a multiple of ``p``): ``(index [H, W]``,
    row starts, column starts); patch ``gy * nx + gx`` starts at ``(starts_y[gy],
    starts_x[gx])``, possibly before the image (it is cut at the border)."""
    ph, pw = (-h) % p, (-w) % p
    gy, gx = (np.arange(h) + ph // 2) // p, (np.arange(w) + pw // 2) // p
    nx = (w + pw) // p
    return gy[:, None] * nx + gx[None, :], np.arange((h + ph) // p) * p - ph // 2, np.arange(nx) * p - pw // 2


def patch_curve(model: Model, params, images, fill, order, patch: int):
    """Logits of the images after each step of cumulative patch removal: at step ``s``
    patch ``order[:, s]`` of the `patch_grid` (with every patch of earlier steps) shows
    ``fill``. ``images [B, H, W, C]`` pixels, ``fill [B, 1, 1, 1]`` or ``[B, H, W, C]``,
    ``order [B, S]`` int -> ``[B, S, K]``.

    Step ``s`` differs from step ``s - 1`` only inside one patch, so each step recomputes
    only that patch's cone in each layer (`plan`, as incremental occlusion), on top of the
    previous step's maps, which the loop carries: for each windowed layer its padded input,
    and the map where the full computation takes over. Exact: equal to running the whole
    model on each step's image, to float32 rounding."""
    _, h, w, _ = images.shape
    idx, sy, sx = patch_grid(h, w, patch)
    stages, r0, off0 = plan(model, (h, w), (patch, patch), sy, sx, prefix=True)
    # Which pixels of the input region each patch covers ([P, r0y, r0x]; the region is
    # the patch moved inside the image, so it may hold pixels of its neighbours).
    rmask = np.stack([idx[oy:oy + r0[0], ox:ox + r0[1]] == t for t, (oy, ox) in enumerate(off0)])
    x = model.preprocess(images)
    names = [st.name for st in stages]
    _, acts = model.apply(params, x, layers=names)
    state = {"x": x}
    prev = x
    for st in stages:
        if st.kind == "window":
            state[st.name] = jnp.pad(prev, ((0, 0), *st.pads, (0, 0)), constant_values=st.fill)
        prev = acts[st.name]
    last = names[-1] if names else None
    if last is not None:
        state["last"] = acts[last]
    full_fill = jnp.broadcast_to(model.preprocess(fill), x.shape)  # the fill in the model's input space

    def crop(a, at, size):
        return jax.vmap(lambda img, q: lax.dynamic_slice(img, (q[0], q[1], 0), (*size, img.shape[-1])))(a, at)

    def paste(a, v, at):
        return jax.vmap(lambda img, u, q: lax.dynamic_update_slice(img, u, (q[0], q[1], 0)))(a, v, at)

    off0_j, rmask_j = jnp.asarray(off0), jnp.asarray(rmask)
    offs = {st.name: jnp.asarray(st.offsets) for st in stages}
    cst = {st.name: jnp.asarray(st.canvas_starts + np.asarray(st.margin_lo)) for st in stages if st.kind == "window"}

    def step(state, t):  # t [B]: the patch each item loses at this step
        state = dict(state)
        o = off0_j[t]
        region = jnp.where(rmask_j[t][..., None], crop(full_fill, o, r0), crop(state["x"], o, r0))
        state["x"] = paste(state["x"], region, o)
        at = o
        for st in stages:
            if st.kind == "pointwise":
                region = _pointwise_apply(model, params, st.name, region)
            elif st.kind == "window":
                lo = jnp.asarray([st.pads[0][0], st.pads[1][0]])
                state[st.name] = paste(state[st.name], region, at + lo)
                region = _valid_apply(model, params, st.name, crop(state[st.name], cst[st.name][t], st.window))
            at = offs[st.name][t]
        if last is None:
            return state, model.apply(params, state["x"], logits=True)[0]
        state["last"] = paste(state["last"], region, at)
        return state, model.head(params, state["last"], last, logits=True)

    _, logits = lax.scan(step, state, jnp.asarray(order).T)
    return jnp.moveaxis(logits, 0, 1)


def describe(model: Model, size, cfg, rows, cols) -> list[tuple[str, tuple[int, int], tuple[int, ...]]]:
    """``(layer, region, map size)`` per incremental stage (for benchmarks and docs)."""
    stages, _, _ = plan(model, size, cfg.window, rows.argmax(1), cols.argmax(1), cfg.tau)
    shapes = model.output_shapes(1, size)
    return [(s.name, s.region, shapes[s.name][1:3]) for s in stages]
