#!/usr/bin/env python
"""Causal self-attention time: query chunks against one block of all queries and keys.

Usage: python scripts/bench/attention.py [--batch 8] [--seq-len 512 2048] [--heads 9]
       [--kv-heads 3] [--head-dim 64] [--repeats 5]

Times jitted ``jaxcomp.models.layers.attention`` (float32, SmolLM2-135M's head layout by
default) with ``query_chunk=None`` (every query scored against every key, the causal half
masked) and with the models' ``QUERY_CHUNK`` (each chunk of queries against the keys up to its
end only). Prints one JSON line per sequence length: median milliseconds of each, the speed-up,
and the largest absolute difference of the outputs (the two must agree).
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

from jaxcomp.models.layers import QUERY_CHUNK, attention  # noqa: E402


def _median_ms(f, args, repeats):
    jax.block_until_ready(f(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.heads % args.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")
    rng = np.random.default_rng(0)
    for t in args.seq_len:
        q, k, v = (jnp.asarray(rng.standard_normal((args.batch, t, n, args.head_dim)), jnp.float32)
                   for n in (args.heads, args.kv_heads, args.kv_heads))
        positions = jnp.broadcast_to(jnp.arange(t), (args.batch, t))
        result = {"batch": args.batch, "seq_len": t, "heads": args.heads,
                  "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                  "query_chunk": QUERY_CHUNK, "devices": str(jax.devices()[0].platform)}
        outs = {}
        for name, chunk in (("one_block", None), ("chunked", QUERY_CHUNK)):
            f = jax.jit(lambda q, k, v, pos, c=chunk: attention(q, k, v, pos, pos[0],
                                                                query_chunk=c))
            result[f"{name}_ms"] = round(_median_ms(f, (q, k, v, positions), args.repeats), 1)
            outs[name] = np.asarray(f(q, k, v, positions))
        result["speedup"] = round(result["one_block_ms"] / result["chunked_ms"], 2)
        result["max_abs_diff"] = float(np.abs(outs["one_block"] - outs["chunked"]).max())
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
