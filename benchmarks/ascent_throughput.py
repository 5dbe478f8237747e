"""Filter visualisation speed on VGG16 (classic recipe, 40 steps): filters per second,
batched vs one filter at a time, the achieved FLOP rate as a fraction of this machine's
fp32 matmul rate (both measured in this run), how the step loop is best compiled, and
the projected time of a whole VGG16 atlas (4,224 conv filters).

    python benchmarks/ascent_throughput.py           # block3_conv1 and block5_conv3, 64 and 128 px
    python benchmarks/ascent_throughput.py --quick   # block3_conv1 at 64 px

FLOPs counted: the convolutions of the forward pass up to the layer, and as many again
for the backward pass to the input (no weight gradients are needed); pooling, ReLU and
the update are not counted. Timing: warm-up (compilation) excluded, best of --reps,
``block_until_ready``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import convlens  # noqa: E402,F401  - sets convlens's XLA flags before JAX starts
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import best_time, load_arrays, machine  # noqa: E402

from convlens.engine.atlas import ascend, loop_mode  # noqa: E402
from convlens.kernels import ascent as A  # noqa: E402
from convlens.models.registry import build_model  # noqa: E402


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    t = best_time(lambda: f(a).block_until_ready(), reps)
    return 2 * n ** 3 / t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    model = build_model("vgg16")
    params = jax.tree.map(jnp.asarray, load_arrays("vgg16"))
    peak = matmul_rate()
    print(f"fp32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s", flush=True)
    cases = [("block3_conv1", 64)] if a.quick else [("block3_conv1", 64), ("block3_conv1", 128),
                                                   ("block5_conv3", 64), ("block5_conv3", 128)]
    res = {"machine": machine(), "matmul_gflops": peak / 1e9, "cases": {}}
    for layer, size in cases:
        b = a.batch if size == 64 else a.batch // 2
        cfg = A.AscentConfig(size=size)
        obj = A.channel(layer)
        units = jnp.arange(b)
        keys = A.unit_keys(0, 0, units)
        flops = 2 * A.conv_flops(model, layer, size) * cfg.n_steps  # per filter
        def f(p, u, k, cfg=cfg, obj=obj):
            return ascend(model, p, obj, u, cfg, seed=0, salt=0)  # the loop convlens picks; k: the same keys
        t_batch = best_time(lambda: jax.block_until_ready(f(params, units, keys)), a.reps)
        one_units = [units[i:i + 1] for i in range(b)]
        one_keys = [keys[i:i + 1] for i in range(b)]
        f(params, one_units[0], one_keys[0])  # compile the single-filter shape
        t_one = best_time(lambda: jax.block_until_ready([f(params, u, k) for u, k in zip(one_units, one_keys)]),
                          1)
        row = {"batch": b, "filters_per_s_batched": b / t_batch, "filters_per_s_one_at_a_time": b / t_one,
               "batched_speedup": t_one / t_batch, "gflops_per_filter": flops / 1e9,
               "achieved_gflops": b * flops / t_batch / 1e9, "fraction_of_matmul": b * flops / t_batch / peak}
        print(f"{layer} {size}px: batched {row['filters_per_s_batched']:.3f} filters/s "
              f"({row['achieved_gflops']:.1f} GFLOP/s = {row['fraction_of_matmul']:.2f} of matmul), one at a time "
              f"{row['filters_per_s_one_at_a_time']:.3f} -> batched {row['batched_speedup']:.2f}x", flush=True)
        res["cases"][f"{layer}/{size}"] = row
    # How to compile the 40 steps: rolled fori_loop, fully unrolled, or a host loop of jitted steps.
    layer, size = cases[0]
    b = a.batch
    units = jnp.arange(b)
    keys = A.unit_keys(0, 0, units)
    obj = A.channel(layer)
    loops = {}
    for name, unroll in (("fori_loop rolled", 1), ("fori_loop unroll=8", 8), ("fori_loop unrolled (default)", 0)):
        cfg = A.AscentConfig(size=size, unroll=unroll)
        f = jax.jit(lambda p, u, k, cfg=cfg: A.visualize(model, p, obj, u, cfg, k))
        t0 = time.perf_counter()
        jax.block_until_ready(f(params, units, keys))
        compile_s = time.perf_counter() - t0
        loops[name] = {"seconds": best_time(lambda: jax.block_until_ready(f(params, units, keys)), a.reps),
                       "first_call_seconds": compile_s}
    cfg = A.AscentConfig(size=size)
    px0 = A.classic_init(jax.vmap(lambda k: jax.random.split(k, 2)[0])(keys), size)
    step = jax.jit(lambda p, px: A.classic_step(model, p, obj, cfg, px, units))

    def host_loop():
        px = px0
        for _ in range(cfg.n_steps):
            px = step(params, px)  # dispatched asynchronously: no sync until the end
        return px.block_until_ready()
    loops["host loop of jitted steps"] = {"seconds": best_time(host_loop, a.reps)}
    for name, r in loops.items():
        print(f"  loop: {name:28s} {r['seconds']:.2f} s" + (f" (first call {r['first_call_seconds']:.1f} s)"
                                                             if "first_call_seconds" in r else ""), flush=True)
    # Lucid's step (transforms + Adam), 32 steps: a rolled loop against dispatched steps.
    lcfg = A.AscentConfig("lucid", size=size, steps=32, unroll=1)
    lf = jax.jit(lambda p, u, k: A.visualize(model, p, obj, u, lcfg, k))
    jax.block_until_ready(lf(params, units, keys))
    loops["lucid, 32 steps: fori_loop rolled"] = {
        "seconds": best_time(lambda: jax.block_until_ready(lf(params, units, keys)), a.reps)}
    loops["lucid, 32 steps: host loop of jitted steps"] = {"seconds": best_time(
        lambda: ascend(model, params, obj, units, lcfg, seed=0, salt=0, loop="host"), a.reps)}
    for name in list(loops)[-2:]:
        print(f"  loop: {name:28s} {loops[name]['seconds']:.2f} s", flush=True)
    res["loops"] = {"case": f"{layer}/{size}", "batch": b, "auto_choice_classic": loop_mode(A.AscentConfig()),
                    "auto_choice_lucid": loop_mode(A.AscentConfig("lucid")), **loops}
    # Whole-atlas projection at 128 px from the achieved FLOP rate of the 128 px cases.
    rates = [r["achieved_gflops"] for k, r in res["cases"].items() if k.endswith("/128")] or \
        [r["achieved_gflops"] for r in res["cases"].values()]
    rate = float(np.mean(rates)) * 1e9
    total = sum(2 * A.conv_flops(model, n, 128) * 40 * model.output_shapes(1, (128, 128))[n][-1]
                for n in model.conv_layer_names)
    res["atlas_projection"] = {"filters": sum(model.output_shapes(1, (128, 128))[n][-1]
                                              for n in model.conv_layer_names),
                               "size": 128, "steps": 40, "tflop": total / 1e12, "hours": total / rate / 3600}
    print(f"whole VGG16 atlas (4,224 filters, 128 px, 40 steps): {total / 1e12:.0f} TFLOP -> "
          f"{total / rate / 3600:.1f} h at {rate / 1e9:.0f} GFLOP/s", flush=True)
    out = HERE / "results" / ("ascent_throughput_quick.json" if a.quick else "ascent_throughput.json")
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
