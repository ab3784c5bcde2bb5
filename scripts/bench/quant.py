#!/usr/bin/env python
"""RTN quantization table for a model: perplexity, sizes, quantize time, compressed forward.

Usage: python scripts/bench/quant.py [--model smollm2-135m] [--max-tokens 16384]
       [--recipes smollm2_w8_rtn ...] [--forward-recipe smollm2_w4g128_rtn]

Loads the model once, evaluates it dense, then applies each recipe's stages and evaluates
again (enwiki-sample eval part, seq_len 512, the first --max-tokens tokens). Prints one JSON
line per row and a Markdown table at the end.
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

from jaxcomp.core import get_transform, tree_size  # noqa: E402
from jaxcomp.core.rules import is_leaf  # noqa: E402
from jaxcomp.data import eval_tokens, eval_windows  # noqa: E402
from jaxcomp.eval import perplexity  # noqa: E402
from jaxcomp.models import build_model  # noqa: E402
from jaxcomp.models.loading import load_model  # noqa: E402
from jaxcomp.quant import QArray  # noqa: E402
from jaxcomp.recipes import load_recipe  # noqa: E402

RECIPES = ["smollm2_w8_rtn", "smollm2_w4g128_rtn", "smollm2_nf4", "smollm2_fp4",
           "smollm2_w3g128_rtn", "smollm2_w2g64_rtn"]


def apply_recipe(name, params):
    recipe = load_recipe(name)
    for stage in recipe.stages:
        params = get_transform(stage.transform)(**stage.args, rules=stage.rules,
                                                progress=False)(params)
    return params


def quantized_matrix_bytes(before, after):
    """(bytes of the QArray leaves, float32 bytes of the matrices they replaced)."""
    q = [x for x in jax.tree_util.tree_leaves(after, is_leaf=is_leaf) if isinstance(x, QArray)]
    return sum(x.nbytes for x in q), sum(int(np.prod(x.shape)) * 4 for x in q)


def forward_times(model, params, batch, seq_len, repeats=3):
    f = jax.jit(lambda p, t: model.apply({"params": p}, t))
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    compiled = f.lower(params, tokens).compile()
    compiled(params, tokens).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(params, tokens).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), compiled.memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--forward-recipe", default="smollm2_w4g128_rtn")
    args = ap.parse_args()

    loaded = load_model(args.model)
    model = build_model(loaded.config)
    windows = eval_windows(eval_tokens(loaded.tokenizer, "enwiki-sample"), args.seq_len,
                           args.max_tokens)
    rows = []
    n0, b0 = tree_size(loaded.params)
    dense = perplexity(model, loaded.params, windows, 8, progress=False)
    rows.append({"recipe": "dense (f32)", "ppl": dense.ppl, "params": n0, "bytes": b0,
                 "bits_per_param": 32.0, "quant_matrix_ratio": 1.0, "quantize_s": 0.0})
    print(json.dumps(rows[-1]), flush=True)
    for name in args.recipes:
        start = time.perf_counter()
        q = apply_recipe(name, loaded.params)
        jax.block_until_ready(q)
        seconds = time.perf_counter() - start
        n, b = tree_size(q)
        qb, fb = quantized_matrix_bytes(loaded.params, q)
        r = perplexity(model, q, windows, 8, progress=False)
        rows.append({"recipe": name, "ppl": r.ppl, "params": n, "bytes": b,
                     "bits_per_param": 8 * b / n0, "quant_matrix_ratio": qb / fb,
                     "quantize_s": seconds})
        print(json.dumps(rows[-1]), flush=True)
    q = apply_recipe(args.forward_recipe, loaded.params)
    for batch in (1, 8):
        td, md = forward_times(model, loaded.params, batch, args.seq_len)
        tq, mq = forward_times(model, q, batch, args.seq_len)
        print(json.dumps({"forward": args.forward_recipe, "batch": batch, "seq_len": args.seq_len,
                          "dense_s": td, "compressed_s": tq, "ratio": tq / td,
                          "dense_temp_bytes": md, "compressed_temp_bytes": mq}), flush=True)
    print(f"\n{windows.size:,} tokens of enwiki-sample eval, seq_len {args.seq_len}\n")
    print("| recipe | perplexity | params stored | bytes | bits/param | quantized matrices "
          "vs f32 | quantize time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['ppl']:.3f} | {r['params']:,} | {r['bytes']:,} | "
              f"{r['bits_per_param']:.2f} | {r['quant_matrix_ratio']:.4f} | "
              f"{r['quantize_s']:.2f} |")


if __name__ == "__main__":
    main()
