"""Data sets made on the spot: image folders (with bad files), arrays, a prepared TFDS data set."""

import numpy as np
import pytest
from PIL import Image


def random_images(n, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    # Smooth-ish images (blocks of colour) so the convnets see structure, not just noise.
    base = rng.integers(0, 256, (n, size[0] // 4, size[1] // 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """``root/<class>/*.png``: 2 classes, 48 images in all (sizes vary)."""
    root = tmp_path_factory.mktemp("folder")
    imgs = random_images(48, (40, 48), seed=1)
    for i, img in enumerate(imgs):
        cls = "cats" if i % 3 else "dogs"
        (root / cls).mkdir(exist_ok=True)
        Image.fromarray(img).save(root / cls / f"img{i:03d}.png")
    return root


def make_tfds(data_dir, n=40, size=(36, 30)):
    """A TFDS data set prepared locally in the array_record format (no network, no TensorFlow)."""
    import tensorflow_datasets as tfds

    images = random_images(n, (36, 32), seed=2)[:, :size[0], :size[1]]

    class ConvlensToy(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["even", "odd"]),
                "index": tfds.features.Scalar(dtype=np.int64),  # TFDS shuffles records on preparing
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(n)), "test": self._generate_examples(range(4))}

        def _generate_examples(self, idx):
            for i in idx:
                yield i, {"image": Image.fromarray(images[i]), "label": i % 2, "index": i}

    # Generated here; never look the data set up on TFDS's bucket (no network in tests).
    ConvlensToy(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return images


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    images = make_tfds(d)
    return d, images
