"""Data sources: every kind of input becomes RGB uint8 at the model's size, or a reason."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from convlens.engine import sources
from convlens.engine.sources import ItemError
from convlens.errors import ConvlensError


def png_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_fit_policies_put_pixels_where_expected():
    # A 40x80 image (h x w): left half red, right half blue.
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :40, 0] = 255
    img[:, 40:, 2] = 255
    sq = sources.fit(img, (20, 20), "squash")
    assert sq.shape == (20, 20, 3) and sq[10, 2, 0] == 255 and sq[10, 17, 2] == 255
    cr = sources.fit(img, (20, 20), "crop")  # scaled to 20x40, centre 20 columns: 10 red, 10 blue
    assert cr[10, 2, 0] == 255 and cr[10, 17, 2] == 255 and cr[10, 2, 2] == 0
    pd = sources.fit(img, (20, 20), "pad")  # scaled to 10x20, black bands above and below
    assert (pd[:4] == 0).all() and (pd[-4:] == 0).all()
    assert pd[10, 2, 0] == 255 and pd[10, 17, 2] == 255
    # The mask follows the same geometry.
    mask = np.zeros((40, 80), bool)
    mask[:, 60:] = True
    _, m = sources.fit(img, (20, 20), "pad", mask)
    assert m[10, 18] and not m[10, 2] and not m[0, 18]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1", "LA"])
def test_decode_converts_modes_to_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray((np.random.default_rng(1).random((30, 20)) * 65535).astype(np.uint16))
    else:
        im = rgb.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = sources.decode(png_bytes(im, format=fmt))
    assert out.shape == (30, 20, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out.max() > 200  # scaled from 16 bits, not clipped to black/white
    if mode == "RGBA":
        np.testing.assert_array_equal(out, np.asarray(rgb))


def test_decode_applies_exif_orientation():
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = sources.decode(png_bytes(img, format="JPEG", exif=exif.tobytes()))
    assert out.shape == (30, 10, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, not an image", "not an image file"),
    (None, "cannot decode image"),  # truncated PNG
])
def test_decode_bad_bytes(data, reason):
    if data is None:
        data = png_bytes(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7))[:60]
    with pytest.raises(ItemError, match=reason):
        sources.decode(data)


def test_tiny_images_fail_and_arrays_convert():
    with pytest.raises(ItemError, match="too small"):
        sources.fit(np.zeros((4, 100, 3), np.uint8), (32, 32))
    assert sources.to_rgb_uint8(np.ones((5, 5), np.float32)).max() == 255  # 0..1 floats
    assert sources.to_rgb_uint8(np.full((5, 5, 1), 300, np.int32)).max() == 1  # 16-bit range
    with pytest.raises(ItemError, match="not an image"):
        sources.to_rgb_uint8(np.zeros((5, 5, 7)))
    with pytest.raises(ItemError, match="NaN"):
        sources.to_rgb_uint8(np.full((5, 5, 3), np.nan))


def test_folder_labels_from_class_folders(folder):
    src = sources.open_source(str(folder))
    assert src.class_names == ("cats", "dogs")
    assert len(src) == 48
    assert [src.class_names[l] for l in src.labels[:3]] == [p.split("/")[-2] for p in src.ids[:3]]
    assert src.read(0).image.shape == (40, 48, 3)


def test_flat_folder_and_globs_have_no_labels(folder):
    src = sources.open_source([str(folder / "dogs" / "*.png")])
    assert len(src) == 16 and (src.labels == -1).all() and src.class_names is None


def test_masks_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "img" / "b.jpg")
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:10] = 255
    Image.fromarray(m).save(tmp_path / "mask" / "a.png")
    src = sources.open_source(str(tmp_path / "img"), masks=str(tmp_path / "mask"))
    assert src.has_masks
    assert src.read(0).mask.sum() == 25 and src.read(1).mask is None


def test_npz_and_npy(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (5, 12, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", imgs)
    np.savez(tmp_path / "x.npz", images=imgs, labels=np.arange(5))
    a = sources.open_source(str(tmp_path / "x.npy"))
    b = sources.open_source(str(tmp_path / "x.npz"))
    np.testing.assert_array_equal(a.read(3).image, imgs[3])
    assert list(b.labels) == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "y.npz", pixels=imgs)
    with pytest.raises(ConvlensError, match="no 'images' array"):
        sources.open_source(str(tmp_path / "y.npz"))


def test_tfds_source_reads_prepared_data(tfds_dir):
    d, images = tfds_dir
    src = sources.open_source("tfds:convlens_toy:train[:10]", data_dir=str(d))
    assert len(src) == 10 and src.class_names == ("even", "odd")
    item = src.read(3)
    i = int(src.ds[3]["index"])  # records are shuffled when TFDS prepares them
    np.testing.assert_array_equal(item.image, images[i])
    assert item.label == i % 2
    assert len(sources.open_source("tfds:convlens_toy:test", data_dir=str(d))) == 4


@pytest.mark.parametrize("spec, text", [
    ("tfds:imagenet2012:validation", "is not prepared in"),
    ("tfds:convlens_toy:validation", "no split 'validation'"),
    ("tfds:convlens_toy/nosuchconfig", "is not prepared in"),
    ("tfds:", "is not tfds:NAME"),
])
def test_tfds_errors_are_fast_and_clear(tfds_dir, spec, text):
    d, _ = tfds_dir
    t = time.perf_counter()
    with pytest.raises(ConvlensError, match=text):
        sources.open_source(spec, data_dir=str(d))
    assert time.perf_counter() - t < 1.0  # never a download attempt


def test_missing_inputs_are_clear(tmp_path):
    with pytest.raises(ConvlensError, match="no such file"):
        sources.open_source([str(tmp_path / "nope" / "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvlensError, match="holds no images"):
        sources.open_source(str(tmp_path / "empty"))
