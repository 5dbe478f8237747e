"""Pixels for the renderer: tiles, grids, colour maps, overlays and text, in numpy and
Pillow (no JAX), so every picture is a plain uint8 array a test can inspect.

Conventions: images are ``[H, W, 3]`` uint8; maps are ``[H, W]`` floats.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

BG = 255  # page background
MARGIN = 4


@functools.lru_cache(maxsize=8)
def font(size: int = 12):
    # Matplotlib's DejaVu Sans: Pillow's built-in font has no dashes, ellipses or accents.
    from PIL import ImageFont
    try:
        import matplotlib
        return ImageFont.truetype(f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf", size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_bar(width: int, text: str, height: int = 18, size: int = 12, bg: int = BG) -> np.ndarray:
    """A strip of ``width`` pixels with ``text`` (cut to fit) on it."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (max(width, 1), height), (bg, bg, bg))
    d = ImageDraw.Draw(im)
    f = font(size)
    while text and d.textlength(text, font=f) > width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    d.text((2, (height - size) // 2 - 1), text, fill=(20, 20, 20), font=f)
    return np.asarray(im)


def upscale(tile: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour enlargement of small tiles (pixels stay sharp and countable)."""
    h, w = tile.shape[:2]
    k = max(1, -(-min_side // max(1, min(h, w))))
    return np.repeat(np.repeat(tile, k, axis=0), k, axis=1) if k > 1 else tile


def as_rgb(tile: np.ndarray) -> np.ndarray:
    return np.repeat(tile[..., None], 3, axis=-1) if tile.ndim == 2 else tile


def grid(tiles, per_row: int, labels=None, margin: int = MARGIN, label_height: int = 14) -> np.ndarray:
    """Tiles of one size in rows of ``per_row``, ``margin`` pixels apart, each with an
    optional label under it. Tile ``i`` sits at row ``i // per_row``, column
    ``i % per_row``: its top-left pixel is ``(margin + r * (h + margin + lh), margin + c * (w + margin))``
    with ``lh`` the label height (0 without labels)."""
    tiles = [as_rgb(t) for t in tiles]
    h, w = tiles[0].shape[:2]
    lh = label_height if labels is not None else 0
    rows = -(-len(tiles) // per_row)
    cols = min(per_row, len(tiles))
    out = np.full((margin + rows * (h + margin + lh), margin + cols * (w + margin), 3), BG, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, per_row)
        y, x = margin + r * (h + margin + lh), margin + c * (w + margin)
        out[y:y + h, x:x + w] = t
        if labels is not None:
            out[y + h:y + h + lh, x:x + w] = text_bar(w, str(labels[i]), lh, size=10)
    return out


def titled(img: np.ndarray, title: str, height: int = 20) -> np.ndarray:
    return np.concatenate([text_bar(img.shape[1], title, height, size=13), img], axis=0)


def hstack(images, gap: int = MARGIN) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    parts = []
    for k, im in enumerate(images):
        if im.shape[0] < h:
            im = np.concatenate([im, np.full((h - im.shape[0], *im.shape[1:]), BG, np.uint8)])
        parts.append(im)
        if k < len(images) - 1:
            parts.append(np.full((h, gap, 3), BG, np.uint8))
    return np.concatenate(parts, axis=1)


def vstack(images, gap: int = MARGIN) -> np.ndarray:
    w = max(i.shape[1] for i in images)
    parts = []
    for k, im in enumerate(images):
        if im.shape[1] < w:
            im = np.concatenate([im, np.full((im.shape[0], w - im.shape[1], 3), BG, np.uint8)], axis=1)
        parts.append(im)
        if k < len(images) - 1:
            parts.append(np.full((gap, w, 3), BG, np.uint8))
    return np.concatenate(parts, axis=0)


def standardise(channel: np.ndarray) -> np.ndarray:
    """*Deep Learning with Python*'s feature-map display: mean 0, std scaled to 64, +128,
    clipped to 0..255 (a constant channel shows as mid-grey)."""
    x = channel.astype(np.float64) - channel.mean()
    sd = x.std()
    if sd > 0:
        x = x / sd
    return np.clip(x * 64 + 128, 0, 255).astype(np.uint8)


def normalise(heat: np.ndarray) -> np.ndarray:
    """A map to [0, 1] (float32): divided by its maximum when non-negative (Grad-CAM),
    min-max otherwise (signed maps); an empty or NaN map becomes zeros."""
    h = np.nan_to_num(np.asarray(heat, np.float32))
    lo, hi = float(h.min()), float(h.max())
    if lo >= 0:
        return h * np.float32(1.0 / hi) if hi > 0 else np.zeros_like(h)
    return (h - np.float32(lo)) * np.float32(1.0 / (hi - lo)) if hi > lo else np.zeros_like(h)


@functools.lru_cache(maxsize=16)
def colour_table(cmap: str = "jet") -> np.ndarray:
    """A matplotlib colour map as 256 RGB uint8 entries (built once per map: video frames
    are coloured at stream rate)."""
    import matplotlib
    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def colour(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Values in [0, 1] ``[H, W]`` -> RGB uint8 through a matplotlib colour map."""
    v = np.asarray(values, np.float32) * np.float32(255)
    return np.take(colour_table(cmap), np.clip(np.rint(v), 0, 255).astype(np.uint8), axis=0)


def resize_map(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if heat.shape == tuple(size):
        return heat
    from PIL import Image
    return np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BILINEAR))


def overlay(image: np.ndarray, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5, style: str = "blend",
            threshold: float = 0.2) -> np.ndarray:
    """``heat`` resized to ``image``, colour-mapped and blended on it.

    ``style="blend"``: alpha-blend on the image. ``style="camshow"`` (as MATLAB's
    ``CAMshow``): on a darkened grey copy of the image, coloured only where the
    normalised map exceeds ``threshold``."""
    if style not in ("blend", "camshow"):
        raise ValueError(f"unknown overlay style {style!r}: blend or camshow")
    h = normalise(resize_map(heat, image.shape[:2]))
    col = colour(h, cmap).astype(np.uint16)
    # Fixed-point blending (alpha in 1/256 steps, within one level of the float result):
    # 15x faster, which live video at stream rate needs.
    a = int(round(float(np.clip(alpha, 0.0, 1.0)) * 256))
    if style == "camshow":
        grey = (image.astype(np.uint32).sum(axis=-1) * 10923 >> 16).astype(np.uint16)  # mean / 2
        base = np.repeat(grey[..., None], 3, axis=-1)
        out = (base * (256 - a) + col * a + 128) >> 8
        return np.where((h > threshold)[..., None], out, base).astype(np.uint8)
    return ((image.astype(np.uint16) * (256 - a) + col * a + 128) >> 8).astype(np.uint8)


def save_png(img: np.ndarray, path) -> Path:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, optimize=False, compress_level=3)
    return path
