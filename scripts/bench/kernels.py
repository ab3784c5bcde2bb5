#!/usr/bin/env python
"""Packed low-bit matmul: Pallas kernel vs bf16 dense vs the XLA dequantize path.

Usage: python scripts/bench/kernels.py [--reps 200] [--formats int4_g128 int8 nf4_g64 int2_g64]
       [--out results.jsonl]

Shapes: decode M=1 and 8 and prefill M=512, for K x N = 4096x4096, 4096x11008, 11008x4096.
Each timing runs the op --reps times inside one jitted fori_loop (the input is perturbed per
iteration so XLA cannot hoist it) and divides, so launch overhead is amortized. Reports time per
matmul, achieved weight bandwidth (stored weight bytes / time) and its fraction of the peak given
by --peak-gbs (H100 SXM HBM3: 3350 GB/s). On a CPU only the dense and XLA paths are timed (Pallas
only interprets there); correctness of the kernel against the float64 reference is checked on
every backend on a small shape first.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcomp.core.dispatch import kernel_backend, use_matmul_impl  # noqa: E402
from jaxcomp.quant import int2, int4, int8, nf4, quantize_array  # noqa: E402
from pallas_kernels.qmatmul import qmatmul, supported  # noqa: E402
from pallas_kernels.qmatmul.reference import qmatmul_reference  # noqa: E402

FORMATS = {"int4_g128": int4(128), "int8": int8(), "nf4_g64": nf4(64), "int2_g64": int2(64)}
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]


def time_op(fn, x, weights, reps):
    """Seconds per ``fn(x, weights)``; weights are a jit argument, never a folded constant."""

    def run(x, weights):
        def body(i, acc):
            y = fn(x * (1 + i.astype(x.dtype) * jnp.asarray(1e-3, x.dtype)), weights)
            return acc + y[0, 0].astype(jnp.float32)

        return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

    run = jax.jit(run)
    run(x, weights).block_until_ready()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run(x, weights).block_until_ready()
        times.append((time.perf_counter() - start) / reps)
    return float(np.min(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--ms", type=int, nargs="*", default=[1, 8, 512])
    ap.add_argument("--peak-gbs", type=float, default=3350.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="time decode tilings (block_n x warps x stages x min_programs) for "
                         "int4_g128 at M=1 instead of the table")
    args = ap.parse_args()
    backend = kernel_backend() or "interpret"
    on_accel = backend in ("gpu", "tpu")
    device = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    out = open(args.out, "w") if args.out else None

    def emit(row):
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")

    if args.sweep:
        return sweep(args, backend, device, emit)
    for name in args.formats:  # correctness first, on a small odd-tailed shape
        q = quantize_array(rng.normal(size=(576, 256)).astype(np.float32), FORMATS[name])
        x = rng.normal(size=(3, 576)).astype(np.float32)
        y = np.asarray(qmatmul(jnp.asarray(x), q, backend))
        ref = qmatmul_reference(x, q)
        emit({"check": name, "backend": backend, "device": device,
              "max_rel_err_vs_f64": float(np.abs(y - ref).max() / np.abs(ref).max())})
    for k, n in SHAPES:
        w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32) * 0.02)
        dense = w.astype(jnp.bfloat16)
        for m in args.ms:
            x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            t_dense = time_op(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32),
                              x, dense, args.reps)
            for name in args.formats:
                q = quantize_array(w, FORMATS[name])
                with use_matmul_impl("xla"):
                    t_xla = time_op(lambda x, q: q.left_matmul(x), x, q, args.reps)
                t_kernel = None
                if on_accel and supported(q, x.shape, backend):
                    t_kernel = time_op(lambda x, q: qmatmul(x, q, backend), x, q, args.reps)
                best = t_kernel or t_xla
                emit({"format": name, "M": m, "K": k, "N": n, "device": device,
                      "dense_bf16_us": t_dense * 1e6, "xla_dequant_us": t_xla * 1e6,
                      "kernel_us": None if t_kernel is None else t_kernel * 1e6,
                      "speedup_vs_bf16": t_dense / best,
                      "weight_bytes": q.nbytes,
                      "kernel_weight_gbs": None if t_kernel is None else q.nbytes / t_kernel / 1e9,
                      "bf16_weight_gbs": k * n * 2 / t_dense / 1e9,
                      "kernel_frac_of_peak": None if t_kernel is None else
                      q.nbytes / t_kernel / 1e9 / args.peak_gbs})


def sweep(args, backend, device, emit):
    import itertools

    import pallas_kernels.qmatmul.ops as ops
    from pallas_kernels.qmatmul.kernel import Tiling

    rng = np.random.default_rng(0)
    for k, n in SHAPES:
        q = quantize_array(rng.normal(size=(k, n)).astype(np.float32), int4(128))
        x = jnp.asarray(rng.normal(size=(1, k)), jnp.bfloat16)
        for bn, warps, stages, programs in itertools.product((32, 64, 128), (2, 4, 8), (2, 4),
                                                             (132, 264, 528)):
            ops.TILINGS[backend]["decode"] = Tiling(16, bn, warps, stages, programs)
            t = time_op(lambda x, q: qmatmul(x, q, backend), x, q, args.reps)
            emit({"sweep": "int4_g128", "M": 1, "K": k, "N": n, "block_n": bn,
                  "num_warps": warps, "num_stages": stages, "min_programs": programs,
                  "kernel_us": t * 1e6, "device": device})


if __name__ == "__main__":
    main()
