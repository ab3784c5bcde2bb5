#!/usr/bin/env python
"""Per-kernel device times of packed matmul programs, from jax's profiler (no wall clocks).

Usage: python scripts/bench/kernel_profile.py [--shapes 4096x11008 11008x4096] [--m 1]
       [--format int4_g128] [--paths kernel xla dense_bf16 mosaic]
       [--tiling decode=64:8:4:528:ptx] [--sweep decode=64:8:4:528:ptx mosaic=64:2:4:528 ...]
       [--out FILE.jsonl]

For each shape, runs every path (the kernel, the XLA dequantize path and bf16 dense; 16 calls
each, each on its own copy of the weights, so they come from HBM, not L2) under
``jax.profiler.trace`` and prints, per path, every GPU kernel's name, count and mean duration
from the Perfetto trace: what the wrapper ops cost next to the kernel itself. ``--sweep`` then
profiles the kernel path once per tiling spec (``qmatmul.py``'s ``regime=...`` syntax) in the
same process. Path ``mosaic`` is the Mosaic GPU int4 experiment (``kernel_mgpu.qmatmul_hopper``
on weights re-laid once by its ``prepare``; int4 with groups of 128, M <= 16), with its default
``HopperTiling`` or, in ``--sweep``, ``mosaic=block_n:groups_per_step:max_concurrent_steps:
min_programs[:wgmma_in_flight]``. Every kernel-path row also carries the Pallas kernel's own
time (``kernel_us``, without the wrapper ops: pad, transposes, split-K sum) and the output's
relative error against the float64 reference (``max|y - ref| / max|ref|``; bf16 activations
and output, so ~1e-3). Bad arguments (a malformed spec, a format or M the mosaic path refuses,
no GPU) are one line and exit code 2.
"""

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcomp.core.dispatch import use_matmul_impl  # noqa: E402
from jaxcomp.quant import quantize_array  # noqa: E402
from pallas_kernels.qmatmul.reference import qmatmul_reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmatmul import (  # noqa: E402
    FORMATS,
    apply_tilings,
    apply_tilings_or_exit,
    error_fields,
    parse_hopper_tiling,
    parse_tiling,
)


def device_events(trace_dir: str):
    """(thread, name, duration us) of the GPU events in the Perfetto trace under trace_dir;
    kernels are on the threads named "Stream ..." (others hold per-op and per-module spans)."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = {(e["name"], e["pid"], e.get("tid")): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    return [(meta.get(("thread_name", e["pid"], e.get("tid")), "?"), e["name"], e["dur"])
            for e in events if e.get("ph") == "X" and "dur" in e
            and "GPU" in meta.get(("process_name", e["pid"], None), "")]


def profile(run, xs, ws, calls: int):
    """(device us per call, {kernel name: (count, mean us)}, first output) of ``run(xs, ws)``."""
    out = jax.block_until_ready(run(xs, ws))
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        jax.block_until_ready(run(xs, ws))
    stats = collections.defaultdict(list)
    for thread, name, dur in device_events(trace_dir):
        if thread.startswith("Stream"):
            stats[name].append(dur)
    total = sum(sum(v) for v in stats.values()) / calls
    kernels = {k: {"count": len(v), "mean_us": float(np.mean(v))}
               for k, v in sorted(stats.items(), key=lambda kv: -sum(kv[1]))}
    return total, kernels, np.asarray(out[0], np.float64)


def hopper_path(q, spec: str | None = None, interpret: bool = False):
    """The Mosaic GPU kernel path for ``q``: (``fn(x, prepared weights)``, its tiling spec)."""
    from pallas_kernels.qmatmul.kernel_mgpu import HopperTiling, qmatmul_hopper

    tiling = parse_hopper_tiling(spec) if spec else HopperTiling()
    spec = spec or "mosaic=" + ":".join(str(v) for v in dataclasses.astuple(tiling))
    return functools.partial(qmatmul_hopper, group_size=q.fmt.group_size, tiling=tiling,
                             interpret=interpret), spec


def fail(message: str):
    print(f"kernel_profile.py: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="*", default=["4096x11008", "11008x4096"],
                    help="K x N of the weight")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--format", default="int4_g128", choices=list(FORMATS))
    ap.add_argument("--tiling", action="append", default=[],
                    help="override a tiling (qmatmul.py syntax) for the whole run")
    ap.add_argument("--sweep", nargs="*", default=[],
                    help="after the paths, profile the kernel path with each tiling spec "
                         "(mosaic=block_n:groups_per_step:depth:min_programs[:in_flight]: "
                         "the Mosaic path)")
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--paths", nargs="*", default=["kernel", "xla", "dense_bf16"],
                    choices=["kernel", "xla", "dense_bf16", "mosaic"])
    ap.add_argument("--out", default=None, help="also append the rows to this JSONL file")
    args = ap.parse_args()
    runs = [(name, None) for name in args.paths] + [
        ("mosaic" if spec.startswith("mosaic=") else "kernel", spec) for spec in args.sweep]
    mosaic = any(name == "mosaic" for name, _ in runs)
    if mosaic:  # imported only then: an old tree profiled by this script may not have it
        from pallas_kernels.qmatmul.kernel_mgpu import MAX_M, prepare, unsupported_reason
    try:
        for name, spec in runs:
            if spec and not spec.endswith("=none"):
                (parse_hopper_tiling if name == "mosaic" else parse_tiling)(spec)
        shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes]
    except ValueError as e:
        fail(str(e))
    rng = np.random.default_rng(0)
    cases = []
    for k, n in shapes:
        w = rng.normal(size=(k, n)).astype(np.float32) * 0.02
        q = quantize_array(w, FORMATS[args.format])
        if mosaic:
            if reason := unsupported_reason(q):
                fail(f"the mosaic path {reason}")
            if not 1 <= args.m <= MAX_M:
                fail(f"the mosaic path needs --m between 1 and {MAX_M}, got {args.m}")
        cases.append((k, n, w, q))
    if jax.default_backend() != "gpu":
        fail(f"needs a GPU (device times come from its kernel trace); "
             f"this is {jax.default_backend()}")
    import pallas_kernels.qmatmul.ops as ops

    apply_tilings_or_exit("gpu", args.tiling)
    base_tilings = dict(ops.TILINGS["gpu"])
    device = jax.devices()[0].device_kind

    def emit(row):
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for k, n, w, q in cases:
        x = jnp.asarray(rng.normal(size=(args.m, k)), jnp.bfloat16)
        xs = [x * jnp.asarray(1 + 1e-3 * r, x.dtype) for r in range(args.calls)]
        ref = qmatmul_reference(np.asarray(xs[0], np.float64), q)
        names = {name for name, _ in runs}
        weights = {"kernel": q, "xla": q, "dense_bf16": jnp.asarray(w, jnp.bfloat16),
                   "mosaic": prepare(q) if mosaic else None}
        copies = {name: [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), weights[name])
                         for _ in range(args.calls)] for name in names}
        for name, spec in runs:
            ops.TILINGS["gpu"].clear()
            ops.TILINGS["gpu"].update(base_tilings)
            if name == "mosaic":
                fn, tiling = hopper_path(q, spec)
            else:
                tiling = spec or str(ops.TILINGS["gpu"].get("decode"))
                dense = name == "dense_bf16"
                fn = (lambda xr, wr: xr @ wr) if dense else (lambda xr, wr: wr.left_matmul(xr))
            row = {"path": name, "tiling": tiling if name in ("kernel", "mosaic") else None,
                   "M": args.m, "K": k, "N": n, "format": args.format, "device": device}
            with use_matmul_impl("auto" if name == "kernel" else "xla"):
                run = jax.jit(lambda xs, ws, fn=fn: [
                    fn(xr, wr) for xr, wr in zip(xs, ws, strict=True)])
                try:
                    apply_tilings("gpu", [spec] if spec and name == "kernel" else [])
                    total, kernels, y = profile(run, xs, copies[name], args.calls)
                except Exception as e:  # a tiling the compiler rejects is a result
                    emit({**row, **error_fields(e)})
                    continue
            if name == "mosaic":  # re-laid int4 codes (jax counts an int4 as one byte)
                hw = weights["mosaic"]
                nbytes = hw.codes.size // 2 + hw.scales.nbytes + hw.zeros.nbytes
            else:
                nbytes = w.size * 2 if name == "dense_bf16" else q.nbytes
            kernel_us = sum(v["count"] * v["mean_us"] for kname, v in kernels.items()
                            if "qmatmul" in kname or "mosaic" in kname) / args.calls
            emit({**row, "device_us_per_call": total, "weight_gbs": nbytes / total / 1e3,
                  "kernel_us": kernel_us or None,
                  "max_rel_err": None if name == "dense_bf16" else
                  float(np.abs(y - ref).max() / np.abs(ref).max()),
                  "kernels": kernels})


if __name__ == "__main__":
    main()
