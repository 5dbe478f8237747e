"""Pixels in, pixels out: image decoding and fitting to a model's input size.

Below both the kernels (a baseline image) and the engine (every data source): anything
that turns bytes or arrays into RGB uint8 ``[h, w, 3]`` lives here, and nothing here
imports JAX.

Decoding is bounded by what the model needs: a JPEG is decoded at the smallest of
Pillow's draft scales (1/2, 1/4, 1/8) that still covers twice the model's input size,
and any image whose decoded size would exceed ``max_pixels`` fails with its reason before
its pixels are read, so a small file declaring a huge image cannot exhaust memory.
Pillow's decompression-bomb warnings become that per-item failure, never a raw line on the
terminal.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from convlens.errors import ConvlensError, ItemError

RESIZE_POLICIES = ("squash", "crop", "pad")
MIN_SIDE = 8  # smaller images carry no picture worth explaining
# Pixels an item may decode to (40 megapixels: a 7,700x5,200 photo, 120 MB as RGB). Larger
# images fail with their reason; ``--max-pixels`` raises the limit.
MAX_PIXELS = 40_000_000

__all__ = ["ItemError", "MAX_PIXELS", "MIN_SIDE", "RESIZE_POLICIES", "check_images", "decode", "fit", "read_image",
           "to_rgb_uint8"]


def to_rgb_uint8(a: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Any image array (``[h, w]``, ``[h, w, 1|3|4]``; uint8, 16-bit, float 0..1 or
    0..255) as RGB uint8 ``[h, w, 3]``; `ItemError` where that makes no sense.

    ``bits``: the declared bit depth of integer pixels (a 16-bit PNG says 16). Without it
    uint16 arrays are 16-bit, and other integer arrays are 16-bit only if a value exceeds 255.
    """
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ItemError(f"not an image: array of shape {a.shape}")
    if min(a.shape[:2]) == 0:
        raise ItemError(f"empty image ({a.shape[1]}x{a.shape[0]})")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype.kind in "ui":
        if bits is None:
            bits = 16 if (a.dtype == np.uint16 or a.max(initial=0) > 255) else 8
        top = float(2 ** bits - 1)
        return np.clip(np.rint(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ItemError("image has NaN or infinite pixels")
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    raise ItemError(f"unsupported pixel type {a.dtype}")


def _bit_depth(im) -> int:
    """Declared bits per sample of a 16/32-bit integer image (PNG's bit depth, TIFF's
    BitsPerSample), 16 when the file does not say."""
    bits = None
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:  # TIFF BitsPerSample
        v = tags[258]
        bits = int(v[0] if isinstance(v, tuple) else v)
    if bits is None:
        bits = 16
    return max(1, min(bits, 32))


def decode(data: bytes, name: str = "", size: tuple[int, int] | None = None,
           max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 ``[h, w, 3]``, upright (EXIF orientation).

    Args:
      data: the file's bytes.
      name: for messages.
      size: ``(H, W)`` the image will be fitted to; a JPEG is then decoded at a reduced
        scale that still covers twice that size (Pillow's draft mode).
      max_pixels: the most pixels the decoded image may have; larger images fail.

    Raises:
      `ItemError` with the reason (not an image, truncated, too large ...).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ItemError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns on large images; the limit below turns that into the item's reason.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if size is not None and im.format == "JPEG":
                    im.draft("RGB", (max(1, 2 * size[1]), max(1, 2 * size[0])))
                w, h = im.size
                if w * h > max_pixels:
                    raise ItemError(f"image too large: {w}x{h} = {w * h / 1e6:.0f} megapixels (limit "
                                    f"{max_pixels / 1e6:.0f}; raise it with --max-pixels)")
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                    arr = np.asarray(im)
                    if im.mode == "F":
                        return to_rgb_uint8(arr / max(float(np.nanmax(arr, initial=0)), 1e-12))
                    bits = 16 if im.mode.startswith("I;16") else _bit_depth(im)
                    return to_rgb_uint8(arr.astype(np.int64), bits=bits)
                return np.asarray(im.convert("RGB"), np.uint8)
    except ItemError:
        raise
    except UnidentifiedImageError:
        raise ItemError("not an image file (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ItemError(f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, IndexError, TypeError, KeyError,
            ZeroDivisionError, OverflowError, RuntimeError) as e:
        # Pillow's plugins raise many types on damaged files; each is this item's failure.
        raise ItemError(f"cannot decode image: {type(e).__name__}: {e}") from None


def fit(image: np.ndarray, size: tuple[int, int], policy: str = "squash", mask: np.ndarray | None = None):
    """``image`` RGB uint8 ``[h, w, 3]`` at the model's ``size`` ``(H, W)``.

    Policies: ``squash`` resizes to ``size`` ignoring the aspect ratio (Keras's
    ``load_img(target_size=...)``); ``crop`` resizes the shorter side to fit and
    centre-crops; ``pad`` resizes the longer side to fit and pads with black, centred.
    Bilinear filtering (Pillow, antialiased when shrinking). A ``mask`` ``[h, w]`` is
    carried along (nearest neighbour) and returned second when given.
    """
    from PIL import Image

    if policy not in RESIZE_POLICIES:
        raise ConvlensError(f"unknown resize policy {policy!r}; choose {', '.join(RESIZE_POLICIES)}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ItemError(f"image too small ({w}x{h}; at least {MIN_SIDE}x{MIN_SIDE})")
    H, W = size
    im = Image.fromarray(image)
    mk = None if mask is None else Image.fromarray(np.asarray(mask, np.uint8) * 255)

    def resize(img, wh, resample):
        return img if img.size == wh else img.resize(wh, resample)

    if policy == "squash":
        im = resize(im, (W, H), Image.BILINEAR)
        mk = None if mk is None else resize(mk, (W, H), Image.NEAREST)
    elif policy == "crop":
        s = max(H / h, W / w)
        nw, nh = max(W, round(w * s)), max(H, round(h * s))
        box = ((nw - W) // 2, (nh - H) // 2, (nw - W) // 2 + W, (nh - H) // 2 + H)
        im = resize(im, (nw, nh), Image.BILINEAR).crop(box)
        mk = None if mk is None else resize(mk, (nw, nh), Image.NEAREST).crop(box)
    else:
        s = min(H / h, W / w)
        nw, nh = min(W, max(1, round(w * s))), min(H, max(1, round(h * s)))
        canvas = Image.new("RGB", (W, H))
        canvas.paste(resize(im, (nw, nh), Image.BILINEAR), ((W - nw) // 2, (H - nh) // 2))
        im = canvas
        if mk is not None:
            mcanvas = Image.new("L", (W, H))
            mcanvas.paste(resize(mk, (nw, nh), Image.NEAREST), ((W - nw) // 2, (H - nh) // 2))
            mk = mcanvas
    out = np.asarray(im, np.uint8)
    if mask is None:
        return out
    return out, np.asarray(mk) > 127


def read_image(path) -> np.ndarray:
    """An image file's pixels ``[H, W, 3]`` uint8, or a `ConvlensError` naming the file."""
    try:
        with open(path, "rb") as f:
            return decode(f.read(), str(path))
    except (OSError, ItemError) as e:
        raise ConvlensError(f"cannot read the image {path}: {e}") from None


def check_images(model, images) -> np.ndarray:
    """Pixels as float32 ``[B, H, W, C]`` (one image ``[H, W, C]`` is accepted)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ConvlensError(f"images must be [B, H, W, C] (or one [H, W, C]); got shape {x.shape}")
    if len(x) == 0:
        raise ConvlensError("no images given (an empty batch)")
    if x.shape[-1] != model.channels:
        raise ConvlensError(f"images have {x.shape[-1]} channels; model {model.name!r} takes {model.channels} "
                            "(convert grey/RGBA images to RGB)")
    h, w, _ = model.graph.input_shape
    if (h is not None and x.shape[1] != h) or (w is not None and x.shape[2] != w):
        raise ConvlensError(f"images are {x.shape[1]}x{x.shape[2]}; model {model.name!r} takes {h}x{w}: "
                            "resize them first")
    if x.dtype.kind not in "uif":
        raise ConvlensError(f"images must be numeric pixels (0..255), got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ConvlensError("images hold NaN or infinite pixels")
    return x
