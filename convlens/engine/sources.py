"""Data sources: anything convlens explains, as N items of (RGB uint8 image, id, label).

A source spec on the command line is one of

* ``tfds:NAME[/CONFIG][:SPLIT[slice]]`` — a TFDS data set already prepared in
  ``--data-dir`` (or ``$TFDS_DATA_DIR``, or ``~/tensorflow_datasets``) in the
  ``array_record`` format, read through ``tfds.data_source`` (no TensorFlow; never a
  download);
* a folder: ``root/<class_name>/*.jpg`` gives labels from the folder names (sorted, as
  Keras's ``image_dataset_from_directory``), a flat folder gives no labels;
* image files and globs;
* a ``.npy`` file of images ``[N, H, W, C]``, or an ``.npz`` with ``images`` (and
  optionally ``labels``, ``ids``, ``masks``);
* video files (``.mp4``, ``.mov``, ``.avi``, ``.mkv``, ``.webm`` ...): every frame, or
  every N-th, is an item (`convlens.engine.video`).

Items are read lazily (`Source.read`) so the engine can decode them in a thread pool
while the device works. A bad item raises `ItemError` with the reason; the engine marks
it failed and goes on. Every image is converted to RGB uint8 (grey, palette, RGBA,
CMYK, 16-bit), upright (EXIF orientation), and fitted to the model's input size by an
explicit policy (`fit`).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convlens.errors import ConvlensError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
RESIZE_POLICIES = ("squash", "crop", "pad")
MIN_SIDE = 8  # smaller images carry no picture worth explaining
MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit (2x its warning threshold)


class ItemError(Exception):
    """One item cannot be used (unreadable, not an image, too small ...): the reason."""


@dataclasses.dataclass
class Item:
    """One decoded item: ``image`` RGB uint8 ``[h, w, 3]`` at its own size, an optional
    object ``mask`` bool ``[h, w]`` aligned with it, and its ``label`` where the source
    learns it only on reading (TFDS records)."""

    image: np.ndarray
    mask: np.ndarray | None = None
    label: int | None = None


class Source:
    """N items with ids and labels; `read` decodes one (thread-safe).

    Attributes:
      description: what the source is (recorded in the store).
      ids: ``N`` item names (file paths, ``name/split/index``, array indices).
      labels: ``[N]`` int32 class indices, -1 where unknown.
      class_names: the data set's label names, or ``None``.
      has_masks: whether items carry object masks.
    """

    description: str = ""
    ids: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...] | None = None
    has_masks: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int) -> Item:
        raise NotImplementedError

    def store_arrays(self) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """Per-item arrays the store keeps besides ids and labels (``{name: (values [N], dims)}``)."""
        return {}

    def store_attrs(self) -> dict:
        """Root attributes the store keeps about the source."""
        return {}

    def close(self) -> None:
        """Releases open files (a video's decoder)."""


# ---------------------------------------------------------------- pixels

def to_rgb_uint8(a: np.ndarray) -> np.ndarray:
    """Any image array (``[h, w]``, ``[h, w, 1|3|4]``; uint8, 16-bit, float 0..1 or
    0..255) as RGB uint8 ``[h, w, 3]``; `ItemError` where that makes no sense."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ItemError(f"not an image: array of shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind in "ui":
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        return np.clip(np.rint(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ItemError("image has NaN or infinite pixels")
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    raise ItemError(f"unsupported pixel type {a.dtype}")


def decode(data: bytes, name: str = "") -> np.ndarray:
    """Encoded image bytes -> RGB uint8, upright. Raises `ItemError`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ItemError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ItemError(f"image too large ({im.width}x{im.height} pixels)")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                arr = np.asarray(im)
                if im.mode == "F":
                    arr = arr / max(float(arr.max(initial=0)), 1e-12)
                return to_rgb_uint8(arr if im.mode == "F" else arr.astype(np.int64))
            return np.asarray(im.convert("RGB"), np.uint8)
    except ItemError:
        raise
    except UnidentifiedImageError:
        raise ItemError("not an image file (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ItemError(f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ItemError(f"cannot decode image: {e}") from None


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


# ---------------------------------------------------------------- files and folders

def expand(specs: Sequence[str]) -> list[Path]:
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


class FileSource(Source):
    """Image files; labels from class folders, masks from a parallel mask folder.

    Args:
      paths: the files, in order.
      labels, class_names: optional.
      mask_paths: per file, a mask image (non-zero = object) or ``None``.
    """

    def __init__(self, paths: Sequence[Path], labels=None, class_names=None, mask_paths=None,
                 description: str = ""):
        self.paths = [Path(p) for p in paths]
        self.ids = [str(p) for p in self.paths]
        self.labels = (np.full(len(self.paths), -1, np.int32) if labels is None
                       else np.asarray(labels, np.int32))
        self.class_names = None if class_names is None else tuple(class_names)
        self.mask_paths = mask_paths
        self.has_masks = mask_paths is not None
        self.description = description or f"{len(self.paths)} image files"

    def read(self, i: int) -> Item:
        try:
            data = self.paths[i].read_bytes()
        except OSError as e:
            raise ItemError(f"cannot read file: {e.strerror or e}") from None
        img = decode(data, self.ids[i])
        mask = None
        if self.mask_paths is not None and self.mask_paths[i] is not None:
            try:
                m = decode(Path(self.mask_paths[i]).read_bytes())
            except (OSError, ItemError) as e:
                raise ItemError(f"cannot read its mask {self.mask_paths[i]}: {e}") from None
            if m.shape[:2] != img.shape[:2]:
                raise ItemError(f"mask {self.mask_paths[i]} is {m.shape[1]}x{m.shape[0]}, "
                                f"image is {img.shape[1]}x{img.shape[0]}")
            mask = m.max(axis=-1) > 0
        return Item(img, mask)


def folder_source(root: str | Path, masks: str | Path | None = None) -> FileSource:
    """A folder: ``root/<class>/*`` (labelled, classes sorted by name) or a flat tree.

    ``masks``: a folder with the same relative paths (any image suffix) holding object
    masks; items without one have no mask."""
    root = Path(root)
    files = expand([str(root)])
    direct = [f for f in files if f.parent == root]
    subdirs = sorted({f.relative_to(root).parts[0] for f in files if f.parent != root})
    labels = names = None
    if not direct and subdirs:
        names = subdirs
        index = {n: i for i, n in enumerate(names)}
        labels = [index[f.relative_to(root).parts[0]] for f in files]
    mask_paths = None
    if masks is not None:
        mroot = Path(masks)
        if not mroot.is_dir():
            raise ConvlensError(f"mask folder {mroot} does not exist")
        by_stem = {}
        for m in expand([str(mroot)]):
            by_stem[m.relative_to(mroot).with_suffix("").as_posix()] = m
        mask_paths = [by_stem.get(f.relative_to(root).with_suffix("").as_posix()) for f in files]
        if not any(mask_paths):
            raise ConvlensError(f"no mask in {mroot} matches an image of {root} (same relative path, any suffix)")
    desc = f"folder {root} ({len(files)} images" + (f", {len(names)} classes)" if names else ")")
    return FileSource(files, labels, names, mask_paths, desc)


# ---------------------------------------------------------------- arrays

class ArraySource(Source):
    """Images held in memory: ``[N, H, W, C]`` (any dtype `to_rgb_uint8` takes)."""

    def __init__(self, images, labels=None, ids=None, class_names=None, masks=None, description=""):
        self.images = images
        n = len(images)
        self.ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(self.ids) != n:
            raise ConvlensError(f"{len(self.ids)} ids for {n} images")
        self.labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32).reshape(-1)
        if len(self.labels) != n:
            raise ConvlensError(f"{len(self.labels)} labels for {n} images")
        self.class_names = None if class_names is None else tuple(class_names)
        self.masks = masks
        self.has_masks = masks is not None
        self.description = description or f"array of {n} images"

    def read(self, i: int) -> Item:
        mask = None if self.masks is None else np.asarray(self.masks[i]).astype(bool).reshape(
            np.shape(self.masks[i])[:2])
        return Item(to_rgb_uint8(self.images[i]), mask)


def array_source(path: str | Path) -> ArraySource:
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return ArraySource(np.load(path, mmap_mode="r"), description=f"array {path}")
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ConvlensError(f"{path} has no 'images' array (it has: {', '.join(z.files)})")
            get = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConvlensError(f"cannot read {path}: {e}") from None
    return ArraySource(get["images"], get.get("labels"), get.get("ids"), masks=get.get("masks"),
                       description=f"arrays {path}")


# ---------------------------------------------------------------- TFDS

TFDS_SPEC = re.compile(r"tfds:(?P<name>[\w.-]+)(?:/(?P<config>[\w.-]+))?(?::(?P<split>.+))?$")


def tfds_data_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets").expanduser()


def _version_key(v: str):
    return tuple(int(p) if p.isdigit() else -1 for p in v.split("."))


def find_prepared(name: str, config: str | None, data_dir: str | None) -> Path:
    """The folder of the newest prepared version of a TFDS data set, found on disk alone
    (no registry lookup, no network), or a clear error."""
    root = tfds_data_dir(data_dir)
    base = root / name / config if config else root / name
    if not base.is_dir():
        raise ConvlensError(
            f"TFDS data set {name}{'/' + config if config else ''} is not prepared in {root} (no folder {base}); "
            "convlens never downloads: prepare it where there is network (`tfds build "
            f"{name} --file_format=array_record`) and copy it there, or point --data-dir at it")
    versions = sorted((d for d in base.iterdir() if (d / "dataset_info.json").is_file()),
                      key=lambda d: _version_key(d.name))
    if not versions:
        configs = [d.name for d in base.iterdir() if d.is_dir()]
        hint = f" (configs found: {', '.join(configs)}; use tfds:{name}/CONFIG)" if configs and not config else ""
        raise ConvlensError(f"{base} holds no prepared version (no dataset_info.json){hint}")
    return versions[-1]


class TfdsSource(Source):
    """A prepared TFDS data set read through ``tfds`` data sources (array_record)."""

    def __init__(self, spec: str, data_dir: str | None = None):
        m = TFDS_SPEC.match(spec)
        if not m:
            raise ConvlensError(f"{spec!r} is not tfds:NAME[/CONFIG][:SPLIT[slice]] (e.g. tfds:cats_vs_dogs:train[:500])")
        name, config, split = m["name"], m["config"], m["split"] or "train"
        vdir = find_prepared(name, config, data_dir)
        base_split = split.split("[")[0]
        if not any(vdir.glob(f"*-{base_split}.array_record*")):
            if any(vdir.glob(f"*-{base_split}.tfrecord*")):
                raise ConvlensError(f"{vdir} holds split {base_split!r} as tfrecord; convlens reads array_record "
                                    f"(rebuild with `tfds build {name} --file_format=array_record`)")
            have = sorted({p.name.split("-")[1].split(".")[0] for p in vdir.glob("*.array_record*")
                           if "-" in p.name})
            raise ConvlensError(f"{name} has no split {base_split!r} in {vdir}; splits: {', '.join(have) or 'none'}")
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder_from_directory(str(vdir))
        except Exception as e:  # noqa: BLE001 - tfds raises many types for a bad folder
            raise ConvlensError(f"cannot open {spec} in {vdir}: {e}") from None
        feats = builder.info.features
        images = [k for k, f in feats.items() if isinstance(f, tfds.features.Image) and f.shape[-1] in (None, 1, 3, 4)
                  and not re.search("mask|segment", k)]
        if not images:
            raise ConvlensError(f"{name} has no image feature (features: {', '.join(feats.keys())})")
        self.image_key = "image" if "image" in images else images[0]
        labels = [k for k, f in feats.items() if isinstance(f, tfds.features.ClassLabel)]
        self.label_key = "label" if "label" in labels else (labels[0] if labels else None)
        masks = [k for k, f in feats.items() if isinstance(f, tfds.features.Image) and re.search("mask|segment", k)]
        self.mask_key = masks[0] if masks else None
        self.has_masks = self.mask_key is not None
        # Raw bytes, decoded by convlens: one decoder (Pillow, EXIF-aware) and a failed item
        # instead of an exception for a damaged image.
        skip = {k: tfds.decode.SkipDecoding() for k in (self.image_key, self.mask_key) if k}
        try:
            self.ds = builder.as_data_source(split=split, decoders=skip)
        except Exception as e:  # noqa: BLE001 - tfds raises many types for a bad split
            raise ConvlensError(f"cannot open {spec} in {vdir}: {e}") from None
        n = len(self.ds)
        self.ids = [f"{name}/{split}/{i}" for i in range(n)]
        self.class_names = tuple(feats[self.label_key].names) if self.label_key else None
        # Labels arrive with each record (reading them all up front would decode every image).
        self.labels = np.full(n, -1, np.int32)
        self.description = f"tfds {name}{'/' + config if config else ''} {split} ({vdir.name}, {n} items)"

    def read(self, i: int) -> Item:
        try:
            rec = self.ds[i]
        except Exception as e:  # noqa: BLE001 - a damaged record must not stop the run
            raise ItemError(f"cannot read record: {e}") from None
        img = rec[self.image_key]
        img = decode(img) if isinstance(img, bytes) else to_rgb_uint8(img)
        mask = None
        if self.mask_key is not None:
            m = rec[self.mask_key]
            m = decode(m) if isinstance(m, bytes) else to_rgb_uint8(m)
            mask = m.max(axis=-1) > 0 if m.shape[:2] == img.shape[:2] else None
        label = int(rec[self.label_key]) if self.label_key else None
        return Item(img, mask, label)


# ---------------------------------------------------------------- entry point

def open_source(specs: str | Sequence[str], *, data_dir: str | None = None, masks: str | None = None,
                every: int | None = None) -> Source:
    """A `Source` from a command-line spec (see the module docstring) or a list of files;
    video files give a `convlens.engine.video.VideoSource` of every ``every``-th frame."""
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    if not specs:
        raise ConvlensError("no data given")
    from convlens.engine import video
    first = str(specs[0])
    vids = [video.is_video(s) for s in specs]
    if any(vids):
        if not all(vids):
            raise ConvlensError("give either video files or images as --data, not both (run them separately)")
        if masks:
            raise ConvlensError("--masks applies to image folders, not to video")
        return video.VideoSource([str(s) for s in specs], 1 if every is None else every)
    if every not in (None, 1):
        raise ConvlensError("--every applies to video files (.mp4, .mov, .avi, .mkv, .webm ...)")
    if len(specs) == 1 and first.startswith("tfds:"):
        if masks:
            raise ConvlensError("--masks applies to image folders; a TFDS data set brings its own mask feature")
        return TfdsSource(first, data_dir)
    if len(specs) == 1 and Path(first).suffix in (".npy", ".npz"):
        if not Path(first).is_file():
            raise ConvlensError(f"{first}: no such file")
        return array_source(first)
    if len(specs) == 1 and Path(first).is_dir():
        return folder_source(first, masks)
    if masks:
        raise ConvlensError("--masks needs a single image folder as --data")
    return FileSource(expand([str(s) for s in specs]))


# ---------------------------------------------------------------- eager helpers (small inputs)

def load_image(path: Path, size: tuple[int, int], resize: str = "squash") -> np.ndarray:
    """One image file as RGB uint8 ``[H, W, 3]`` at ``size``; a `ConvlensError` if bad."""
    try:
        return fit(decode(Path(path).read_bytes()), size, resize)
    except (ItemError, OSError) as e:
        raise ConvlensError(f"cannot read image {path}: {e}") from None


def load_images(specs: list[str], size: tuple[int, int], resize: str = "squash") -> tuple[np.ndarray, list[str]]:
    """``(pixels [N, H, W, 3] uint8, ids)`` for the files the specs name (all must be good)."""
    paths = expand(specs)
    return np.stack([load_image(p, size, resize) for p in paths]), [str(p) for p in paths]
