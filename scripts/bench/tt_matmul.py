#!/usr/bin/env python
"""``TTMatrix.left_matmul`` against the dense matmul it replaces: time and multiply-adds.

Usage: python scripts/bench/tt_matmul.py [--shapes 576x1536 4096x11008] [--batches 1 64]
       [--param-ratio 0.3333] [--repeats 50]

For each shape, TT factorizations at 3x fewer parameters (random weights; only sizes matter):
3 balanced cores, 2 balanced cores, and 2 "thin" cores (m/2, 2) x (2, n/2) whose contraction
reuses each core entry least. Times jitted float32 ``x @ W`` (dense) and ``tt.left_matmul(x)``
(the contraction order it picks) on this machine, median of --repeats, and prints a Markdown
table with the multiply-adds of each.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcomp.tensornet.tt import contraction_flops, tt_matrix  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["576x1536", "4096x11008"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--param-ratio", type=float, default=1 / 3)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    matmul = jax.jit(lambda w, x: x @ w)
    apply = jax.jit(lambda leaf, x: leaf.left_matmul(x))
    print(f"device: {jax.devices()[0].device_kind}, float32, median of {args.repeats}\n")
    print("| shape | factorization | bond dims | params | batch | order | MACs TT / dense "
          "| dense ms | TT ms | TT speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        m, n = map(int, shape.split("x"))
        w = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
        variants = {"3 balanced cores": {"num_cores": 3}, "2 balanced cores": {"num_cores": 2},
                    "2 thin cores": {"in_factors": (m // 2, 2), "out_factors": (2, n // 2)}}
        for label, kw in variants.items():
            leaf = tt_matrix(w, param_ratio=args.param_ratio, **kw)
            for batch in args.batches:
                x = jnp.asarray(rng.standard_normal((batch, m)), jnp.float32)
                flops = contraction_flops(leaf.in_factors, leaf.out_factors, leaf.ranks, batch)
                order = min(flops, key=flops.get)
                dense_s = timed(matmul, w, x, repeats=args.repeats)
                tt_s = timed(apply, leaf, x, repeats=args.repeats)
                print(f"| {m}x{n} | {label} {leaf.in_factors}x{leaf.out_factors} "
                      f"| {leaf.ranks[1:-1]} | {leaf.num_params / (m * n):.3f} | {batch} "
                      f"| {order} | {flops[order] / (batch * m * n):.2f} | {dense_s * 1e3:.3f} "
                      f"| {tt_s * 1e3:.3f} | {dense_s / tt_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
