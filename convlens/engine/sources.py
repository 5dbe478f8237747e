"""Image inputs for the command line: files, folders and globs -> uint8 pixels.

(The data-set engine grows this into TFDS, folders with labels and arrays, with bad
files marked failed instead of stopping the run.)
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from convlens.errors import ConvlensError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def expand(specs: list[str]) -> list[Path]:
    """Files named directly, every image below a folder (sorted), or glob matches."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise ConvlensError(f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                raise ConvlensError(f"{spec}: no such file, folder or matching files")
            out += matches
    if not out:
        raise ConvlensError("no images given")
    return out


def load_image(path: Path, size: tuple[int, int], resize: str = "squash") -> np.ndarray:
    """One image as RGB uint8 ``[H, W, 3]`` at ``size`` (grey, palette, RGBA, CMYK and
    16-bit images are converted; ``squash`` resizes without keeping the aspect ratio,
    ``crop`` resizes the shorter side then centre-crops)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, np.float64)
                im = Image.fromarray((255 * a / max(a.max(), 1)).astype(np.uint8))
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConvlensError(f"cannot read image {path}: {e}") from None
    h, w = size
    if resize == "crop":
        scale = max(h / im.height, w / im.width)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
        left, top = (im.width - w) // 2, (im.height - h) // 2
        im = im.crop((left, top, left + w, top + h))
    elif resize == "squash":
        im = im.resize((w, h), Image.BILINEAR)
    else:
        raise ConvlensError(f"unknown resize policy {resize!r}: squash or crop")
    return np.asarray(im, np.uint8)


def load_images(specs: list[str], size: tuple[int, int], resize: str = "squash") -> tuple[np.ndarray, list[str]]:
    """``(pixels [N, H, W, 3] uint8, ids)`` for the files the specs name."""
    paths = expand(specs)
    return np.stack([load_image(p, size, resize) for p in paths]), [str(p) for p in paths]
