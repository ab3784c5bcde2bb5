#!/usr/bin/env python
"""Forward/eval throughput and peak memory of a model (default: SmolLM2-135M).

Usage: python scripts/bench/forward.py [--model smollm2-135m] [--seq-len 512] [--batch 1 8]
Prints one JSON line per batch size: tokens/s (median of --repeats timed runs after a warm-up
compile), compile seconds, XLA's temp-buffer bytes for the compiled forward, and process peak RSS.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcomp.models import build_model  # noqa: E402
from jaxcomp.models.loading import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    loaded = load_model(args.model)
    model = build_model(loaded.config, dtype=jnp.dtype(args.dtype))
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for batch in args.batch:
        tokens = jnp.asarray(np.random.default_rng(0).integers(
            0, loaded.config.vocab_size, (batch, args.seq_len)), jnp.int32)
        start = time.perf_counter()
        compiled = forward.lower(loaded.params, tokens).compile()
        compile_s = time.perf_counter() - start
        compiled(loaded.params, tokens).block_until_ready()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled(loaded.params, tokens).block_until_ready()
            times.append(time.perf_counter() - start)
        mem = compiled.memory_analysis()
        print(json.dumps({
            "bench": "forward", "model": args.model, "dtype": args.dtype,
            "batch": batch, "seq_len": args.seq_len,
            "median_s": round(float(np.median(times)), 4),
            "tokens_per_s": round(batch * args.seq_len / float(np.median(times)), 1),
            "compile_s": round(compile_s, 2),
            "xla_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "device": str(jax.devices()[0].device_kind), "cpus": os.cpu_count(),
            "machine": platform.machine(),
        }), flush=True)


if __name__ == "__main__":
    main()
