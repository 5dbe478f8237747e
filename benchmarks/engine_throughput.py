"""End-to-end data-set run vs the kernel alone: is I/O hidden behind compute?

A Grad-CAM run of VGG16 (224x224) over a folder of JPEG photos (decoded, resized, and
written to a Zarr store with status, predictions and maps), as images/s and as a
fraction of the Grad-CAM kernel's own throughput on batches already in memory,
measured in the same run with the same batch size.

    python benchmarks/engine_throughput.py               # 1,000 images (~6 min on 2 cores)
    python benchmarks/engine_throughput.py --images 200 --quick

Timing: compilation excluded from both: the kernel is timed after a warm-up call (best
of --reps, ``block_until_ready``), and a warm-up run over a few images compiles the
function the timed run then reuses; the timed run's figure includes everything else
(store creation, decoding, writing, consolidation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_time, load_arrays, machine, explain_fn, keys_for  # noqa: E402

from convlens.engine import runner  # noqa: E402
from convlens.models.registry import build_model  # noqa: E402


def make_folder(root: Path, n: int) -> Path:
    """``n`` JPEG photos of camera-like sizes (scikit-image's bundled photos, cropped,
    flipped and rescaled so no two files are the same)."""
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        y, x = rng.integers(0, h // 5), rng.integers(0, w // 5)
        crop = p[y:y + 4 * h // 5, x:x + 4 * w // 5]
        if i % 2:
            crop = crop[:, ::-1]
        im = Image.fromarray(np.ascontiguousarray(crop))
        s = rng.uniform(0.8, 1.6)
        im = im.resize((int(im.width * s), int(im.height * s)))
        cls = root / f"class{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        im.save(cls / f"{i:05d}.jpg", quality=90)
    return root


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smaller kernel measurement")
    a = ap.parse_args()
    model = build_model("vgg16")
    params = jax.tree.map(jnp.asarray, load_arrays("vgg16"))
    tmp = Path(tempfile.mkdtemp(prefix="convlens-bench-"))
    try:
        folder = make_folder(tmp / "photos", a.images)
        b = a.batch
        fn = explain_fn(model, "gradcam", {}, 1)
        x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (b, 224, 224, 3)).astype("float32"))
        keys = keys_for(b)
        t_kernel = best_time(lambda: jax.block_until_ready(fn(params, x, None, keys)), a.reps)
        kernel = b / t_kernel
        print(f"kernel only: {kernel:.2f} images/s (batch {b})", flush=True)
        # Warm-up run: compiles the same function the timed run then reuses.
        runner.run(model, params, str(folder / "class0"), ["gradcam"], tmp / "warm.zarr", batch_size=b,
                   progress=False)
        t = time.perf_counter()
        s = runner.run(model, params, str(folder), ["gradcam"], tmp / "run.zarr", batch_size=b, progress=False)
        wall = time.perf_counter() - t
        e2e = s.done / wall
        print(f"end to end: {e2e:.2f} images/s over {s.done} images ({wall:.1f} s, store and set-up included) "
              f"= {e2e / kernel:.3f} of the kernel", flush=True)
        res = {"machine": machine(), "images": s.done, "batch": b, "kernel_images_per_s": kernel,
               "end_to_end_images_per_s": e2e, "fraction_of_kernel": e2e / kernel, "seconds": wall,
               "store_bytes": sum(f.stat().st_size for f in (tmp / "run.zarr").rglob("*") if f.is_file())}
        out = HERE / "results" / ("engine_throughput_quick.json" if a.quick else "engine_throughput.json")
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
