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
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convlens.errors import ConvlensError
from convlens.pixels import (MAX_PIXELS, MIN_SIDE, RESIZE_POLICIES, ItemError, decode, fit,  # noqa: F401
                             to_rgb_uint8)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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
    # How encoded images are decoded: the size they will be fitted to (a JPEG is then
    # decoded at a reduced scale) and the most pixels one may have (see `configure`).
    size_hint: tuple[int, int] | None = None
    max_pixels: int = MAX_PIXELS

    def configure(self, size: tuple[int, int] | None = None, max_pixels: int | None = None) -> Source:
        """Sets how images are decoded: ``size`` they will be fitted to, ``max_pixels``."""
        if size is not None:
            self.size_hint = tuple(size)
        if max_pixels is not None:
            self.max_pixels = int(max_pixels)
        return self

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

    def fingerprint(self) -> tuple[np.ndarray | None, dict[str, str]]:
        """What identifies the data cheaply, for ``--resume``: per-item digests ``[N]``
        uint64 (files: size and modification time) or ``None``, and a sample of content
        hashes ``{id: hex}`` (a few items' bytes)."""
        return None, {}


def safe_id(name: str) -> str:
    """An item name that can be stored and printed: bytes of a file name that are not
    UTF-8 (kept by Python as surrogates) become ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _digest(*parts) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return int.from_bytes(h.digest(), "little")


SAMPLE_ITEMS = 32  # items whose bytes are hashed for a data fingerprint
SAMPLE_BYTES = 1 << 16  # ... their first and last 64 KiB


def file_sample_hash(path: Path) -> str:
    """sha256 of a file's size, first and last 64 KiB: a cheap content check."""
    h = hashlib.sha256()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            h.update(str(size).encode())
            h.update(f.read(SAMPLE_BYTES))
            if size > 2 * SAMPLE_BYTES:
                f.seek(-SAMPLE_BYTES, os.SEEK_END)
                h.update(f.read(SAMPLE_BYTES))
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return h.hexdigest()[:16]


def sample_indices(n: int, k: int = SAMPLE_ITEMS) -> np.ndarray:
    return np.unique(np.linspace(0, max(n - 1, 0), min(n, k)).round().astype(int)) if n else np.zeros(0, int)


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
        self.ids = [safe_id(str(p)) for p in self.paths]
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
        img = decode(data, self.ids[i], self.size_hint, self.max_pixels)
        mask = None
        if self.mask_paths is not None and self.mask_paths[i] is not None:
            try:
                m = decode(Path(self.mask_paths[i]).read_bytes(), max_pixels=self.max_pixels)
            except (OSError, ItemError) as e:
                raise ItemError(f"cannot read its mask {self.mask_paths[i]}: {e}") from None
            if m.shape[:2] != img.shape[:2]:
                raise ItemError(f"mask {self.mask_paths[i]} is {m.shape[1]}x{m.shape[0]}, "
                                f"image is {img.shape[1]}x{img.shape[0]}")
            mask = m.max(axis=-1) > 0
        return Item(img, mask)

    def fingerprint(self):
        digests = np.empty(len(self.paths), np.uint64)
        for i, p in enumerate(self.paths):
            try:
                st = p.stat()
                digests[i] = _digest(st.st_size, st.st_mtime_ns)
            except OSError:
                digests[i] = _digest("missing")
        return digests, {self.ids[i]: file_sample_hash(self.paths[i]) for i in sample_indices(len(self.paths))}


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
        shape, dtype = np.shape(images), getattr(images, "dtype", None)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
            raise ConvlensError(f"{description or 'the array'} has shape {list(shape)}: give images [N, H, W, C] "
                                "(C = 1, 3 or 4) or [N, H, W]")
        if dtype is not None and np.dtype(dtype).kind not in "uifb":
            raise ConvlensError(f"{description or 'the array'} holds {dtype}, not pixel values")
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

    def fingerprint(self):
        sample = {}
        for i in sample_indices(len(self.ids)):
            a = np.ascontiguousarray(np.asarray(self.images[i]))
            sample[self.ids[i]] = hashlib.sha256(a.tobytes() + str((a.shape, a.dtype)).encode()).hexdigest()[:16]
        return None, sample


def array_source(path: str | Path) -> ArraySource:
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return ArraySource(np.load(path, mmap_mode="r", allow_pickle=False), description=f"array {path}")
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ConvlensError(f"{path} has no 'images' array (it has: {', '.join(z.files)})")
            get = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError) as e:
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
        img = decode(img, size=self.size_hint, max_pixels=self.max_pixels) if isinstance(img, bytes) \
            else to_rgb_uint8(img)
        mask = None
        if self.mask_key is not None:
            m = rec[self.mask_key]
            m = decode(m, max_pixels=self.max_pixels) if isinstance(m, bytes) else to_rgb_uint8(m)
            mask = m.max(axis=-1) > 0 if m.shape[:2] == img.shape[:2] else None
        label = int(rec[self.label_key]) if self.label_key else None
        return Item(img, mask, label)

    def fingerprint(self):
        sample = {}
        for i in sample_indices(len(self.ids)):
            try:
                img = self.ds[i][self.image_key]
                data = img if isinstance(img, bytes) else np.asarray(img).tobytes()
                sample[self.ids[i]] = hashlib.sha256(data).hexdigest()[:16]
            except Exception as e:  # noqa: BLE001 - a damaged record is part of the data's identity
                sample[self.ids[i]] = f"unreadable: {type(e).__name__}"
        return None, sample


# ---------------------------------------------------------------- entry point

def open_source(specs: str | Sequence[str], *, data_dir: str | None = None, masks: str | None = None,
                every: int | None = None, max_pixels: int | None = None) -> Source:
    """A `Source` from a command-line spec (see the module docstring) or a list of files;
    video files give a `convlens.engine.video.VideoSource` of every ``every``-th frame."""
    return _open_source(specs, data_dir=data_dir, masks=masks, every=every).configure(max_pixels=max_pixels)


def _open_source(specs, *, data_dir, masks, every) -> Source:
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
        return fit(decode(Path(path).read_bytes(), str(path), size), size, resize)
    except (ItemError, OSError) as e:
        raise ConvlensError(f"cannot read image {path}: {e}") from None


def load_images(specs: list[str], size: tuple[int, int], resize: str = "squash") -> tuple[np.ndarray, list[str]]:
    """``(pixels [N, H, W, 3] uint8, ids)`` for the files the specs name (all must be good)."""
    paths = expand(specs)
    return np.stack([load_image(p, size, resize) for p in paths]), [str(p) for p in paths]


def files_source(specs) -> Source:
    """A few files, folders or globs (``convlens explain``): a `FileSource`, or the frames
    of video files."""
    from convlens.engine import video
    files = expand(list(specs))
    return open_source(files) if any(video.is_video(f) for f in files) else FileSource(files)
