#!/usr/bin/env python
"""Packed low-bit matmul: Pallas kernel vs bf16 dense vs the XLA dequantize path.

Usage: python scripts/bench/qmatmul.py [--reps 32] [--formats int4_g128 int8 nf4_g64 int2_g64]
       [--ms 1 8 512] [--tiling decode=64:8:4:528:ptx] [--out results.jsonl]

Shapes: decode M=1 and 8 and prefill M=512, for K x N = 4096x4096, 4096x11008, 11008x4096.
Each timing runs the op --reps times in one jitted program on distinct inputs and 16 distinct
weight copies (see ``time_op``) and divides: wall time per call, which on a GPU includes the
host's launches (the kernel path launches 3 kernels per call, dense bf16 one); for device time
per kernel use ``scripts/bench/kernel_profile.py``. Reports time per matmul, achieved weight
bandwidth (stored weight bytes / time) and its fraction of the peak given by --peak-gbs (H100
SXM HBM3: 3350 GB/s, H200: 4800). On a CPU only the dense and XLA paths are timed (Pallas
only interprets there); correctness of the kernel against the float64 reference is checked on
every backend on a small shape first (``--check-only``: only that, f32 and bf16 activations),
and so is the Mosaic GPU int4 kernel (``kernel_mgpu``; interpret mode off a GPU), which is
timed by ``kernel_profile.py --paths mosaic`` only.
"""

import argparse
import itertools
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


def time_op(fn, x, weights, calls: int, copies: int = 16):
    """Wall seconds per ``fn(x, weights)`` call.

    One jitted program makes ``calls`` independent calls on distinct inputs, cycling through
    ``copies`` distinct copies of the weights (so the weights come from HBM, not from a
    50-60 MB L2), and returns every output (nothing can be sliced away). Its wall time, best of
    5, is divided by ``calls``, so dispatch and the final sync are amortized; host kernel
    launches are not (see the module docstring). An earlier version timed a ``fori_loop`` on
    one perturbed input, which on an H200 reported dense bf16 at 1.7x its device time.
    """
    copies = min(copies, calls)
    ws = [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), weights)
          for _ in range(copies)]
    xs = [x * jnp.asarray(1 + 1e-3 * r, x.dtype) for r in range(calls)]
    run = jax.jit(lambda xs, ws: [fn(xr, ws[r % copies]) for r, xr in enumerate(xs)])
    jax.block_until_ready(run(xs, ws))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(run(xs, ws))
        times.append((time.perf_counter() - start) / calls)
    return float(np.min(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=32, help="calls per timed program")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--ms", type=int, nargs="*", default=[1, 8, 512])
    ap.add_argument("--peak-gbs", type=float, default=3350.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-only", action="store_true",
                    help="only the correctness checks (f32 and bf16 activations), no timings")
    ap.add_argument("--tiling", action="append", default=[],
                    help="override a tiling for this run: regime=block_n:warps:stages:"
                         "min_programs[:codes] (regime decode or prefill; codes convert, "
                         "mantissa or ptx; regime=none drops it)")
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

    apply_tilings_or_exit(backend, args.tiling)
    for name in args.formats:  # correctness first, on a small odd-tailed shape, each regime
        q = quantize_array(rng.normal(size=(576, 256)).astype(np.float32), FORMATS[name])
        for m, dtype in itertools.product((1, 3, 8, 64), (jnp.float32, jnp.bfloat16)):
            x = jnp.asarray(rng.normal(size=(m, 576)), dtype)
            if not supported(q, x.shape, backend):
                continue
            y = np.asarray(qmatmul(x, q, backend), np.float64)
            ref = qmatmul_reference(np.asarray(x, np.float64), q)
            emit({"check": name, "M": m, "dtype": jnp.dtype(dtype).name, "backend": backend,
                  "device": device,
                  "max_rel_err_vs_f64": float(np.abs(y - ref).max() / np.abs(ref).max())})
    if "int4_g128" in args.formats:  # the Mosaic GPU experiment (compiled on a GPU only)
        for row in hopper_checks(rng, interpret=backend != "gpu"):
            emit({**row, "backend": backend, "device": device})
    if args.check_only:
        return
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


def error_fields(e: Exception) -> dict:
    """A failure as row fields: its first line, and its last 4,000 characters (a GPU compiler's
    message puts the cause at the end; a lent GPU session has no time to rerun for it)."""
    text = f"{type(e).__name__}: {e}"
    return {"error": text.splitlines()[0][:300], "error_detail": text[-4000:]}


def hopper_checks(rng, interpret: bool):
    """Check rows of the Mosaic GPU int4 kernel (``kernel_mgpu``, not dispatched) against the
    float64 reference: M = 1, 3, 16 bf16 activations on a 768 x 128 int4 g128 weight (K padded
    to 8 groups by ``prepare``): 4 steps in one program, with one step's MMAs left in flight
    (on a GPU, where wgmma is asynchronous, a race would show here), and split K 4 ways."""
    from pallas_kernels.qmatmul.kernel_mgpu import HopperTiling, prepare, qmatmul_hopper

    q = quantize_array(rng.normal(size=(768, 128)).astype(np.float32), FORMATS["int4_g128"])
    w = prepare(q)
    for m, (split, in_flight) in itertools.product((1, 3, 16), ((1, 0), (1, 1), (4, 0))):
        x = jnp.asarray(rng.normal(size=(m, 768)), jnp.bfloat16)
        tiling = HopperTiling(64, 2, 2, min_programs=2 * split, wgmma_in_flight=in_flight)
        row = {"check": "int4_g128_mosaic", "M": m, "dtype": "bfloat16", "split_k": split,
               "wgmma_in_flight": in_flight}
        try:
            y = np.asarray(qmatmul_hopper(x, w, 128, tiling, interpret), np.float64)
        except Exception as e:  # an experiment the GPU compiler rejects is a result
            yield {**row, **error_fields(e)}
            return
        ref = qmatmul_reference(np.asarray(x, np.float64), q)
        yield {**row, "max_rel_err_vs_f64": float(np.abs(y - ref).max() / np.abs(ref).max())}


def parse_tiling(spec: str, current=None):
    """``regime=block_n:warps:stages:min_programs[:codes]`` -> (regime, Tiling); without codes,
    ``current``'s (the tiling it replaces) are kept. Raises ValueError on a malformed spec."""
    from pallas_kernels.qmatmul.kernel import Tiling

    regime, _, values = spec.partition("=")
    fields = values.split(":")
    if regime not in ("decode", "prefill") or len(fields) not in (4, 5) or not all(
            f.isdigit() for f in fields[:4]):
        raise ValueError(f"bad tiling {spec!r}: want decode|prefill=block_n:warps:stages:"
                         f"min_programs[:codes]")
    codes = fields[4] if len(fields) == 5 else (current.codes if current else "convert")
    return regime, Tiling(16 if regime == "decode" else 64, *map(int, fields[:4]), codes)


def parse_hopper_tiling(spec: str):
    """``mosaic=block_n:groups_per_step:max_concurrent_steps:min_programs[:wgmma_in_flight]``
    -> the Mosaic GPU kernel's ``HopperTiling``. Raises ValueError on a malformed spec."""
    from pallas_kernels.qmatmul.kernel_mgpu import HopperTiling

    regime, _, values = spec.partition("=")
    fields = values.split(":")
    if regime != "mosaic" or len(fields) not in (4, 5) or not all(f.isdigit() for f in fields):
        raise ValueError(f"bad tiling {spec!r}: want mosaic=block_n:groups_per_step:"
                         f"max_concurrent_steps:min_programs[:wgmma_in_flight]")
    return HopperTiling(*map(int, fields))


def apply_tilings(backend: str, specs) -> None:
    """Overrides ``ops.TILINGS[backend]`` with each spec; ``regime=none`` drops that regime
    (it then takes the XLA path). Raises ValueError on a malformed spec."""
    import pallas_kernels.qmatmul.ops as ops

    for spec in specs:
        if spec.endswith("=none"):
            ops.TILINGS[backend].pop(spec.split("=")[0], None)
        else:
            regime, tiling = parse_tiling(spec, ops.TILINGS[backend].get(spec.split("=")[0]))
            ops.TILINGS[backend][regime] = tiling


def apply_tilings_or_exit(backend: str, specs) -> None:
    """:func:`apply_tilings` for a command line: a bad spec is one line and exit code 2."""
    try:
        apply_tilings(backend, specs)
    except ValueError as e:
        print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
