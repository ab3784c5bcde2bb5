#!/usr/bin/env python
"""Per-kernel device times of one packed matmul program, from jax's profiler (no wall clocks).

Usage: python scripts/bench/kernel_profile.py [--k 4096] [--n 11008] [--m 1] [--format int4_g128]
       [--tiling decode=64:8:4:528] [--out DIR]

Runs the kernel path, the XLA dequantize path and bf16 dense (16 calls each, distinct weight
copies) under ``jax.profiler.trace`` and prints, per path, every GPU kernel's name, count and
mean duration from the Perfetto trace: what the wrapper ops cost next to the kernel itself.
"""

import argparse
import collections
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import FORMATS, apply_tilings  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--format", default="int4_g128", choices=list(FORMATS))
    ap.add_argument("--tiling", action="append", default=[])
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--paths", nargs="*", default=["kernel", "xla", "dense_bf16"])
    ap.add_argument("--out", default=None, help="keep the trace here (default: a temp dir)")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        print(f"kernel_profile.py: needs a GPU (device times come from its kernel trace); "
              f"this is {jax.default_backend()}", file=sys.stderr)
        sys.exit(2)
    apply_tilings("gpu", args.tiling)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(args.k, args.n)).astype(np.float32) * 0.02
    q = quantize_array(w, FORMATS[args.format])
    x = jnp.asarray(rng.normal(size=(args.m, args.k)), jnp.bfloat16)
    xs = [x * jnp.asarray(1 + 1e-3 * r, x.dtype) for r in range(args.calls)]
    paths = {"kernel": ("auto", q), "xla": ("xla", q),
             "dense_bf16": ("xla", jnp.asarray(w, jnp.bfloat16))}
    for name in args.paths:
        impl, weights = paths[name]
        ws = [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), weights)
              for _ in range(args.calls)]
        with use_matmul_impl(impl):
            run = jax.jit(lambda xs, ws, dense=name == "dense_bf16": [
                xr @ wr if dense else wr.left_matmul(xr) for xr, wr in zip(xs, ws, strict=True)])
            jax.block_until_ready(run(xs, ws))
            trace_dir = os.path.join(args.out, name) if args.out else tempfile.mkdtemp()
            os.makedirs(trace_dir, exist_ok=True)
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                jax.block_until_ready(run(xs, ws))
        stats, threads = collections.defaultdict(list), collections.Counter()
        for thread, kname, dur in device_events(trace_dir):
            threads[thread] += 1
            if thread.startswith("Stream"):
                stats[kname].append(dur)
        total = sum(sum(v) for v in stats.values()) / args.calls
        print(json.dumps({"path": name, "M": args.m, "K": args.k, "N": args.n,
                          "format": args.format, "device_us_per_call": total,
                          "threads": dict(threads),
                          "weight_gbs": (q.nbytes if name != "dense_bf16" else w.size * 2)
                          / total / 1e3 if total else None,
                          "kernels": {k: {"count": len(v), "mean_us": float(np.mean(v))}
                                      for k, v in sorted(stats.items(),
                                                         key=lambda kv: -sum(kv[1]))}}),
              flush=True)


if __name__ == "__main__":
    main()
