#!/usr/bin/env python
"""Kernel path vs XLA path on a whole random LLaMA-shaped model (no checkpoint needed).

Usage: python scripts/bench/model_check.py [--layers 4] [--hidden 1024] [--tokens 8]
Quantizes a random model to int4 g128, runs the forward with JAXCOMP's Pallas kernels and with
the XLA dequantize path, and prints the max relative difference of the logits and the decode
step time of each path (M = batch*1 token with a KV cache is what decode runs).
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

from jaxcomp.core.dispatch import use_matmul_impl  # noqa: E402
from jaxcomp.models import build_model  # noqa: E402
from jaxcomp.models.config import ModelConfig  # noqa: E402
from jaxcomp.quant import int4, quantize  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--precision", default="highest",
                    help="jax default matmul precision: 'highest' so XLA's f32 matmuls on GPU "
                         "do not use TF32 (the kernel accumulates f32 exactly)")
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", args.precision)
    h = args.hidden
    cfg = ModelConfig("llama", "llama", 32000, h, int(h * 2.6875) // 128 * 128, args.layers,
                      h // 64, h // 64, 64, 4096, 1e-5)
    model = build_model(cfg, dtype=jnp.float32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    q = quantize(int4(128))(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (1, args.tokens)))
    forward = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    out = {}
    for impl in ("xla", "pallas"):
        with use_matmul_impl(impl):
            f = jax.jit(forward)
            out[impl] = np.asarray(f(q, tokens))
            start = time.perf_counter()
            for _ in range(20):
                f(q, tokens).block_until_ready()
            out[impl + "_ms"] = (time.perf_counter() - start) / 20 * 1e3
            out[impl + "_pallas_calls"] = str(jax.make_jaxpr(forward)(q, tokens)).count(
                "pallas_call")
    rel = float(np.abs(out["pallas"] - out["xla"]).max() / np.abs(out["xla"]).max())
    print(json.dumps({"layers": args.layers, "hidden": h, "tokens": args.tokens,
                      "precision": args.precision,
                      "device": jax.devices()[0].device_kind, "max_rel_diff": rel,
                      "xla_forward_ms": out["xla_ms"], "pallas_forward_ms": out["pallas_ms"],
                      "pallas_calls": out["pallas_pallas_calls"]}))


if __name__ == "__main__":
    main()
