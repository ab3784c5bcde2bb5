#!/usr/bin/env python
"""Streams a LLaMA-2-7B-shaped checkpoint through block-sequential GPTQ W4 g128.

Usage: python scripts/bench/gptq_stream.py [--dir /tmp/llama7b_random] [--layers 3]
       [--samples 16] [--seq-len 512] [--no-attention-values] [--keep]

1. Writes a random bf16 HF checkpoint with LLaMA-2-7B's shapes and ``--layers`` decoder layers
   (the generator of ``tt_stream.py``), unless --dir already holds one. Random weights: the
   point is memory and time, not quality.
2. Opens it as :class:`jaxcomp.models.hf.StreamedParams` (each block read from disk when the
   pass reaches it) and runs the registered ``gptq`` transform (int4 asym g128) over it with
   ``--samples`` x ``--seq-len`` random calibration tokens. Reports seconds per block and the
   peak RSS (``ru_maxrss``) as JSON.
"""

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
from tt_stream import peak_rss_gib, write_checkpoint  # noqa: E402

from jaxcomp.calib import Calibration, block_transform, run_blocks  # noqa: E402
from jaxcomp.core import get_transform  # noqa: E402
from jaxcomp.models import build_model  # noqa: E402
from jaxcomp.models.hf import StreamedParams, load_hf_config  # noqa: E402


def timed_blocks(params, calib, steps):
    """``run_blocks`` with a clock: returns ``(new params, seconds, seconds per block)``."""
    starts = []

    def clock(bp, ctx, selected):  # a step that only records when each block starts
        starts.append(time.perf_counter())
        return bp

    start = time.perf_counter()
    out = run_blocks(params, calib,
                     block_transform(clock, targets=[r"q_proj/kernel$"]).block_steps + steps)
    seconds = time.perf_counter() - start
    ends = starts[1:] + [start + seconds]
    return out, seconds, [round(b - a, 1) for a, b in zip(starts, ends, strict=True)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/llama7b_random")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--attention-values", action=argparse.BooleanOptionalAction, default=True,
                    help="v_proj with per-kv-head Hessians (the gptq default; 32 x 4096^2 "
                         "float64 Gram matrices per block at 7B)")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        start = time.perf_counter()
        # in a child process: the writer's arrays must not count in this process's peak RSS
        import multiprocessing

        writer = multiprocessing.get_context("spawn").Process(
            target=write_checkpoint, args=(args.dir, args.layers))
        writer.start()
        writer.join()
        if writer.exitcode:
            shutil.rmtree(args.dir, ignore_errors=True)  # nothing half-written stays
            print(f"gptq_stream.py: writing the checkpoint failed (exit code "
                  f"{writer.exitcode})", file=sys.stderr)
            sys.exit(2)
        print(json.dumps({"wrote_checkpoint_s": round(time.perf_counter() - start, 1)}))
    cfg, _ = load_hf_config(args.dir)
    params = StreamedParams(args.dir, cfg)
    model = build_model(cfg)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.samples, args.seq_len))
    gptq = get_transform("gptq")(bits=4, group_size=128, attention_values=args.attention_values)
    out, seconds, per_block = timed_blocks(
        params, Calibration(model, windows, batch_size=4, progress=True), gptq.block_steps)
    packed = sum(leaf.nbytes for i in range(cfg.num_layers)
                 for group in out[f"layers_{i}"].values() if isinstance(group, dict)
                 for layer in group.values() if isinstance(layer, dict)
                 for leaf in layer.values() if hasattr(leaf, "nbytes"))
    print(json.dumps({"layers": cfg.num_layers, "calib_tokens": int(windows.size),
                      "attention_values": args.attention_values,
                      "seconds": round(seconds, 1), "seconds_per_block": per_block,
                      "packed_block_bytes": packed, "peak_rss_gib": round(peak_rss_gib(), 2)}))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
